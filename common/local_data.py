"""A data owner's own data as `fl-client --data PATH` reads it, with no conversion step: a shard written
by fl-partition, a CSV table, or pictures in one folder per class.

Labels come from the federation's config, not from what a client happens to hold: the server's `classes`
setting lists the class names in label order, so a client lacking a class still labels the others as
every other client does. Pictures are normalized with fixed constants (common.datasets.read_image) and
CSV features are taken as they are, never by a client's own statistics, which would differ from client
to client. Nothing is cached on disk: a client reads its data once.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from common.datasets import (
    ArrayData,
    DataError,
    class_folders,
    class_label,
    known_classes,
    read_image_folder,
)
from common.messages import TrainConfig, class_names
from common.partition import SHARD_ARRAYS, read_shard

LAYOUTS = ("a shard written by fl-partition (PATH/shard.npz and PATH/meta.json), "
           "a CSV table with a header row (PATH/NAME.csv, or the .csv file itself), "
           "or pictures in one folder per class (PATH/CLASS_NAME/*.jpg|png)")


def load_client_data(path: str | Path, cfg: TrainConfig) -> ArrayData:
    """The client's samples, labelled as the federation's config says; the kind of data is told by what
    PATH holds, in this order: shard.npz, a .csv table, class folders."""
    kind, where = data_layout(path)
    if kind == "shard":
        return read_shard(where)
    if kind == "table":
        return read_table(where, cfg)
    return read_pictures(where, cfg)


def data_layout(path: str | Path) -> tuple[str, Path]:
    """("shard" | "table" | "pictures", the file or folder to read): what fl-client checks when it starts,
    before the federation's config (which says how to read it) is known; DataError for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return "table", path
    if not path.exists():
        raise DataError(f"data {path} does not exist; give --data {LAYOUTS}")
    if not path.is_dir():
        raise DataError(f"data {path} is neither a folder nor a .csv file; give --data {LAYOUTS}")
    if (path / SHARD_ARRAYS).is_file():
        return "shard", path
    tables = sorted(p for p in path.iterdir()
                    if p.is_file() and p.suffix.lower() == ".csv" and not p.name.startswith("."))
    if len(tables) > 1:
        raise DataError(f"data folder {path} holds {len(tables)} CSV tables ({', '.join(p.name for p in tables)}); "
                        "keep one there, or give --data the .csv file to read")
    if tables:
        return "table", tables[0]
    if class_folders(path):
        return "pictures", path
    raise DataError(f"data folder {path} holds no shard, CSV table or class folders; give --data {LAYOUTS}")


def _class_names(cfg: TrainConfig) -> tuple[str, ...]:
    """The federation's class names, checked against its model's number of outputs."""
    try:
        names = class_names(cfg.classes)
    except ValueError as e:
        raise DataError(f"the server's `classes` setting is wrong: {e}") from None
    if names and len(names) != cfg.model.num_classes:
        raise DataError(f"the server's config disagrees with itself: `classes` names {len(names)} classes but its "
                        f"model has {cfg.model.num_classes}; ask its operator to list every class once in `classes`")
    return names


def read_pictures(root: Path, cfg: TrainConfig) -> ArrayData:
    """ROOT/CLASS_NAME/* pictures, converted and resized to the federation's (C, H, W) input."""
    spec = cfg.model
    shape = spec.input_shape
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise DataError(f"the federation's model takes samples of shape {list(shape)}, but pictures become "
                        "(channels, height, width) with 1 or 3 channels; give this client a CSV table or a shard")
    if spec.num_classes < 1:
        raise DataError("the federation's model has no classes, so class folders of pictures mean nothing to it; "
                        "give this client a CSV table with a target column")
    return read_image_folder(root, _class_names(cfg), spec.num_classes, shape[0], (shape[1], shape[2]))


