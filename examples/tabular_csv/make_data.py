"""Tables for this example: each owner's own CSV file (8 numeric measurements and a `quality` label:
low, medium or high), drawn from one synthetic population. Owner 2 has no `high` rows at all, as real
owners often lack a class. Real users bring their own tables.

    python make_data.py --out data
"""
import argparse
import csv
from pathlib import Path

import numpy as np

CLASSES = ["low", "medium", "high"]
FEATURES = [f"m{i}" for i in range(8)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="data")
    parser.add_argument("--rows", type=int, default=600)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1.5, size=(len(CLASSES), len(FEATURES)))
    for owner, present in enumerate([CLASSES, CLASSES, ["low", "medium"]]):
        folder = Path(args.out) / f"client{owner}"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "measurements.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*FEATURES, "quality"])
            for _ in range(args.rows):
                label = rng.choice(present)
                row = centres[CLASSES.index(label)] + rng.normal(0, 1.0, size=len(FEATURES))
                writer.writerow([*(f"{v:.4f}" for v in row), label])
    print(f"wrote 3 tables of {args.rows} rows into {args.out}/")


if __name__ == "__main__":
    main()
