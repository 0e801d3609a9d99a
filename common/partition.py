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
import zlib
from pathlib import Path

import numpy as np
import torch

from common.datasets import ArrayData, DataError, load_dataset

SHARD_ARRAYS = "shard.npz"
SHARD_META = "meta.json"


def client_index(client_id: str) -> int:
    """A number for seeding and for picking a share of the built-in data: the id itself when numeric.
    The server uses it too, to refuse a client without data whose id has no share."""
    return int(client_id) if client_id.isdigit() else zlib.crc32(client_id.encode()) % 1_000_000


def iid_indices(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into `num_clients` parts whose sizes differ by at most one."""
    if num_clients < 1 or num_clients > num_samples:
        raise ValueError(f"cannot split {num_samples} samples among {num_clients} clients")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_indices(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label skew: each class is divided among the clients in proportions drawn from Dir(alpha)
    (Hsu et al., 2019). Small alpha gives each client few classes; large alpha approaches IID. Redrawn
    (from the same seed) until every client has at least one sample."""
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * num_clients)) * len(members)).astype(int)[:-1]
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if all(len(p) for p in result):
            return result
    raise ValueError(f"cannot give each of {num_clients} clients a sample with alpha {alpha}; raise --alpha")


def shard_indices(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int = 2) -> list[np.ndarray]:
    """The FedAvg paper's pathological split (McMahan et al., 2017): sort by label, cut into
    `shards_per_client * num_clients` shards, give each client `shards_per_client` of them at random."""
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, shards_per_client * num_clients)
    if any(len(s) == 0 for s in shards):
        raise ValueError(f"{len(labels)} samples are too few for {num_clients} clients of {shards_per_client} shards")
    assignment = np.random.default_rng(seed).permutation(len(shards)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assignment]


SCHEMES = ("iid", "dirichlet", "shards")


def parse_scheme(text: str) -> tuple[str, float]:
    """`iid`, `shards`, or `dirichlet:ALPHA` (`dirichlet` alone means alpha 0.5)."""
    name, _, value = text.partition(":")
    if name in ("iid", "shards") and not value:
        return name, 0.0
    if name == "dirichlet":
        try:
            alpha = float(value or 0.5)
        except ValueError:
            alpha = -1.0
        if alpha > 0:
            return name, alpha
    raise ValueError(f"unknown partition {text!r}; use iid, shards or dirichlet:ALPHA with ALPHA > 0")


def split_indices(labels: np.ndarray, num_clients: int, scheme: str = "iid", seed: int = 0) -> list[np.ndarray]:
    """Each client's sample indices under `scheme` (see parse_scheme); disjoint, and together all samples."""
    name, alpha = parse_scheme(scheme)
    if num_clients < 1 or num_clients > len(labels):
        raise ValueError(f"cannot split {len(labels)} samples among {num_clients} clients")
    if name == "iid":
        return iid_indices(len(labels), num_clients, seed)
    if name == "dirichlet":
        return dirichlet_indices(labels, num_clients, alpha, seed)
    return shard_indices(labels, num_clients, seed)


def client_share(train: ArrayData, client: int, num_clients: int, seed: int, scheme: str = "iid") -> ArrayData:
    """Client `client`'s share of `train`: what a client trains on when it has no --data, as the seed does."""
    if not 0 <= client < num_clients:
        raise DataError(f"client index {client} is outside the federation's {num_clients} clients "
                        f"(0..{num_clients - 1}); start it with --id 0..{num_clients - 1} or give it --data")
    return train.subset(split_indices(train.y.numpy(), num_clients, scheme, seed)[client])


def label_histogram(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Samples per (client, label)."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def format_histogram(histogram: np.ndarray) -> str:
    classes = histogram.shape[1]
    width = max(6, len(str(histogram.max())) + 1)
    lines = ["client " + "".join(f"{c:>{width}}" for c in range(classes)) + f"{'total':>8}"]
    for client, row in enumerate(histogram):
        lines.append(f"{client:>6} " + "".join(f"{v:>{width}}" for v in row) + f"{row.sum():>8}")
    return "\n".join(lines) + "\n"


def plot_histogram(histogram: np.ndarray, title: str, path: Path) -> None:
    """A stacked bar per client: how many samples of each label it holds."""
    import matplotlib  # noqa: PLC0415 - only when writing the plot

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    clients, classes = histogram.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * clients + 2), 4))
    bottom = np.zeros(clients)
    colors = plt.get_cmap("tab10" if classes <= 10 else "tab20")
    for label in range(classes):
        ax.bar(range(clients), histogram[:, label], bottom=bottom, label=str(label), color=colors(label % colors.N))
        bottom += histogram[:, label]
    ax.set(xlabel="client", ylabel="samples", title=title, xticks=range(clients))
    if classes <= 20:
        ax.legend(title="label", fontsize=7, ncol=2, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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


def partition(dataset: str, num_clients: int, out: Path, seed: int = 0, data_root: str = "data",
              scheme: str = "iid", download: bool = False) -> np.ndarray:
    """Write `out/shard0 ...` and `out/histogram.txt` / `.json` / `.png`; return the label histogram."""
    train, _ = load_dataset(dataset, data_root, download)
    labels = train.y.numpy()
    parts = split_indices(labels, num_clients, scheme, seed)
    for client, indices in enumerate(parts):
        write_shard(out / f"shard{client}", train.subset(indices),
                    {"dataset": dataset, "client": client, "num_clients": num_clients, "scheme": scheme,
                     "seed": seed})
    histogram = label_histogram(labels, parts, train.num_classes)
    (out / "histogram.txt").write_text(format_histogram(histogram))
    (out / "histogram.json").write_text(json.dumps({"scheme": scheme, "seed": seed,
                                                    "samples_per_client_and_label": histogram.tolist()}) + "\n")
    plot_histogram(histogram, f"{dataset}, {num_clients} clients, {scheme}, seed {seed}", out / "histogram.png")
    return histogram


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-partition",
                                     description="Split a data set's training split into client shards.")
    parser.add_argument("--clients", type=int, required=True, help="number of shards to write")
    parser.add_argument("--out", type=Path, required=True, help="folder to write shard0 ... shardN-1 into")
    parser.add_argument("--dataset", default="digits",
                        help="digits (built in), mnist, fashion-mnist, cifar10, cifar100 or imagefolder:PATH")
    parser.add_argument("--download", action="store_true", help="fetch a torchvision data set if missing")
    parser.add_argument("--data-root", default="data", help="where mnist / cifar10 files are")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--scheme", default="iid", choices=SCHEMES,
                        help="iid; dirichlet (label skew, see --alpha); shards (each client 2 label-sorted shards)")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration: smaller is more skewed")
    args = parser.parse_args(argv)
    scheme = f"dirichlet:{args.alpha:g}" if args.scheme == "dirichlet" else args.scheme
    try:
        histogram = partition(args.dataset, args.clients, args.out, args.seed, args.data_root, scheme, args.download)
    except (DataError, ValueError) as e:
        print(f"fl-partition: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"fl-partition: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"{args.clients} shards of {args.dataset} ({scheme}, seed {args.seed}) in {args.out}; samples per label:")
    print(format_histogram(histogram), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
