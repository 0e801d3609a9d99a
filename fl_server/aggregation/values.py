"""Integer and boolean tensors in an update: the client's new values, combined exactly.

In an update (Encoding.DIFF), floating-point tensors are local - global; integer and boolean tensors
(BatchNorm's `num_batches_tracked`, a model's uint8 or bool buffers) are the client's new values, in
their own dtype: a diff of them would wrap around (uint8: 3 - 5 = 254) or not exist at all (torch has
no bool subtraction). A rule combines those values with its own statistic (FedAvg: the sample-weighted
mean; median; trimmed mean; the Krum-chosen updates' mean), and the result is:

- for integers, that statistic rounded half to even (as torch.round), in the tensor's dtype;
- for bools, True when the statistic of the values (as 0 and 1) is above 1/2, False below, and the
  current global value on a tie.

Exactly: the values are combined as offsets from a reference (one client's values), in float64, so
int64 counters at 2**40 or beyond average without loss while clients' values lie within 2**53 of each
other. Values further apart than int64 can express saturate rather than wrap.
"""
from __future__ import annotations

import torch

_MIN, _MAX = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
_LIMIT = 2.0 ** 62  # offsets beyond this (values spread over int64's whole range) are clamped to it


def is_value(tensor_or_dtype: torch.Tensor | torch.dtype) -> bool:
    """Whether an update carries this tensor's new values (integers, bools) rather than a diff (floats)."""
    dtype = tensor_or_dtype.dtype if isinstance(tensor_or_dtype, torch.Tensor) else tensor_or_dtype
    return not dtype.is_floating_point


def reference_of(values: torch.Tensor) -> torch.Tensor:
    """A reference to take offsets from: `values` as int64 (a copy)."""
    return values.to(torch.int64, copy=True)


def offsets(values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`values - reference` in float64: exact while the difference is below 2**53 in magnitude, and
    saturated at int64's range rather than wrapped around."""
    a = values.to(torch.int64)
    d = a - reference
    overflow = ((a ^ reference) & (a ^ d)) < 0
    if bool(overflow.any()):
        d = torch.where(overflow, torch.where(a < 0, _MIN, _MAX), d)
    return d.to(torch.float64)


def _saturating_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = a + b
    overflow = ((a ^ total) & (b ^ total)) < 0
    if bool(overflow.any()):
        total = torch.where(overflow, torch.where(a < 0, _MIN, _MAX), total)
    return total


def settle(reference: torch.Tensor, offset: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """The new value of an integer or bool tensor whose clients' combined value is `reference + offset`
    (int64 reference, float64 offset): rounded half to even for integers, the majority for bools (a tie
    keeps `current`); in `current`'s dtype and shape."""
    offset = offset.reshape(current.shape)
    reference = reference.reshape(current.shape)
    if current.dtype == torch.bool:
        value = reference.to(torch.float64) + offset  # 0 or 1 plus an offset within [-1, 1]: exact
        return torch.where(value == 0.5, current, value > 0.5)
    offset = offset.clamp(-_LIMIT, _LIMIT)
    whole = offset.floor()
    fraction = offset - whole
    base = _saturating_add(reference, whole.to(torch.int64))
    up = (fraction > 0.5) | ((fraction == 0.5) & (base % 2 != 0))  # half to even, as torch.round
    new = _saturating_add(base, up.to(torch.int64))
    info = torch.iinfo(current.dtype)
    return new.clamp_(info.min, info.max).to(current.dtype)
