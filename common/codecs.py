"""Update compression, negotiated through the round's config (`compression`).

A codec turns a client's dense diff into the tensors that travel ("wire tensors") and back. Which wire
tensors a codec sends follows from the model's tensor specs alone, so the server knows their exact
names, dtypes and shapes before the first byte arrives and refuses anything else.

- `none`: the diff as it is.
- `float16`, `bfloat16`: floating tensors in half precision (2x fewer bytes).
- `int8`: floating tensors quantized to int8 with one float32 scale per tensor (about 4x fewer bytes).
- `topk:R`: of each floating tensor, only the fraction R of entries largest in magnitude, as values and
  int32 indices, with error feedback: what was not sent is kept by the client and added to its next
  diff (Stich et al., 2018, "Sparsified SGD with Memory"), so small changes are delayed, not lost.

Integer and bool tensors (BatchNorm's counters, uint8 or bool buffers) always travel as they are: they
are the client's new values, not diffs (fl_server/aggregation/values.py), and take no part in top-k's
error feedback.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from common.tensors import DTYPES, TensorSpec

SCALE, VALUES, INDICES = "#scale", "#values", "#indices"  # suffixes of the extra wire tensors
_FLOAT_TYPES = ("float32", "float64", "float16", "bfloat16")


class CodecError(ValueError):
    """Wire tensors that do not decode (indices out of range, bad scale...)."""


@dataclass(frozen=True)
class Codec:
    name: str  # "none", "float16", "bfloat16", "int8" or "topk"
    ratio: float = 1.0  # topk only: fraction of entries sent

    def __str__(self) -> str:
        return f"topk:{self.ratio:g}" if self.name == "topk" else self.name


def parse(text: str) -> Codec:
    text = text.strip() or "none"
    if text in ("none", "float16", "bfloat16", "int8"):
        return Codec(text)
    if text.startswith("topk:"):
        try:
            ratio = float(text[5:])
        except ValueError:
            ratio = -1.0
        if 0 < ratio <= 1:
            return Codec("topk", ratio)
    raise ValueError(f"unknown compression {text!r}; use none, float16, bfloat16, int8 or topk:R with 0 < R <= 1")


def _compressible(spec: TensorSpec) -> bool:
    return spec.dtype in _FLOAT_TYPES and spec.numel > 0


def _k(spec: TensorSpec, ratio: float) -> int:
    return max(1, math.ceil(ratio * spec.numel))


def wire_specs(model_specs: list[TensorSpec], codec: Codec) -> list[TensorSpec]:
    """Exactly the tensors a client sends for a model with `model_specs` under `codec`, in order."""
    out: list[TensorSpec] = []
    for spec in model_specs:
        if codec.name == "none" or not _compressible(spec):
            out.append(spec)
        elif codec.name in ("float16", "bfloat16"):
            out.append(TensorSpec(spec.name, codec.name, spec.shape))
        elif codec.name == "int8":
            out += [TensorSpec(spec.name, "int8", spec.shape), TensorSpec(spec.name + SCALE, "float32", ())]
        else:
            k = _k(spec, codec.ratio)
            out += [TensorSpec(spec.name + VALUES, "float32", (k,)), TensorSpec(spec.name + INDICES, "int32", (k,))]
    return out


def encode(diff: Mapping[str, torch.Tensor], codec: Codec,
           residual: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The wire tensors for `diff`. For topk, `residual` (the error-feedback memory, updated in place)
    is added before selecting and keeps what was not sent."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in diff.items():
        spec = TensorSpec.of(name, tensor)
        if codec.name == "none" or not _compressible(spec):
            out[name] = tensor
        elif codec.name in ("float16", "bfloat16"):
            out[name] = tensor.to(DTYPES[codec.name])
        elif codec.name == "int8":
            peak = float(tensor.abs().max())
            scale = peak / 127.0 if peak > 0 else 1.0
            out[name] = torch.round(tensor.float() / scale).clamp_(-127, 127).to(torch.int8)
            out[name + SCALE] = torch.tensor(scale, dtype=torch.float32)
        else:
            flat = tensor.float().reshape(-1)
            if residual is not None and name in residual:
                flat = flat + residual[name]
            indices = torch.topk(flat.abs(), _k(spec, codec.ratio), sorted=False).indices
            values = flat[indices]
            if residual is not None:
                kept = flat.clone()
                kept[indices] = 0.0
                residual[name] = kept
            out[name + VALUES] = values.contiguous()
            out[name + INDICES] = indices.to(torch.int32)
    return out


def decode(wire: Mapping[str, torch.Tensor], model_specs: list[TensorSpec], codec: Codec) -> dict[str, torch.Tensor]:
    """The dense diff, in the model's dtypes. `wire` must already match `wire_specs` exactly."""
    out: dict[str, torch.Tensor] = {}
    for spec in model_specs:
        dtype = DTYPES[spec.dtype]
        if codec.name == "none" or not _compressible(spec):
            out[spec.name] = wire[spec.name]
        elif codec.name in ("float16", "bfloat16"):
            out[spec.name] = wire[spec.name].to(dtype)
        elif codec.name == "int8":
            scale = float(wire[spec.name + SCALE])
            if not math.isfinite(scale) or scale < 0:
                raise CodecError(f"tensor {spec.name!r} has an invalid int8 scale {scale}")
            out[spec.name] = (wire[spec.name].float() * scale).to(dtype)
        else:
            indices = wire[spec.name + INDICES].long()
            if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= spec.numel):
                raise CodecError(f"tensor {spec.name!r} has top-k indices outside 0..{spec.numel - 1}")
            dense = torch.zeros(spec.numel, dtype=torch.float32)
            dense[indices] = wire[spec.name + VALUES]
            out[spec.name] = dense.reshape(spec.shape).to(dtype)
    return out
