"""Pictures for this example: the built-in digits (8x8, scikit-learn's copy) drawn as 16x16 PNG files,
split between clients, each its own folder DATA/clientI/DIGIT/*.png. Real users bring their own.

    python make_data.py --clients 3 --out data
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from common.datasets import load_digits


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--out", default="data")
    args = parser.parse_args()
    train, _ = load_digits()
    order = np.random.default_rng(0).permutation(len(train))
    for client, part in enumerate(np.array_split(order, args.clients)):
        for i in part:
            folder = Path(args.out) / f"client{client}" / str(int(train.y[i]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (train.x[i, 0].numpy() * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.NEAREST).save(folder / f"{i}.png")
    print(f"wrote {len(order)} pictures for {args.clients} clients into {args.out}/")


if __name__ == "__main__":
    main()
