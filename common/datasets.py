"""Data sets as in-memory tensors, and the held-out test split the server evaluates on.

Nothing here downloads: the built-in digits ship inside the package, MNIST is read from IDX files and
CIFAR-10 from torchvision's folder under a local root. A missing data set is one clear error.
"""
from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from common.messages import ModelSpec, class_names

DIGITS_TEST_SIZE = 360  # 20% of the 1,797 digits, held out by the server, never in any client's share
DIGITS_SPLIT_SEED = 1234  # fixed so every run, server and client, agrees on which images are the test split


class DataError(ValueError):
    """A data set or shard is missing or malformed; the message says where we looked and what to do."""


@dataclass
class ArrayData:
    """Samples as tensors: x is float32 (N, ...), e.g. (N, C, H, W); y is int64 labels (N,), or float32
    targets when num_classes is 0 (regression: a CSV table's numeric column)."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise DataError(f"data has {len(self.x)} inputs but {len(self.y)} labels")
        if self.y.is_floating_point() and self.num_classes != 0:
            raise DataError(f"data has {self.num_classes} classes but fractional labels; labels of classes are "
                            "whole numbers, and numeric targets are for a model without classes")

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
# Pictures in class folders (imagefolder:PATH, fl-client --data DIR): the suffixes torchvision's ImageFolder
# takes, and one fixed normalization, (pixel / 255 - 0.5) / 0.5, so that the same picture is the same input
# on every client and in the server's test data; a folder's own statistics would differ from client to client.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGE_MEAN, IMAGE_STD = 0.5, 0.5


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


def class_label(name: str, names: Sequence[str], num_classes: int) -> int | None:
    """The label of class `name`: its place in `names`, or, when the classes are unnamed, the number it
    spells (0..num_classes-1); None when it is neither."""
    if names:
        return names.index(name) if name in names else None
    try:
        number = float(name)
    except ValueError:
        return None
    return int(number) if number.is_integer() and 0 <= number < num_classes else None


def known_classes(names: Sequence[str], num_classes: int) -> str:
    """The classes class_label knows, for an error message."""
    if names:
        return f"the federation's classes ({', '.join(names)})"
    return f"the class numbers 0..{num_classes - 1}, since the server's config names no classes"


def image_files(folder: Path) -> list[Path]:
    """The pictures under `folder` (by suffix, in any subfolder), in name order; hidden files and folders
    (.DS_Store, .ipynb_checkpoints) are not the user's pictures."""
    found: list[Path] = []
    for parent, subfolders, files in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found.extend(Path(parent) / f for f in sorted(files)
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def read_image(path: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One picture as float32 (channels, H, W): converted to grayscale (1) or RGB (3), resized to `size`
    (H, W) and normalized with the fixed IMAGE_MEAN and IMAGE_STD."""
    from PIL import Image  # noqa: PLC0415 - only for image folders

    try:
        with Image.open(path) as picture:
            picture.draft(None, (size[1], size[0]))  # a JPEG decoded at a fraction of a photo's size: far faster
            converted = picture.convert("L" if channels == 1 else "RGB")
        resized = converted.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"picture {path} cannot be read ({e}); replace or remove it") from None
    pixels = np.asarray(resized, dtype=np.float32).reshape(size[0], size[1], channels)
    return ((pixels / 255.0 - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1)


def class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def read_image_folder(root: Path, names: Sequence[str], num_classes: int, channels: int,
                      size: tuple[int, int]) -> ArrayData:
    """ROOT/CLASS_NAME/... pictures, each labelled by class_label of its folder's name; a folder naming
    no class is an error rather than skipped, since its pictures were meant to be trained on."""
    files: list[Path] = []
    labels: list[int] = []
    for folder in class_folders(root):
        label = class_label(folder.name, names, num_classes)
        if label is None:
            raise DataError(f"class folder {folder} is none of {known_classes(names, num_classes)}; rename or remove "
                            "the folder, or have the server's `classes` setting list it")
        found = image_files(folder)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"no pictures ({', '.join(IMAGE_EXTENSIONS)}) under {root}; put each class's pictures in "
                        f"{root}/CLASS_NAME/")
    x = np.empty((len(files), channels, *size), dtype=np.float32)
    for i, path in enumerate(files):
        x[i] = read_image(path, channels, size)
    return ArrayData(torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64), num_classes)


def load_image_folder(path: str | Path, seed: int = 0, classes: str = "") -> tuple[ArrayData, ArrayData]:
    """A user's own images, PATH/CLASS_NAME/*.png|jpg, resized to IMAGE_SIZE square in RGB with the fixed
    normalization clients use too; a seeded IMAGE_FOLDER_TEST_FRACTION of each class is the test split.
    Labels follow `classes` (the setting's comma-separated names) when given, else the folders' names in
    sorted order (torchvision's), except that folders named 0..N-1 are labelled by their numbers, as
    clients without class names label theirs (in sorted order "10" would come before "2")."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"image folder {path} does not exist; give imagefolder:PATH with PATH/CLASS_NAME/*.png|jpg")
    try:
        names = class_names(classes) or tuple(folder.name for folder in class_folders(path))
    except ValueError as e:
        raise DataError(f"the `classes` setting is wrong: {e}") from None
    if set(names) == {str(i) for i in range(len(names))}:  # folders 0..N-1: label = number, as clients read them
        names = tuple(str(i) for i in range(len(names)))
    data = read_image_folder(path, names, len(names), 3, (IMAGE_SIZE, IMAGE_SIZE))
    y = data.y
    generator = torch.Generator().manual_seed(seed)
    test_idx = []
    for label in range(len(names)):
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


def load_dataset(name: str, root: str | Path = "data", download: bool = False,
                 classes: str = "") -> tuple[ArrayData, ArrayData]:
    """(train, test) of a data set by name; the test split is what the server evaluates on. Nothing is
    downloaded unless `download`. `classes` (the setting) orders an image folder's labels."""
    check_dataset_name(name)
    if name == NO_DATASET:  # only a client without --data asks for it
        raise DataError("the federation names no data set: start fl-client with --data DIR holding your own data")
    if name == "digits":
        return load_digits()
    if name in IDX_SETS:
        return load_mnist(root, name, download)
    if name in CIFAR_SETS:
        return load_cifar(root, name, download)
    return load_image_folder(name[len(IMAGE_FOLDER):], classes=classes)


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
