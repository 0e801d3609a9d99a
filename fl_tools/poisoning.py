"""Model poisoning: 2 of 10 clients send malicious updates; how each aggregator holds up.

Runs the server's real round state and aggregators in one process (fl_tools.simulation; no network:
the attack is in what is sent, not how) with real local training of the MLP on the built-in digits.
`table` is the markdown table of final test accuracies in docs/security.md (`python -m bench.poisoning`
prints it).
"""
from __future__ import annotations

import torch

from common.datasets import load_digits
from fl_tools import simulation

AGGREGATORS = ("fedavg", "median", "trimmed_mean:0.2", "trimmed_mean:0.3", "krum:2", "multikrum:2:6")
ATTACKS = ("none", "scale:-10", "noise")


def poison(diff: dict[str, torch.Tensor], attack: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    if attack == "none":
        return diff
    out = {}
    for name, t in diff.items():
        if not t.is_floating_point():
            out[name] = t
        elif attack.startswith("scale:"):
            out[name] = t * float(attack.split(":")[1])
        else:  # random noise of large norm: 100 times the honest update's scale
            out[name] = torch.randn(t.shape, generator=generator) * 100 * (t.abs().mean() + 1e-3)
    return out


def simulate(aggregator: str, attack: str, rounds: int = 8, clients: int = 10, attackers: int = 2,
             seed: int = 0) -> float:
    train_data, test_data = load_digits()
    generator = torch.Generator().manual_seed(seed)

    def tamper(client: int, diff: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return poison(diff, attack, generator) if client >= clients - attackers else diff

    return simulation.run(train_data, test_data, model="mlp", clients=clients, rounds=rounds,
                          aggregator=aggregator, seed=seed, tamper=tamper)


def table(rounds: int, seeds: list[int]) -> str:
    """Final accuracy per aggregator and attack (the mean over `seeds` when there are several), and the
    worst drop under attack across seeds, against the clean FedAvg run and against the rule's own clean run."""
    results = {(a, attack, seed): simulate(a, attack, rounds, seed=seed)
               for a in AGGREGATORS for attack in ATTACKS for seed in seeds}
    lines = ["| aggregator | " + " | ".join(f"attack: {a}" for a in ATTACKS) +
             " | worst drop vs clean FedAvg | worst drop vs own clean run |",
             "|---|" + "---|" * (len(ATTACKS) + 2)]
    for a in AGGREGATORS:
        cells = [f"{sum(results[a, attack, s] for s in seeds) / len(seeds):.2%}" for attack in ATTACKS]
        attacked = [(attack, s) for attack in ATTACKS[1:] for s in seeds]
        vs_fedavg = max(results["fedavg", "none", s] - results[a, attack, s] for attack, s in attacked)
        vs_own = max(results[a, "none", s] - results[a, attack, s] for attack, s in attacked)
        lines.append(f"| {a} | " + " | ".join(cells) +
                     f" | {vs_fedavg * 100:+.1f} points | {vs_own * 100:+.1f} points |")
    return "\n".join(lines) + "\n"
