"""Model poisoning: 2 of 10 clients send malicious updates; how each aggregator holds up.

    python -m bench.poisoning [--rounds 8]

Runs the server's real round state and aggregators in one process (no network: the attack is in what
is sent, not how) with real local training of the MLP on the built-in digits, and prints a markdown
table of final test accuracies (the table in docs/security.md).
"""
from __future__ import annotations

import argparse
import sys

import torch

from bench import simulation
from common.datasets import load_digits

AGGREGATORS = ("fedavg", "median", "trimmed_mean:0.2", "krum:2", "multikrum:2:6")
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


def table(rounds: int) -> str:
    lines = ["| aggregator | " + " | ".join(f"attack: {a}" for a in ATTACKS) + " |",
             "|---|" + "---|" * len(ATTACKS)]
    for aggregator in AGGREGATORS:
        cells = [f"{simulate(aggregator, attack, rounds):.2%}" for attack in ATTACKS]
        lines.append(f"| {aggregator} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.poisoning", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"10 clients, 2 of them malicious, MLP on digits, {args.rounds} rounds; final test accuracy:\n")
    print(table(args.rounds), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
