"""FedAvg over diffs, as a running weighted sum: memory is one model, not one per client.

    global <- global + server_lr * sum_i(n_i * diff_i) / sum_i(n_i)

(McMahan et al., 2017, with the server learning rate of Reddi et al., 2021, "Adaptive Federated
Optimization"; server_lr = 1 is plain FedAvg, and the seed's `lambda`.)

Integer and bool tensors arrive as the clients' values, not diffs (values.py): they take the
sample-weighted mean of the values, rounded (integers), or the weighted majority (bools; a tie keeps
the current value). The server optimizer does not touch them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from common.tensors import DTYPES, TensorSpec
from fl_server.aggregation.base import (
    MAX_WEIGHTED_MAGNITUDE,
    UpdateRejected,
    accumulator_dtype,
    check_update,
    check_weight,
)
from fl_server.aggregation.optimizers import OptimizerState, ServerOptimizer
from fl_server.aggregation.values import is_value, offsets, reference_of, settle


class FedAvg(OptimizerState):
    """Sample-weighted mean of diffs, folded in one update at a time (the Aggregator protocol)."""

    def __init__(self, specs: list[TensorSpec], server_lr: float = 1.0, optimizer: ServerOptimizer | None = None):
        self.specs = specs
        self.optimizer = optimizer or ServerOptimizer("fedavg", server_lr)
        self._sums: dict[str, torch.Tensor] = {}
        # Integer and bool tensors: the first update's values, which the sums hold offsets from (exact
        # for large counters; see values.py).
        self._references: dict[str, torch.Tensor] = {}
        # A global state that finish() replaced: its memory becomes the next round's sums, so that rounds
        # do not keep asking the allocator for a fresh model's worth of memory (which, across threads, it
        # tends to hold on to rather than reuse).
        self._spare: Mapping[str, torch.Tensor] | None = None
        self.total_weight = 0
        self.count = 0

    def begin_round(self) -> None:
        """Zeroed sums, ready before the first update arrives: zeroing a model costs page faults, which
        the round state pays while clients train rather than when the first update lands."""
        spare, self._spare = self._spare, None
        self._sums = self._empty_sums(spare)
        self._references = {}
        self.total_weight = 0
        self.count = 0

    def discard(self) -> None:
        self._sums = {}
        self._references = {}
        self.total_weight = 0
        self.count = 0

    def _empty_sums(self, spare: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        sums = {}
        for s in self.specs:
            dtype = accumulator_dtype(DTYPES[s.dtype])
            old = spare.get(s.name) if spare is not None else None
            if old is not None and old.dtype == dtype and old.shape == s.shape and old.is_contiguous():
                sums[s.name] = old.zero_()
            else:
                sums[s.name] = torch.zeros(s.shape, dtype=dtype)
        return sums

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        largest = check_update(diff, self.specs, largest)
        check_weight(weight)
        if largest * weight > MAX_WEIGHTED_MAGNITUDE:
            raise UpdateRejected(f"update values up to {largest:.3g} weighted by {weight} samples would overflow "
                                 "the aggregate")

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        self._accumulate(diff.items(), weight)
        self.total_weight += weight
        self.count += 1

    def _accumulate(self, tensors: Iterable[tuple[str, torch.Tensor]], alpha: float) -> None:
        """sums[name] += alpha * tensor, in the accumulator's dtype; for an integer or bool tensor (values),
        alpha * its offset from the round's reference values."""
        if not self._sums:
            self._sums = self._empty_sums()
        for name, tensor in tensors:
            acc = self._sums[name]
            if is_value(tensor):
                reference = self._references.get(name)
                if reference is None:
                    reference = self._references[name] = reference_of(tensor)
                acc.add_(offsets(tensor, reference), alpha=alpha)
            else:
                acc.add_(tensor.to(acc.dtype), alpha=alpha)

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new state is computed in the sums' own memory (no second model-sized allocation)."""
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        new_state = {}
        for name, current in global_state.items():
            mean = self._sums[name].div_(self.total_weight)
            if current.is_floating_point():
                new_state[name] = self.optimizer.move(name, mean, current)
            else:
                # The weighted mean of the values, rounded (not truncated), or the weighted majority.
                new_state[name] = settle(self._references[name], mean, current)
        self.discard()
        self._spare = global_state
        return new_state

    def memory_claim(self) -> int:
        """The sums, the integer and bool tensors' int64 reference values, plus the server optimizer's
        moments (one accumulator-sized copy of each float tensor)."""
        sums = sum(s.numel * accumulator_dtype(DTYPES[s.dtype]).itemsize for s in self.specs)
        floats = sum(s.numel * accumulator_dtype(DTYPES[s.dtype]).itemsize for s in self.specs
                     if DTYPES[s.dtype].is_floating_point)
        references = sum(s.numel * 8 for s in self.specs if is_value(DTYPES[s.dtype]))
        return sums + references + self.optimizer.moments() * floats
