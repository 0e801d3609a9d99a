"""The weights a run starts from (`initial_weights`): a PyTorch state_dict or a .safetensors file.

PyTorch files are read with `torch.load(weights_only=True)`, which builds tensors and plain containers
and runs no code from the file. The safetensors package is not a dependency: its format is small enough
to read here (`read_safetensors`), and its bytes are only ever reinterpreted as numbers. Every error is
one sentence naming the file (WeightsError).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.logs import brief
from common.tensors import DTYPES

# safetensors' dtype names of the dtypes the federation carries (common.tensors.DTYPES).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit on the JSON header
# Limits of the wire format (common/convert.py): a state the clients could not receive is refused here.
MAX_TENSORS = 100_000
MAX_NAME_LENGTH = 1_000
_SUPPORTED = set(DTYPES.values())


class WeightsError(ValueError):
    """An initial_weights file that cannot be read or does not fit; the message names the file."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`: safetensors for a `.safetensors` file, else a PyTorch file. Every value a
    contiguous CPU tensor of a dtype the federation carries."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _checked(path, read_safetensors(path))
    return _checked(path, _state_dict_in(path, _torch_load(path)))


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except OSError as e:
        raise WeightsError(f"cannot read initial_weights {path}: {e.strerror}; check the path") from None
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a foreign or damaged file
        raise WeightsError(f"cannot read initial_weights {path} with torch.load(weights_only=True) ({brief(e)}); "
                           "give a file written by torch.save(model.state_dict(), path), or a .safetensors "
                           "file") from None


def _state_dict_in(path: Path, obj: Any) -> Mapping[str, Any]:
    """A state dict, or a training checkpoint holding one under "state_dict" or "model"."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return obj[key]
    raise WeightsError(f"initial_weights {path} holds a {type(obj).__name__}, not a state_dict; give a dict of "
                       "tensors (torch.save(model.state_dict(), path)), or one under a 'state_dict' or "
                       "'model' key")


def _checked(path: Path, state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not state:
        raise WeightsError(f"initial_weights {path} holds no tensors; give the state_dict of a model")
    if len(state) > MAX_TENSORS:
        raise WeightsError(f"initial_weights {path} holds {len(state)} tensors, more than the {MAX_TENSORS} a "
                           "model may have on the wire")
    out = {}
    for name, tensor in state.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
            raise WeightsError(f"initial_weights {path} has a tensor named {str(name)[:80]!r}; names must be "
                               f"strings of 1 to {MAX_NAME_LENGTH} characters")
        if not isinstance(tensor, torch.Tensor):
            raise WeightsError(f"initial_weights {path}: {name!r} is a {type(tensor).__name__}, not a tensor; "
                               "give the state_dict of a model, which holds tensors only")
        if tensor.dtype not in _SUPPORTED:
            raise WeightsError(f"initial_weights {path}: tensor {name!r} is {tensor.dtype}, which the federation "
                               f"cannot carry; convert it to one of {', '.join(DTYPES)}")
        out[name] = tensor.detach().cpu().contiguous()
    return out


def fit_to_model(path: str | Path, state: Mapping[str, torch.Tensor], model: nn.Module,
                 model_name: str) -> dict[str, torch.Tensor]:
    """`model` loaded with `state` (strict: the same names and shapes; values are cast to the model's
    dtypes), and its state dict; WeightsError naming the first tensor that differs."""
    own = model.state_dict()
    problem = _first_difference(own, state)
    if problem is None:
        try:
            model.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - a module's own loading hooks may refuse
            problem = brief(e)
    if problem is not None:
        raise WeightsError(f"initial_weights {path} do not fit model {model_name!r}: {problem}; give weights "
                           "saved from this model, built with the same input_shape and num_classes")
    return model.state_dict()


def _first_difference(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    for name, tensor in own.items():
        if name not in state:
            return f"the model has tensor {name!r}, which the file lacks"
        if state[name].shape != tensor.shape:
            return f"tensor {name!r} is {list(state[name].shape)} in the file but {list(tensor.shape)} in the model"
    extra = next((name for name in state if name not in own), None)
    return None if extra is None else f"the file has tensor {extra!r}, which the model lacks"


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file's tensors, in the header's order: an 8-byte little-endian header length, a JSON
    header {name: {"dtype", "shape", "data_offsets": [begin, end]}} (its "__metadata__" is ignored), then
    the tensors' raw little-endian bytes, offsets counted from the end of the header."""
    path = Path(path)

    def bad(what: str) -> WeightsError:
        return WeightsError(f"initial_weights {path} is not a valid safetensors file: {what}; write it again "
                            "(safetensors.torch.save_file), or give a PyTorch state_dict")

    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; `with` would nest every check one level deeper
    except OSError as e:
        raise WeightsError(f"cannot read initial_weights {path}: {e.strerror}; check the path") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"it has {size} bytes, fewer than the 8 of its header's length")
        header_bytes = int.from_bytes(head, "little")
        if header_bytes > MAX_HEADER_BYTES:
            raise bad(f"its header would be {header_bytes} bytes, more than the format allows")
        if 8 + header_bytes > size:
            raise bad(f"its header of {header_bytes} bytes runs past the end of the file ({size} bytes): it is "
                      "truncated")
        try:
            header = json.loads(f.read(header_bytes).decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"its header is not JSON ({brief(e)})") from None
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        header.pop("__metadata__", None)
        data_bytes = size - 8 - header_bytes
        entries = []
        for name, entry in header.items():
            problem, parsed = _entry(entry)
            if problem is not None:
                raise bad(f"tensor {name!r} {problem}")
            dtype, shape, begin, end = parsed
            if end > data_bytes:
                raise bad(f"tensor {name!r} ends at byte {end} of the data, which has {data_bytes}: the file is "
                          "truncated")
            entries.append((name, dtype, shape, begin, end))
        state = {}
        for name, dtype, shape, begin, end in entries:
            f.seek(8 + header_bytes + begin)
            raw = bytearray(end - begin)
            if f.readinto(raw) != len(raw):
                raise bad(f"tensor {name!r} could not be read in full: the file is truncated")
            state[name] = _tensor(raw, dtype, shape)
            if dtype == torch.bool and bool((state[name].view(torch.uint8) > 1).any()):
                raise bad(f"tensor {name!r} is BOOL but holds bytes other than 0 and 1")
    return state


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(entry: Any) -> tuple[str | None, Any]:
    """(problem, None) or (None, (dtype, shape, begin, end)) for one header entry."""
    if not isinstance(entry, dict):
        return "is not described by a JSON object", None
    dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        return (f"has dtype {entry.get('dtype')!r}; the federation carries {', '.join(SAFETENSORS_DTYPES)}",
                None)
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        return f"has shape {shape!r}, not a list of whole numbers", None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end", None
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        return f"has {end - begin} bytes of data, but its shape {shape} of {entry['dtype']} needs {expected}", None
    return None, (dtype, tuple(shape), begin, end)


def _tensor(raw: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not raw:  # torch.frombuffer refuses an empty buffer
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=dtype).reshape(shape)