def _shorten(columns: list[str], most: int = 12) -> str:
    shown = ", ".join(repr(c) for c in columns[:most])
    return shown if len(columns) <= most else f"{shown}, ... ({len(columns)} in all)"


def read_table(path: Path, cfg: TrainConfig) -> ArrayData:
    """A CSV table: a header row, the label column `cfg.label_column` and numeric feature columns, as
    many as the model's input has numbers. Labels are class names (or, with unnamed classes, numbers);
    with a model of no classes the column holds numeric targets (regression). Blank rows are skipped."""
    spec = cfg.model
    names = _class_names(cfg)
    size = math.prod(spec.input_shape)
    label_name = cfg.label_column.strip()
    xs: list[np.ndarray] = []
    ys: list[float] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: the byte-order mark spreadsheets write
            reader = csv.reader(f)
            header: list[str] | None = None
            label_at = 0
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if header is None:
                    header = [cell.strip() for cell in row]
                    label_at = _label_column(path, header, label_name)
                    if len(header) - 1 != size:
                        raise DataError(
                            f"{path} has {len(header) - 1} feature columns besides {label_name!r}, but the "
                            f"federation's model takes {size} numbers per sample (shape {list(spec.input_shape)}); "
                            "give the table exactly that many feature columns")
                    continue
                if len(row) != len(header):
                    raise DataError(f"line {line} of {path} has {len(row)} cells but the header has {len(header)} "
                                    "columns; give every row one cell per column")
                cells = row[:label_at] + row[label_at + 1:]
                xs.append(_features(path, line, header[:label_at] + header[label_at + 1:], cells))
                ys.append(_label(path, line, row[label_at].strip(), names, spec.num_classes))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read the CSV table {path} ({e}); save it as comma-separated UTF-8 text") from None
    if not xs:
        raise DataError(f"{path} has no rows of data under its header; give this client some samples")
    x = torch.from_numpy(np.stack(xs).reshape(-1, *spec.input_shape))
    if spec.num_classes == 0:
        return ArrayData(x, torch.tensor(ys, dtype=torch.float32), 0)
    return ArrayData(x, torch.tensor(ys, dtype=torch.int64), spec.num_classes)


def _label_column(path: Path, header: list[str], name: str) -> int:
    count = header.count(name)
    if count == 0:
        raise DataError(f"{path} has no column {name!r} in its header row ({_shorten(header)}); the first row must "
                        f"name the columns, one of them {name!r} for the labels (the server's `label_column`)")
    if count > 1:
        raise DataError(f"{path} has {count} columns named {name!r}; name the label column once")
    return header.index(name)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _number(text: str) -> float | None:
    """`text` as a float32-sized finite number, or None."""
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) and abs(number) <= FLOAT32_MAX else None


def _features(path: Path, line: int, columns: list[str], cells: list[str]) -> np.ndarray:
    try:
        values = np.array(cells, dtype=np.float32)  # one C loop per row, not one Python call per cell
        if np.isfinite(values).all():
            return values
    except ValueError:
        pass
    numbers = []
    for column, cell in zip(columns, cells):  # the slow way, to name the bad cell
        number = _number(cell)
        if number is None:
            raise DataError(f"line {line} of {path} has {cell.strip()!r} in column {column!r}, which is not a finite "
                            "number; every column but the label must hold numbers")
        numbers.append(number)
    return np.array(numbers, dtype=np.float32)


def _label(path: Path, line: int, value: str, names: tuple[str, ...], num_classes: int) -> float:
    if num_classes == 0:  # regression: the column is the target
        target = _number(value)
        if target is None:
            raise DataError(f"line {line} of {path} has target {value!r}, which is not a finite number; the "
                            "federation's model has no classes, so its label column holds numbers")
        return target
    label = class_label(value, names, num_classes)
    if label is None:
        raise DataError(f"line {line} of {path} has label {value!r}, which is none of "
                        f"{known_classes(names, num_classes)}; correct or remove the row")
    return label
