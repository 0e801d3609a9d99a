"""Data sets as in-memory tensors, and the held-out test split the server evaluates on.

Nothing here downloads: the built-in digits ship inside the package, MNIST is read from IDX files and
CIFAR-10 from torchvision's folder under a local root. A missing data set is one clear error.
"""
from __future__ import annotations

import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from common.messages import ModelSpec

DIGITS_TEST_SIZE = 360  # 20% of the 1,797 digits, held out by the server, never in any client's share
DIGITS_SPLIT_SEED = 1234  # fixed so every run, server and client, agrees on which images are the test split


class DataError(ValueError):
    """A data set or shard is missing or malformed; the message says where we looked and what to do."""


@dataclass
class ArrayData:
    """Samples as tensors: x is float32 (N, C, H, W), y is int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"data has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, indices: np.ndarray | torch.Tensor) -> ArrayData:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ArrayData(self.x[idx], self.y[idx], self.num_classes)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn's copy of the UCI digits (CC BY 4.0): 64 pixel values in 0..16, then the label.
    with resources.files("common").joinpath("digits.csv.gz").open("rb") as f:
        table = np.loadtxt(gzip.open(f), delimiter=",", dtype=np.float32)
    return table[:, :64].reshape(-1, 1, 8, 8) / 16.0, table[:, 64].astype(np.int64)


def load_digits() -> tuple[ArrayData, ArrayData]:
    x, y = _digits()
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    data = ArrayData(torch.from_numpy(x), torch.from_numpy(y), 10)
    return data.subset(train), data.subset(test)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"MNIST file {stem} not found in {root}, {root}/MNIST/raw or {root}/raw; put the four "
                    "IDX files (optionally .gz) there, e.g. from torchvision.datasets.MNIST(root, download=True)")


def load_mnist(root: str | Path) -> tuple[ArrayData, ArrayData]:
    root = Path(root)

    def split(prefix: str) -> ArrayData:
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        # The usual MNIST normalization (mean 0.1307, std 0.3081 over the training set).
        x = (torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) - 0.1307) / 0.3081
        return ArrayData(x, torch.from_numpy(labels.astype(np.int64)), 10)

    return split("train"), split("t10k")


def load_cifar10(root: str | Path) -> tuple[ArrayData, ArrayData]:
    from torchvision.datasets import CIFAR10

    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)

    def split(train: bool) -> ArrayData:
        try:
            ds = CIFAR10(str(root), train=train, download=False)
        except RuntimeError:
            raise DataError(f"CIFAR-10 not found under {root} (expected {root}/cifar-10-batches-py); fetch it "
                            "once with torchvision.datasets.CIFAR10(root, download=True)") from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return ArrayData((x - mean) / std, torch.tensor(ds.targets, dtype=torch.int64), 10)

    return split(True), split(False)


def load_dataset(name: str, root: str | Path = "data") -> tuple[ArrayData, ArrayData]:
    """(train, test) of a data set by name; the test split is what the server evaluates on."""
    if name == "digits":
        return load_digits()
    if name == "mnist":
        return load_mnist(root)
    if name == "cifar10":
        return load_cifar10(root)
    raise DataError(f"unknown data set {name!r}; choose digits, mnist or cifar10")


def model_spec_for(model_name: str, data: ArrayData) -> ModelSpec:
    return ModelSpec(name=model_name, input_shape=data.input_shape, num_classes=data.num_classes)


class BatchLoader:
    """Mini-batches of in-memory tensors by slicing, with no per-sample Python work.

    Iterating reshuffles (when `shuffle`) with its own generator, so a client's batch order depends
    only on its seed. On CUDA the data is moved to the device once, not once per batch.
    """

    def __init__(self, data: ArrayData, batch_size: int, shuffle: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.x = data.x.to(device)
        self.y = data.y.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator).to(self.x.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            if order is None:
                yield self.x[start:start + self.batch_size], self.y[start:start + self.batch_size]
            else:
                idx = order[start:start + self.batch_size]
                yield self.x[idx], self.y[idx]
