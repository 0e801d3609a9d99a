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

from common import tensors
from common.datasets import BatchLoader, load_digits, model_spec_for
from common.messages import Encoding, JoinRequest, PayloadHeader, TrainConfig, UpdateHeader
from common.models import build_model
from common.partition import client_share
from common.training import evaluate, train
from fl_server.rounds import InvalidUpdateError, RoundState

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
    spec = model_spec_for("mlp", train_data)
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=clients, seed=seed, local_epochs=2, batch_size=32,
                      lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    state = RoundState(global_state=build_model(spec, seed=seed).state_dict(), train_config=cfg,
                       clients_per_round=clients, min_clients=clients, min_fit=1, round_timeout=600,
                       aggregator=aggregator, seed=seed)
    shares = [client_share(train_data, i, clients, seed) for i in range(clients)]
    model, device = build_model(spec), torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    for i in range(clients):
        state.join(JoinRequest(client_id=str(i), num_samples=len(shares[i])), 0)
    for _ in range(rounds):
        selected = state.open_round()
        start = {k: v.clone() for k, v in state.global_state.items()}
        for client in selected:
            i = int(client)
            model.load_state_dict(start)
            torch.manual_seed(seed + 1000 * i + state.model_version)
            train(model, BatchLoader(shares[i], cfg.batch_size, shuffle=True, seed=seed + i), cfg, device)
            diff = {k: v.detach() - start[k] for k, v in model.state_dict().items()}
            if i >= clients - attackers:
                diff = poison(diff, attack, generator)
            payload = tensors.encode(diff)
            header = UpdateHeader(client_id=client, round=state.model_version + 1, model_version=state.model_version,
                                  num_samples=len(shares[i]),
                                  payload=PayloadHeader(payload.specs, payload.total_bytes, payload.num_chunks(),
                                                        payload.checksum, Encoding.DIFF))
            try:
                state.submit(header, payload.chunks())
            except InvalidUpdateError:
                pass  # e.g. an honest client whose training diverged on a model the attack has wrecked
        # Every update is in (or refused): close at once rather than wait for a silence or a deadline.
        if not state.close_round().aggregated:
            break  # every update refused: the model is lost
    model.load_state_dict(state.global_state)
    return evaluate(model, BatchLoader(test_data, 512), device).accuracy


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
