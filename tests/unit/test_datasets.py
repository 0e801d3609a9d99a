import gzip
import struct

import numpy as np
import pytest
import torch

from common.datasets import (
    CIFAR_SETS,
    DataError,
    augmentation_for,
    load_dataset,
    random_crop_and_flip,
)


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_is_read_from_torchvisions_raw_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    train, test = load_dataset("fashion-mnist", tmp_path)
    assert train.x.shape == (12, 1, 28, 28) and len(test) == 5 and train.num_classes == 10
    # Fashion-MNIST's own normalization: black is -mean/std.
    assert float(train.x.min()) == pytest.approx(-0.2860 / 0.3530, abs=1e-5)


@pytest.mark.parametrize("name, where", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"),
                                         ("cifar100", "cifar-100-python")])
def test_a_missing_data_set_says_where_it_looked_and_how_to_get_it(tmp_path, name, where):
    with pytest.raises(DataError, match=where) as error:
        load_dataset(name, tmp_path)
    assert "download" in str(error.value)


def test_unknown_data_set():
    with pytest.raises(DataError, match="imagefolder:PATH"):
        load_dataset("imagenet")


def test_an_image_folder_of_ones_own_pictures(tmp_path):
    from PIL import Image

    colors = {"cats": (200, 30, 30), "dogs": (30, 200, 30), "fish": (30, 30, 200)}
    for name, color in colors.items():
        (tmp_path / name).mkdir()
        for i in range(6):
            size = (40 + i, 20 + 3 * i)  # any size: resized to 32x32
            Image.new("RGB" if i % 2 else "L", size, color if i % 2 else 100).save(tmp_path / name / f"{i}.png")
    train, test = load_dataset(f"imagefolder:{tmp_path}")
    assert train.x.shape[1:] == (3, 32, 32) and train.num_classes == 3
    assert len(train) == 15 and len(test) == 3  # 20% of each class held out for the server's evaluation
    assert sorted(test.y.tolist()) == [0, 1, 2]
    # Fixed normalization, (pixel / 255 - 0.5) / 0.5, as clients use: not the folder's own statistics.
    cats = torch.cat([train.x[train.y == 0], test.x[test.y == 0]])  # plain pictures, red or gray 100
    expected = {tuple(round(v / 255 * 2 - 1, 4) for v in rgb) for rgb in ((200, 30, 30), (100, 100, 100))}
    assert {tuple(round(float(v), 4) for v in cats[i, :, h, w]) for i in range(6) for h in (0, 31)
            for w in (0, 31)} == expected
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")


def test_cifar_training_batches_are_cropped_and_flipped_and_nothing_else_is():
    assert augmentation_for("digits") is None and augmentation_for("mnist") is None
    assert augmentation_for("cifar10") is not None and augmentation_for("cifar100") is not None
    torch.manual_seed(0)
    x = torch.randn(64, 3, 8, 8)
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop_and_flip(x, 4, fill)
    assert out.shape == x.shape
    padded = fill.view(1, 3, 1, 1).expand(64, 3, 16, 16).clone()
    padded[:, :, 4:12, 4:12] = x
    flips = 0
    for i in range(64):  # each output is one crop of its padded input, flipped or not
        candidates = [(padded[i, :, dy:dy + 8, dx:dx + 8], flip) for dy in range(9) for dx in range(9)
                      for flip in (False, True)]
        matches = [flip for crop, flip in candidates if torch.equal(crop.flip(2) if flip else crop, out[i])]
        assert matches
        flips += all(matches)
    assert 16 < flips < 48  # about half flipped


@pytest.mark.parametrize("name", list(CIFAR_SETS))
def test_cifar_crops_pad_with_black_as_normalized(name):
    _, _, _, mean, std = CIFAR_SETS[name]
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    images = black.expand(16, 3, 32, 32).clone()  # all-black images, normalized
    # Any crop of a black image padded with black is black: a wrong fill would show at the edges.
    assert torch.allclose(augmentation_for(name)(images), images)
