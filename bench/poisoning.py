"""Model poisoning: 2 of 10 clients send malicious updates; how each aggregator holds up.

    python -m bench.poisoning [--rounds 8] [--seeds 0 1 2]

Prints the markdown table of final test accuracies in docs/security.md; the study itself (attacks,
simulation, table) is fl_tools.poisoning.
"""
from __future__ import annotations

import argparse
import sys

import torch

from fl_tools.poisoning import table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.poisoning", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"10 clients, 2 of them malicious, MLP on digits, {args.rounds} rounds, seeds {args.seeds}; final test "
          "accuracy (mean over the seeds); a drop is positive when the attacked run is worse:\n")
    print(table(args.rounds, args.seeds), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
