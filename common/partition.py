"""Splitting a data set's training split into client shards, and the shard format on disk.

A shard is a folder holding two files:

- `shard.npz`: arrays `x` (float32, N x C x H x W, already normalized) and `y` (int64, N), written by
  `numpy.savez` and read with `allow_pickle=False`, so a shard can only ever hold numbers;
- `meta.json`: `{"dataset", "num_classes", "input_shape", "num_samples", "client", "num_clients",
  "scheme", "seed"}`.

`fl-partition --clients N --out DIR` writes `DIR/shard0 ... DIR/shard{N-1}`; `fl-client --data DIR/shardI`
reads one. A shard holds its own client's samples and nothing of the others'.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.datasets import ArrayData, DataError, load_dataset

SHARD_ARRAYS = "shard.npz"
SHARD_META = "meta.json"


def iid_indices(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into `num_clients` parts whose sizes differ by at most one."""
    if num_clients < 1 or num_clients > num_samples:
        raise ValueError(f"cannot split {num_samples} samples among {num_clients} clients")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def iid_share(train: ArrayData, client: int, num_clients: int, seed: int) -> ArrayData:
    """Client `client`'s share of `train`: what a client trains on when it has no --data, as the seed does."""
    if not 0 <= client < num_clients:
        raise DataError(f"client index {client} is outside the federation's {num_clients} clients "
                        f"(0..{num_clients - 1}); start it with --id 0..{num_clients - 1} or give it --data")
    return train.subset(iid_indices(len(train), num_clients, seed)[client])


def write_shard(folder: Path, data: ArrayData, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / SHARD_ARRAYS, x=data.x.numpy().astype(np.float32), y=data.y.numpy().astype(np.int64))
    meta = {**meta, "num_classes": data.num_classes, "input_shape": list(data.input_shape),
            "num_samples": len(data)}
    (folder / SHARD_META).write_text(json.dumps(meta, indent=2) + "\n")


def read_shard(folder: str | Path) -> ArrayData:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; make shards with `fl-partition --clients N "
                        "--out DIR` and pass one of them, e.g. --data DIR/shard0")
    arrays, meta_path = folder / SHARD_ARRAYS, folder / SHARD_META
    if not arrays.is_file() or not meta_path.is_file():
        raise DataError(f"data folder {folder} holds no shard ({SHARD_ARRAYS} and {SHARD_META}); make shards "
                        "with `fl-partition --clients N --out DIR`")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arrays, allow_pickle=False) as npz:
            x, y = npz["x"], npz["y"]
        num_classes = int(meta["num_classes"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"shard in {folder} is unreadable ({e}); write it again with fl-partition") from None
    if x.dtype != np.float32 or y.dtype != np.int64 or x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"shard in {folder} has wrong arrays (need x float32 N x ..., y int64 N); "
                        "write it again with fl-partition")
    if len(y) == 0:
        raise DataError(f"shard in {folder} is empty; give this client some data")
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"shard in {folder} has labels outside 0..{num_classes - 1}")
    return ArrayData(torch.from_numpy(x), torch.from_numpy(y), num_classes)


def partition(dataset: str, num_clients: int, out: Path, seed: int = 0, data_root: str = "data") -> list[Path]:
    train, _ = load_dataset(dataset, data_root)
    folders = []
    for client, indices in enumerate(iid_indices(len(train), num_clients, seed)):
        folder = out / f"shard{client}"
        write_shard(folder, train.subset(indices), {"dataset": dataset, "client": client,
                                                    "num_clients": num_clients, "scheme": "iid", "seed": seed})
        folders.append(folder)
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-partition",
                                     description="Split a data set's training split into client shards.")
    parser.add_argument("--clients", type=int, required=True, help="number of shards to write")
    parser.add_argument("--out", type=Path, required=True, help="folder to write shard0 ... shardN-1 into")
    parser.add_argument("--dataset", default="digits", help="digits (built in), mnist or cifar10")
    parser.add_argument("--data-root", default="data", help="where mnist / cifar10 files are")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    args = parser.parse_args(argv)
    try:
        folders = partition(args.dataset, args.clients, args.out, args.seed, args.data_root)
    except (DataError, ValueError) as e:
        print(f"fl-partition: {e}", file=sys.stderr)
        return 2
    for folder in folders:
        meta = json.loads((folder / SHARD_META).read_text())
        print(f"{folder}: {meta['num_samples']} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
