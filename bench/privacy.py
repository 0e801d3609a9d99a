"""The accuracy cost of client-level differential privacy (DP-FedAvg), and the privacy it buys.

    python -m bench.privacy [--rounds 50]

1000 clients hold IID shares of MNIST (the copy in ../shared/data/mnist; the built-in digits when it is
absent); each round samples 100 of them, which train the MLP for one local epoch. The server is the real
`RoundState` with its DP-FedAvg aggregator (fl_server/aggregation/dp.py), in one process. Prints a markdown
table (the one in docs/security.md): final test accuracy and the epsilon spent, per noise multiplier.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common.datasets import load_digits, load_mnist
from fl_server.aggregation import epsilon
from fl_tools import simulation

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
CLIENTS, PER_ROUND, CLIP, DELTA = 1000, 100, 1.0, 1e-5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.privacy", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.5, 1.0, 2.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train_data, test_data = load_mnist(MNIST) if MNIST.is_dir() else load_digits()
    what = "MNIST" if MNIST.is_dir() else "digits"
    print(f"{CLIENTS} clients, {PER_ROUND} per round, MLP on {what}, 1 local epoch, {args.rounds} rounds, "
          f"clip {CLIP}, delta {DELTA}:\n")
    print("| noise multiplier | final test accuracy | epsilon |\n|---|---|---|")
    for z in args.noise:
        start = time.perf_counter()
        accuracy = simulation.run(train_data, test_data, model="mlp", clients=CLIENTS, rounds=args.rounds,
                                  local_epochs=1, clients_per_round=PER_ROUND, dp_noise_multiplier=z, dp_clip=CLIP)
        spent = epsilon(z, [(CLIENTS, PER_ROUND)] * args.rounds, DELTA) if z > 0 else float("inf")
        print(f"| {z:g}{' (no DP)' if z == 0 else ''} | {accuracy:.2%} | {spent:.3g} |", flush=True)
        print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
