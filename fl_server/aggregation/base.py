"""The contract every aggregation rule keeps, and the checks they share.

A round drives an aggregator in this order: `begin_round`; then, for each update a client sends,
`check` (on the upload's own thread, possibly beside other checks and a fold) and, if it passed,
`fold` (one at a time, on the round's fold thread); then `finish` once at least one update was folded,
or `discard` if the round closes without aggregating. The round state holds the lock that keeps folds,
`begin_round`, `finish` and `discard` apart; an aggregator need not lock anything itself.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch

from common.tensors import TensorSpec, largest_abs, specs_of


class UpdateRejected(ValueError):
    """An update that must not touch the model (wrong tensors, NaN or Inf...)."""


@runtime_checkable
class Aggregator(Protocol):
    """How a round's updates become the next global model. An update holds local - global for each
    floating-point tensor and the client's new values for each integer or bool tensor (values.py).

    - `check` raises UpdateRejected unless the update can be folded in, and changes nothing: a rejected
      update leaves the aggregate exactly as it was, and an update that passed cannot fail to fold.
      `largest` is the update's largest magnitude when its values were already checked for NaN and Inf
      as they streamed in (tensors.PayloadReceiver), which saves a second pass over them.
    - `finish(global_state)` returns the new global state and empties the aggregator. It does not
      change `global_state` before returning, but takes it over: its memory may become the next
      round's sums at the next `begin_round`, so the caller must not read it after that.
    - `state_dict` / `load_state_dict`: what must survive a server restart (a server optimizer's
      moments), saved in every checkpoint.
    - `memory_claim()`: the most RAM, in bytes, the aggregator holds during a round whatever the number
      of updates folded (the contract test checks it).
    """

    specs: list[TensorSpec]

    def begin_round(self) -> None: ...

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None: ...

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None: ...

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def discard(self) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def memory_claim(self) -> int: ...


def add(aggregator: Aggregator, diff: Mapping[str, torch.Tensor], weight: int) -> None:
    """Check, then fold: the one-thread path (the tests; the round state checks and folds on different threads)."""
    aggregator.check(diff, weight)
    aggregator.fold(diff, weight)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Integer and bool buffers (their values' offsets, see values.py) and float64 are summed in float64,
    # so that integer means are exact enough to round back; half precisions are summed in float32 to
    # avoid overflow. It is also the precision a rule adds its step to the model in.
    return torch.float32 if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64


# A weighted value beyond this could overflow the float32 running sum (to Inf) once a million such
# updates are added: finite, yet enough to destroy the model.
MAX_WEIGHTED_MAGNITUDE = float(torch.finfo(torch.float32).max) / 1e6


def spec_mismatch(got: list[TensorSpec], expected: list[TensorSpec]) -> str | None:
    """None when `got` is exactly `expected`; otherwise the first difference, in words."""
    if got == expected:
        return None
    wanted = {s.name: s for s in expected}
    for spec in got:
        if spec.name not in wanted:
            return f"update has tensor {spec.name!r}, which the model does not have"
        w = wanted[spec.name]
        if spec != w:
            return f"tensor {spec.name!r} is {spec.dtype}{list(spec.shape)}, the model's is {w.dtype}{list(w.shape)}"
    names = {s.name for s in got}
    missing = [s.name for s in expected if s.name not in names]
    if missing:
        return f"update lacks tensors {missing[:5]}"
    return "update lists the model's tensors in another order"


def largest_magnitude(name: str, tensor: torch.Tensor) -> float:
    """The largest absolute value of a floating-point tensor (0 for others); UpdateRejected if it holds
    NaN or Inf."""
    if not (tensor.is_floating_point() and tensor.numel()):
        return 0.0
    largest = largest_abs(tensor.detach().cpu())
    if largest == math.inf:
        raise UpdateRejected(f"tensor {name!r} holds NaN or Inf")
    return largest


def check_update(diff: Mapping[str, torch.Tensor], expected: list[TensorSpec], largest: float | None = None) -> float:
    """Raise UpdateRejected unless `diff` has exactly the expected tensors, all finite; return the
    largest magnitude among its floating-point values (`largest` when it is already known)."""
    mismatch = spec_mismatch(specs_of(diff), expected)
    if mismatch:
        raise UpdateRejected(mismatch)
    if largest is not None:
        return largest
    return max((largest_magnitude(name, tensor) for name, tensor in diff.items()), default=0.0)


def check_weight(weight: int) -> None:
    if weight <= 0:
        raise UpdateRejected(f"update weight (num_samples) must be positive, got {weight}")
