"""Byzantine-robust rules, which need every update of the round at once: coordinate-wise median,
trimmed mean (Yin et al., 2018), Krum and multi-Krum (Blanchard et al., 2017)."""
from __future__ import annotations

import tempfile
from collections.abc import Mapping

import numpy as np
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
from fl_server.aggregation.values import is_value, offsets, settle

ROBUST_RULES = ("median", "trimmed_mean", "krum", "multikrum")


class RobustAggregator(OptimizerState):
    """Floating-point diffs are spilled to a `numpy.memmap` on disk, one float32 row per client, so the
    server holds one model in RAM whatever the number of clients; the step the rule computes is added to
    the model in the model's own precision (float64 for a float64 model). Integer and bool tensors are
    the clients' values (values.py), tiny in real models: they are held in RAM as int64 rows, exactly, and
    take the same rule's statistic of the values. Sample counts do not weight these rules: a weight is
    what a liar would inflate."""

    COLUMNS = 1 << 20  # columns processed at a time: bounds the memory of sorting and distances

    def __init__(self, specs: list[TensorSpec], rule: str, params: tuple[float, ...], capacity: int,
                 optimizer: ServerOptimizer | None = None):
        self.specs, self.rule, self.params, self.capacity = specs, rule, params, capacity
        self.optimizer = optimizer or ServerOptimizer("fedavg", 1.0)
        # Each tensor's first column among the float rows (diffs) or the int64 rows (values).
        self.starts: list[int] = []
        self.total = self.value_total = 0
        for spec in specs:
            if is_value(DTYPES[spec.dtype]):
                self.starts.append(self.value_total)
                self.value_total += spec.numel
            else:
                self.starts.append(self.total)
                self.total += spec.numel
        self._rows: np.memmap | None = None
        self._values: np.ndarray | None = None
        self.count = 0

    def _spill_file(self) -> np.memmap:
        if self._rows is None:
            # An anonymous temporary file: deleted when closed, never left behind by a crash.
            self._file = tempfile.TemporaryFile(prefix="fl-updates-")  # noqa: SIM115 - open as long as the aggregator
            self._rows = np.memmap(self._file, dtype=np.float32, mode="w+",
                                   shape=(max(self.capacity, 1), max(self.total, 1)))
        return self._rows

    def _value_rows(self) -> np.ndarray:
        if self._values is None:
            self._values = np.zeros((max(self.capacity, 1), self.value_total), dtype=np.int64)
        return self._values

    def begin_round(self) -> None:
        self._spill_file()
        self._value_rows()
        self.count = 0

    def discard(self) -> None:
        self.count = 0

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        largest = check_update(diff, self.specs, largest)
        check_weight(weight)
        if largest > MAX_WEIGHTED_MAGNITUDE:
            raise UpdateRejected(f"update values up to {largest:.3g} would overflow the aggregate")
        if self.count >= self.capacity:
            raise UpdateRejected(f"this round already holds {self.capacity} updates")

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        row, values = self._spill_file()[self.count], self._value_rows()[self.count]
        for spec, start in zip(self.specs, self.starts):
            tensor = diff[spec.name].reshape(-1)
            if is_value(tensor):
                values[start:start + spec.numel] = tensor.to(torch.int64).numpy()
            else:
                row[start:start + spec.numel] = tensor.to(torch.float32).numpy()
        self.count += 1

    def _value_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The round's integer and bool values as float64 offsets from the first update's (exact for
        values within 2**53 of each other), and those reference values (int64)."""
        rows = torch.from_numpy(self._value_rows()[:self.count])
        reference = rows[0].clone()
        return offsets(rows, reference), reference

    def _chosen(self, value_offsets: np.ndarray) -> np.ndarray | None:
        """Krum and multi-Krum: the indices of the updates the rule keeps, in order; None for other rules."""
        if self.rule not in ("krum", "multikrum"):
            return None
        rows, n, f = self._spill_file(), self.count, int(self.params[0])
        gram = np.zeros((n, n))
        for start in range(0, self.total, self.COLUMNS):
            block = np.asarray(rows[:n, start:start + self.COLUMNS], dtype=np.float64)
            gram += block @ block.T
        norms = np.diag(gram)
        distances = np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0)
        # Integer and bool values: their differences (which are the diffs' differences), directly, not
        # through a Gram matrix whose squares of large counters would cancel catastrophically.
        for i in range(n if value_offsets.shape[1] else 0):
            distances[i] += np.square(value_offsets - value_offsets[i]).sum(axis=1)
        neighbours = max(n - f - 2, 1)
        scores = [np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)]
        keep = 1 if self.rule == "krum" else min(int(self.params[1]), n)
        return np.sort(np.argsort(scores)[:keep])

    def _statistic(self, block: np.ndarray, chosen: np.ndarray | None) -> np.ndarray:
        """The rule's per-column statistic of `block` (one row per update)."""
        if chosen is not None:
            return np.asarray(block[chosen], dtype=np.float64).mean(axis=0)
        if self.rule == "median":
            return np.median(block, axis=0)
        n = block.shape[0]
        cut = int(self.params[0] * n)
        return np.sort(block, axis=0)[cut:n - cut].mean(axis=0)

    def _aggregate(self, chosen: np.ndarray | None) -> np.ndarray:
        """The rule's statistic of the float diffs, in float32."""
        rows, n = self._spill_file(), self.count
        out = np.empty(self.total, dtype=np.float32)
        for start in range(0, self.total, self.COLUMNS):
            block = np.asarray(rows[:n, start:start + self.COLUMNS])
            out[start:start + block.shape[1]] = self._statistic(block, chosen)
        return out

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        value_offsets, reference = self._value_offsets()
        chosen = self._chosen(value_offsets.numpy())
        aggregate = torch.from_numpy(self._aggregate(chosen))
        value_aggregate = torch.zeros(0, dtype=torch.float64)
        if self.value_total:
            value_aggregate = torch.from_numpy(np.asarray(self._statistic(value_offsets.numpy(), chosen),
                                                          dtype=np.float64))
        new_state = {}
        for spec, start in zip(self.specs, self.starts):
            current = global_state[spec.name]
            columns = slice(start, start + spec.numel)
            if current.is_floating_point():
                # Added in the model's precision: a float64 model keeps its float64 values.
                step = aggregate[columns].reshape(spec.shape).to(accumulator_dtype(current.dtype), copy=True)
                new_state[spec.name] = self.optimizer.move(spec.name, step, current)
            else:
                new_state[spec.name] = settle(reference[columns], value_aggregate[columns], current)
        self.discard()
        return new_state

    def memory_claim(self) -> int:
        """Float updates live on disk; RAM holds the integer and bool values (int64, one row per update),
        the server optimizer's moments (in the model's precision), and one float32 aggregate while
        finish() runs."""
        floats = [s for s in self.specs if not is_value(DTYPES[s.dtype])]
        moments = sum(s.numel * accumulator_dtype(DTYPES[s.dtype]).itemsize for s in floats)
        return (4 * sum(s.numel for s in floats) + self.optimizer.moments() * moments
                + 8 * self.value_total * max(self.capacity, 1))
