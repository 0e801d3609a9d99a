import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from common.datasets import IMAGE_EXTENSIONS, ArrayData, DataError, load_dataset
from common.local_data import load_client_data
from common.messages import ModelSpec, TrainConfig
from common.partition import write_shard
from fl_server import config
from fl_server.config import ConfigError

COLORS = {"cat": (250, 0, 0), "dog": (0, 250, 0), "bird": (0, 0, 250)}


def cfg_for(shape=(3, 8, 8), num_classes=3, classes="", label_column="label"):
    return TrainConfig(model=ModelSpec("cnn", shape, num_classes), classes=classes, label_column=label_column)


def pictures(root, counts, size=(12, 10), mode="RGB"):
    """root/NAME/i.png, each a plain picture of its class's color."""
    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            color = COLORS.get(name, (9, 9, 9))
            Image.new(mode, size, color if mode == "RGB" else sum(color) // 3).save(root / name / f"{i}.png")
    return root


def one_sentence(error):
    text = str(error.value)
    assert "\n" not in text and text.count(". ") == 0 and not text.endswith(".")
    return text


def test_labels_follow_the_federations_classes_not_the_folders_a_client_happens_to_hold(tmp_path):
    # This client has no cats: in folder order dog would be 0 and bird 1; the federation says 1 and 2.
    pictures(tmp_path, {"dog": 2, "bird": 3})
    data = load_client_data(tmp_path, cfg_for(classes="cat,dog,bird"))
    assert data.num_classes == 3 and data.x.shape == (5, 3, 8, 8) and data.x.dtype == torch.float32
    assert sorted(data.y.tolist()) == [1, 1, 2, 2, 2]
    greens = data.y == 1  # dog is green: fixed normalization, (pixel / 255 - 0.5) / 0.5
    assert torch.allclose(data.x[greens][:, 1], torch.tensor(250 / 255 * 2 - 1))
    assert torch.allclose(data.x[greens][:, 0], torch.tensor(-1.0))


def test_unnamed_classes_are_folder_numbers(tmp_path):
    pictures(tmp_path, {"2": 1, "0": 2})
    data = load_client_data(tmp_path, cfg_for(num_classes=3))
    assert sorted(data.y.tolist()) == [0, 0, 2]
    with pytest.raises(DataError, match="class numbers 0..1"):
        load_client_data(tmp_path, cfg_for(num_classes=2))


def test_a_folder_naming_an_unknown_class_is_a_one_sentence_error(tmp_path):
    pictures(tmp_path, {"cat": 1, "horse": 1})
    with pytest.raises(DataError) as error:
        load_client_data(tmp_path, cfg_for(classes="cat,dog,bird"))
    text = one_sentence(error)
    assert str(tmp_path / "horse") in text and "cat, dog, bird" in text and "`classes`" in text


def test_hidden_and_non_image_files_are_ignored_and_a_corrupt_picture_is_named(tmp_path):
    pictures(tmp_path, {"cat": 2})
    (tmp_path / "cat" / "notes.txt").write_text("not a picture")
    (tmp_path / "cat" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / ".git").mkdir()
    assert len(load_client_data(tmp_path, cfg_for(classes="cat,dog,bird"))) == 2
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg") as error:
        load_client_data(tmp_path, cfg_for(classes="cat,dog,bird"))
    assert "\n" not in str(error.value)


def test_grayscale_and_rgb_inputs_any_picture_size_resized(tmp_path):
    pictures(tmp_path, {"cat": 1}, size=(30, 7), mode="RGB")
    pictures(tmp_path, {"dog": 1}, size=(5, 5), mode="L")
    gray = load_client_data(tmp_path, cfg_for(shape=(1, 6, 4), classes="cat,dog,bird"))
    assert gray.x.shape == (2, 1, 6, 4)
    rgb = load_client_data(tmp_path, cfg_for(shape=(3, 16, 16), classes="cat,dog,bird"))
    assert rgb.x.shape == (2, 3, 16, 16)
    gray_dog = rgb.x[rgb.y == 1][0]  # a grayscale picture in RGB: three equal channels
    assert torch.equal(gray_dog[0], gray_dog[1]) and torch.equal(gray_dog[1], gray_dog[2])
    with pytest.raises(DataError, match="1 or 3 channels"):
        load_client_data(tmp_path, cfg_for(shape=(64,), classes="cat,dog,bird"))


def test_a_class_list_of_the_wrong_length_or_an_empty_folder(tmp_path):
    pictures(tmp_path, {"cat": 1})
    with pytest.raises(DataError, match="disagrees with itself"):
        load_client_data(tmp_path, cfg_for(num_classes=2, classes="cat,dog,bird"))
    (tmp_path / "cat" / "0.png").unlink()
    with pytest.raises(DataError, match="no pictures"):
        load_client_data(tmp_path, cfg_for(classes="cat,dog,bird"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="shard.npz.*CSV.*CLASS_NAME"):
        load_client_data(empty, cfg_for())
    with pytest.raises(DataError, match="does not exist"):
        load_client_data(tmp_path / "nowhere", cfg_for())
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="neither a folder nor a .csv file"):
        load_client_data(tmp_path / "notes.txt", cfg_for())


def write_csv(path, rows):
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_csv_with_class_names_and_with_numbers(tmp_path):
    rows = [["f0", "label", "f1", "f2", "f3"], [1, "dog", 2, 3, 4], [], [5, "bird", 6, 7, 8.5]]
    data = load_client_data(write_csv(tmp_path / "t.csv", rows), cfg_for((1, 2, 2), classes="cat,dog,bird"))
    assert data.y.tolist() == [1, 2] and data.x.shape == (2, 1, 2, 2)
    assert data.x[1].flatten().tolist() == [5, 6, 7, 8.5]
    (tmp_path / "n").mkdir()
    write_csv(tmp_path / "n" / "t.csv", [["y", "a", "b"], [2, 0.5, 1], [0, 1, 2]])
    data = load_client_data(tmp_path / "n", cfg_for((2,), label_column="y"))  # the folder holding it
    assert data.y.tolist() == [2, 0] and data.y.dtype == torch.int64
    with pytest.raises(DataError, match="line 3 .* label 'dog'.*class numbers 0..2"):
        load_client_data(write_csv(tmp_path / "w.csv", [["y", "a", "b"], [2, 0, 1], ["dog", 1, 2]]),
                         cfg_for((2,), label_column="y"))


def test_csv_regression_has_float_targets(tmp_path):
    path = write_csv(tmp_path / "r.csv", [["x1", "x2", "price"], [1, 2, 10.25], [3, 4, -1.5]])
    data = load_client_data(path, cfg_for((2,), num_classes=0, label_column="price"))
    assert data.y.dtype == torch.float32 and data.y.tolist() == [10.25, -1.5] and data.num_classes == 0
    assert data.subset([1]).y.tolist() == [-1.5]


@pytest.mark.parametrize("rows, message", [
    ([["a", "b", "c"], [1, 2, 0]], r"no column 'label' in its header row \('a', 'b', 'c'\)"),
    ([["a", "label", "b"], [1, 0, 2], [1, 0, "n/a"]], "line 3 .* 'n/a' in column 'b'"),
    ([["a", "label", "b"], [1, 0, 2], ["", 0, 2]], "line 3 .* '' in column 'a'"),
    ([["a", "label", "b"], [1, 0, "inf"]], "line 2 .* 'inf' in column 'b'"),
    ([["a", "label"], [1, 0]], "1 feature columns besides 'label', but the federation's model takes 2 numbers"),
    ([["a", "label", "b"], [1, 0]], "line 2 .* 2 cells but the header has 3 columns"),
    ([["a", "label", "b"]], "no rows of data"),
])
def test_csv_mistakes_are_one_sentence_errors(tmp_path, rows, message):
    with pytest.raises(DataError, match=message) as error:
        load_client_data(write_csv(tmp_path / "t.csv", rows), cfg_for((2,)))
    one_sentence(error)


def test_a_shard_is_still_read(tmp_path):
    shard = ArrayData(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 9]), 10)
    write_shard(tmp_path, shard, {})
    data = load_client_data(tmp_path, cfg_for((1, 8, 8), num_classes=10))
    assert torch.equal(data.x, shard.x) and torch.equal(data.y, shard.y)


