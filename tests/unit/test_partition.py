import json

import numpy as np
import pytest
import torch

from common.datasets import DIGITS_TEST_SIZE, ArrayData, DataError, load_digits
from common.partition import (
    client_share,
    iid_indices,
    label_histogram,
    main,
    partition,
    read_shard,
    split_indices,
    write_shard,
)


def test_iid_indices_are_disjoint_complete_balanced_and_seeded():
    parts = iid_indices(1437, 10, seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(1437))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, iid_indices(1437, 10, seed=3)))
    assert not np.array_equal(parts[0], iid_indices(1437, 10, seed=4)[0])


def test_digits_split_holds_out_a_fixed_test_set():
    train, test = load_digits()
    assert len(test) == DIGITS_TEST_SIZE and len(train) == 1797 - DIGITS_TEST_SIZE
    assert train.input_shape == (1, 8, 8) and train.num_classes == 10
    assert float(train.x.min()) >= 0 and float(train.x.max()) <= 1
    train2, test2 = load_digits()
    assert torch.equal(test.x, test2.x)
    # No test image is also a training image (the digits have no exact duplicates across the split).
    train_rows = {tuple(r) for r in train.x.reshape(len(train), -1).tolist()}
    assert sum(tuple(r) in train_rows for r in test.x.reshape(len(test), -1).tolist()) < 5


def test_builtin_share_matches_the_partition_command(tmp_path):
    train, _ = load_digits()
    partition("digits", 3, tmp_path, seed=0)
    for i in range(3):
        shard = read_shard(tmp_path / f"shard{i}")
        share = client_share(train, i, 3, seed=0)
        assert torch.equal(shard.x, share.x) and torch.equal(shard.y, share.y)
    meta = json.loads((tmp_path / "shard1" / "meta.json").read_text())
    assert meta["client"] == 1 and meta["num_clients"] == 3 and meta["input_shape"] == [1, 8, 8]


def test_share_index_out_of_range_is_a_clear_error():
    train, _ = load_digits()
    with pytest.raises(DataError, match="outside the federation's 3 clients"):
        client_share(train, 5, 3, seed=0)


def test_missing_empty_and_bad_shards(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_shard(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no shard"):
        read_shard(tmp_path / "empty")
    write_shard(tmp_path / "zero", ArrayData(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), 10), {})
    with pytest.raises(DataError, match="is empty"):
        read_shard(tmp_path / "zero")
    write_shard(tmp_path / "labels", ArrayData(torch.zeros(2, 1, 8, 8), torch.tensor([0, 12]), 10), {})
    with pytest.raises(DataError, match="labels outside"):
        read_shard(tmp_path / "labels")
    (tmp_path / "labels" / "shard.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        read_shard(tmp_path / "labels")


def test_partition_command(tmp_path, capsys):
    assert main(["--clients", "4", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["histogram.json", "histogram.png", "histogram.txt",
                                                         "shard0", "shard1", "shard2", "shard3"]
    assert (tmp_path / "histogram.png").read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "4 shards of digits (iid, seed 0)" in out and out.splitlines()[-1].endswith("359")
    hist = json.loads((tmp_path / "histogram.json").read_text())["samples_per_client_and_label"]
    assert [sum(row) for row in hist] == [360, 359, 359, 359]
    assert main(["--clients", "0", "--out", str(tmp_path / "x")]) == 2


def labels_of(n_per_class=50, classes=10):
    return np.repeat(np.arange(classes), n_per_class)


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet:0.5", "dirichlet:100"])
def test_every_scheme_is_disjoint_complete_and_seeded(scheme):
    labels = labels_of()
    parts = split_indices(labels, 10, scheme, seed=1)
    joined = np.concatenate(parts)
    assert len(parts) == 10 and all(len(p) for p in parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    again = split_indices(labels, 10, scheme, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_shards_give_each_client_at_most_two_labels():
    labels = labels_of()
    hist = label_histogram(labels, split_indices(labels, 10, "shards", seed=0), 10)
    assert all((row > 0).sum() <= 2 for row in hist)
    assert all(row.sum() == 50 for row in hist)


def test_dirichlet_alpha_controls_the_skew():
    labels = labels_of(200)

    def labels_per_client(alpha):
        hist = label_histogram(labels, split_indices(labels, 10, f"dirichlet:{alpha}", seed=0), 10)
        return np.mean([(row >= 0.05 * row.sum()).sum() for row in hist])

    assert labels_per_client(0.1) < 4 < 9 < labels_per_client(100)


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown partition 'dirichlet:-1'"):
        split_indices(labels_of(), 3, "dirichlet:-1")


def test_non_iid_shards_on_disk(tmp_path, capsys):
    assert main(["--clients", "5", "--out", str(tmp_path), "--scheme", "shards"]) == 0
    for i in range(5):
        counts = np.sort(np.bincount(read_shard(tmp_path / f"shard{i}").y.numpy(), minlength=10))[::-1]
        # Two label-sorted shards each: two labels dominate (a shard may straddle a label boundary).
        assert counts[:2].sum() >= 0.85 * counts.sum()
    assert json.loads((tmp_path / "shard0" / "meta.json").read_text())["scheme"] == "shards"
