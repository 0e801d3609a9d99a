"""Data sets as in-memory tensors, and the held-out test split the server evaluates on.

Nothing here downloads: the built-in digits ship inside the package, MNIST is read from IDX files and
CIFAR-10 from torchvision's folder under a local root. A missing data set is one clear error.
"""
from __future__ import annotations

import gzip
from collections.abc import Callable
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
    with resources.files("common").joinpath("digits.csv.gz").open("rb") as f, gzip.open(f) as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float32)
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


# IDX data sets: torchvision's class (for download) and folder, and the usual normalization (mean and
# standard deviation of the training images).
IDX_SETS = {"mnist": ("MNIST", 0.1307, 0.3081), "fashion-mnist": ("FashionMNIST", 0.2860, 0.3530)}
# CIFAR: torchvision's class and folder, classes, per-channel mean and standard deviation.
CIFAR_SETS = {
    "cifar10": ("CIFAR10", "cifar-10-batches-py", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", "cifar-100-python", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
DATASETS = ("digits", *IDX_SETS, *CIFAR_SETS)
# The federation names no data set: the server holds no data (no server-side evaluation) and every
# client trains on its own (--data).
NO_DATASET = "none"
IMAGE_FOLDER = "imagefolder:"  # imagefolder:PATH, PATH/CLASS_NAME/*.png|jpg
IMAGE_SIZE = 32  # image-folder pictures are resized to IMAGE_SIZE x IMAGE_SIZE
IMAGE_FOLDER_TEST_FRACTION = 0.2


def check_dataset_name(name: str) -> None:
    if name not in (*DATASETS, NO_DATASET) and not (name.startswith(IMAGE_FOLDER) and len(name) > len(IMAGE_FOLDER)):
        raise DataError(f"unknown data set {name!r}; choose {', '.join(DATASETS)}, imagefolder:PATH or "
                        f"{NO_DATASET} (clients bring their own data)")


def _find_idx(root: Path, stem: str, folder_name: str) -> Path:
    for folder in (root, root / folder_name / "raw", root / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{folder_name} file {stem} not found in {root}, {root}/{folder_name}/raw or {root}/raw; put "
                    "the four IDX files (optionally .gz) there, or pass --download when online")


def load_mnist(root: str | Path, name: str = "mnist", download: bool = False) -> tuple[ArrayData, ArrayData]:
    """MNIST or Fashion-MNIST from torchvision's raw IDX files, read without torchvision."""
    root = Path(root)
    folder_name, mean, std = IDX_SETS[name]
    if download:
        import torchvision.datasets  # noqa: PLC0415 - only to fetch the files

        # One construction fetches all four files (train and test); its parsed copy is not used.
        getattr(torchvision.datasets, folder_name)(str(root), download=True)

    def split(prefix: str) -> ArrayData:
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte", folder_name))
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte", folder_name))
        x = (torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1) - mean) / std
        return ArrayData(x, torch.from_numpy(labels.astype(np.int64)), 10)

    return split("train"), split("t10k")


def load_cifar(root: str | Path, name: str = "cifar10", download: bool = False) -> tuple[ArrayData, ArrayData]:
    import torchvision.datasets  # noqa: PLC0415

    class_name, folder, classes, mean, std = CIFAR_SETS[name]
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    def split(train: bool) -> ArrayData:
        try:
            ds = getattr(torchvision.datasets, class_name)(str(root), train=train, download=download)
        except RuntimeError:
            raise DataError(f"{name} not found under {root} (expected {root}/{folder}); copy it there, or pass "
                            "--download when online") from None
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
        return ArrayData((x - mean_t) / std_t, torch.tensor(ds.targets, dtype=torch.int64), classes)

    return split(True), split(False)


def load_image_folder(path: str | Path, seed: int = 0) -> tuple[ArrayData, ArrayData]:
    """A user's own images, PATH/CLASS_NAME/*.png|jpg: classes in name order, pictures resized to
    IMAGE_SIZE square in RGB and normalized by the folder's own per-channel mean and deviation; a seeded
    IMAGE_FOLDER_TEST_FRACTION of each class is the test split."""
    from torchvision import transforms  # noqa: PLC0415
    from torchvision.datasets import ImageFolder  # noqa: PLC0415

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; give imagefolder:PATH with PATH/CLASS_NAME/*.png|jpg")
    try:
        ds = ImageFolder(str(path), transform=transforms.Compose([
            transforms.Resize((IMAGE_SIZE, IMAGE_SIZE)), transforms.ToTensor()]))
        images = [ds[i] for i in range(len(ds))]
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"cannot read images under {path} ({e}); it needs one folder per class holding "
                        ".png or .jpg files") from None
    x = torch.stack([img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3] for img, _ in images])
    y = torch.tensor([label for _, label in images], dtype=torch.int64)
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    data = ArrayData(x, y, len(ds.classes))
    generator = torch.Generator().manual_seed(seed)
    test_idx = []
    for label in range(len(ds.classes)):
        members = torch.nonzero(y == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        test_idx.append(members[:int(len(members) * IMAGE_FOLDER_TEST_FRACTION)])
    test = torch.cat(test_idx)
    in_train = torch.ones(len(y), dtype=torch.bool)
    in_train[test] = False
    train = torch.nonzero(in_train).flatten()
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"image folder {path} has too few images to split into training and test parts "
                        f"({len(y)} found); give each class at least 5")
    return data.subset(train), data.subset(test)


def load_dataset(name: str, root: str | Path = "data", download: bool = False) -> tuple[ArrayData, ArrayData]:
    """(train, test) of a data set by name; the test split is what the server evaluates on. Nothing is
    downloaded unless `download`."""
    check_dataset_name(name)
    if name == NO_DATASET:  # only a client without --data asks for it
        raise DataError("the federation names no data set: start fl-client with --data DIR holding your own data")
    if name == "digits":
        return load_digits()
    if name in IDX_SETS:
        return load_mnist(root, name, download)
    if name in CIFAR_SETS:
        return load_cifar(root, name, download)
    return load_image_folder(name[len(IMAGE_FOLDER):])


def augmentation_for(dataset: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """CIFAR's usual training augmentation (random crop with 4 pixels of padding, horizontal flip), or
    None. Evaluation never augments."""
    if dataset not in CIFAR_SETS:
        return None
    _, _, _, mean, std = CIFAR_SETS[dataset]
    black = {torch.device("cpu"): torch.tensor([-m / s for m, s in zip(mean, std)])}  # black before normalization

    def augment(x: torch.Tensor) -> torch.Tensor:
        if x.device not in black:  # moved once, not on every batch
            black[x.device] = black[torch.device("cpu")].to(x.device)
        return random_crop_and_flip(x, 4, black[x.device])

    return augment


def random_crop_and_flip(x: torch.Tensor, padding: int, fill: torch.Tensor) -> torch.Tensor:
    """Each image of the batch shifted by a random crop of its padded self, and flipped left-right with
    probability 1/2: batched indexing, no per-sample Python."""
    b, c, h, w = x.shape
    padded = fill.view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    dy = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))
    flip = torch.rand(b, device=x.device) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(b, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None], rows, cols]


def model_spec_for(model_name: str, data: ArrayData) -> ModelSpec:
    return ModelSpec(name=model_name, input_shape=data.input_shape, num_classes=data.num_classes)


# On CUDA a shard lives on the GPU when it takes at most this part of the GPU's free memory; the rest is
# left for the model, its gradients, optimizer state and activations.
GPU_DATA_FRACTION = 0.5


def keeps_data_on_gpu(data_bytes: int, free_gpu_bytes: int) -> bool:
    return data_bytes <= GPU_DATA_FRACTION * free_gpu_bytes


class BatchLoader:
    """Mini-batches of in-memory tensors by slicing, with no per-sample Python work.

    Iterating reshuffles (when `shuffle`) with its own generator, so a client's batch order depends
    only on its seed. On CUDA the data is moved to the device once, not once per batch, when it fits
    (keeps_data_on_gpu). A larger shard stays in pinned host memory: each batch is gathered there and
    copied to the GPU without blocking, so the copy overlaps the GPU's work on the previous batch.
    """

    def __init__(self, data: ArrayData, batch_size: int, shuffle: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 shard: tuple[int, int] = (0, 1)):
        """`augment`: applied to each training batch (see augmentation_for).

        `shard=(rank, world)`: only every world-th sample of each batch, from the rank-th on: loaders with
        the same seed then split each batch among `world` data-parallel processes, and each gathers and
        augments only its own samples. Batches with fewer samples than processes are skipped, so that no
        process ever steps on nothing."""
        self.augment = augment
        self.rank, self.world = shard
        if not 0 <= self.rank < self.world:
            raise ValueError(f"shard {shard} is not (rank, world) with 0 <= rank < world")
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda" and not keeps_data_on_gpu(
            data.x.nbytes + data.y.nbytes, torch.cuda.mem_get_info(self.device)[0])
        if self.pinned:
            self.x, self.y = data.x.pin_memory(), data.y.pin_memory()
        else:
            self.x, self.y = data.x.to(self.device), data.y.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        """Batches per epoch (a last one too small to split among the shards is not one)."""
        whole, rest = divmod(len(self.y), self.batch_size)
        return whole + (rest >= self.world)

    def __iter__(self):
        n = len(self.y)
        order = torch.randperm(n, generator=self.generator).to(self.x.device) if self.shuffle else None
        for start in range(0, n, self.batch_size):
            end = min(start + self.batch_size, n)
            if end - start < self.world:
                continue
            rows = slice(start + self.rank, end, self.world)  # this shard's share of the batch
            if order is not None:
                rows = order[rows]
            x, y = self._take(self.x, rows), self._take(self.y, rows)
            yield (self.augment(x) if self.augment is not None else x), y

    def _take(self, values: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        """values[rows], on the loader's device. From pinned memory: gathered into a pinned staging block
        and copied without blocking; PyTorch's pinned-memory cache does not hand that block out again
        until the copy has finished."""
        if not self.pinned:
            return values[rows]
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, rows.step)
        staging = torch.empty((len(rows), *values.shape[1:]), dtype=values.dtype, pin_memory=True)
        return torch.index_select(values, 0, rows, out=staging).to(self.device, non_blocking=True)