def test_fractional_labels_only_without_classes():
    ArrayData(torch.zeros(2, 3), torch.zeros(2), 0)
    with pytest.raises(DataError, match="fractional labels"):
        ArrayData(torch.zeros(2, 3), torch.zeros(2), 4)


def test_the_server_reads_an_image_folder_as_clients_do(tmp_path):
    pictures(tmp_path, {name: 5 for name in COLORS})
    train, test = load_dataset(f"imagefolder:{tmp_path}")  # sorted names: bird, cat, dog
    assert train.num_classes == 3 and train.x.shape[1:] == (3, 32, 32)
    assert torch.allclose(train.x[train.y == 0][:, 2], torch.tensor(250 / 255 * 2 - 1))  # bird is blue
    train, test = load_dataset(f"imagefolder:{tmp_path}", classes="cat,dog,bird,fish")
    assert train.num_classes == 4 and sorted(set(test.y.tolist())) == [0, 1, 2]
    cfg = cfg_for((3, 32, 32), num_classes=4, classes="cat,dog,bird,fish")
    client = load_client_data(tmp_path, cfg)
    for label in range(3):  # the same picture is the same input on either side
        assert torch.equal(client.x[client.y == label][0], train.x[train.y == label][0])


def test_image_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS)


def test_classes_in_a_toml_config_may_be_a_list(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('classes = ["cat", "dog", "bird"]\nlabel_column = "species"\n')
    cfg = config.load(path)
    assert cfg.classes == "cat,dog,bird" and cfg.label_column == "species"
    assert cfg.train_config(ModelSpec("cnn", (3, 8, 8), 3)).classes == "cat,dog,bird"
    assert config.load(classes=" cat, dog ").train_config(ModelSpec("cnn", (3, 8, 8), 2)).classes == "cat,dog"


@pytest.mark.parametrize("value, message", [
    (["cat", "dog", "cat"], "repeat cat"),
    (["cat", ""], "empty one"),
    (["cat", "dog,wolf"], "'dog,wolf' holds a comma"),
    (["cat", 3], "expected class names"),
    ("cat,,dog", "empty one"),
])
def test_classes_that_cannot_name_labels_are_refused(tmp_path, value, message):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"classes": value}))
    with pytest.raises(ConfigError, match=message):
        config.load(path)


def test_new_settings_at_their_defaults_leave_the_resume_hash_alone():
    assert config.config_hash(config.load(classes="", label_column="label")) == "9d54ceb5e5cba560"
    assert config.config_hash(config.load(classes="a,b")) != "9d54ceb5e5cba560"
    assert config.config_hash(config.load(label_column="y")) != "9d54ceb5e5cba560"


def test_layout_precedence_a_csv_beside_class_folders(tmp_path):
    pictures(tmp_path, {"cat": 1})
    write_csv(tmp_path / "t.csv", [["label", "a", "b"], ["dog", 1, 2]])
    assert load_client_data(tmp_path, cfg_for((2,), classes="cat,dog,bird")).y.tolist() == [1]
    write_csv(tmp_path / "u.csv", [["label", "a", "b"], ["dog", 1, 2]])
    with pytest.raises(DataError, match="2 CSV tables"):
        load_client_data(tmp_path, cfg_for((2,), classes="cat,dog,bird"))
    assert np.isfinite(load_client_data(tmp_path / "u.csv", cfg_for((2,), classes="cat,dog,bird")).x.numpy()).all()
