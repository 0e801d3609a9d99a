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
from fl_server.aggregation.optimizers import ServerOptimizer

ROBUST_RULES = ("median", "trimmed_mean", "krum", "multikrum")


class RobustAggregator:
    """Updates are spilled to a `numpy.memmap` on disk, one float32 row per client, so the server holds
    one model in RAM whatever the number of clients. Sample counts do not weight these rules: a weight is
    what a liar would inflate."""

    COLUMNS = 1 << 20  # columns processed at a time: bounds the memory of sorting and distances

    def __init__(self, specs: list[TensorSpec], rule: str, params: tuple[float, ...], capacity: int,
                 optimizer: ServerOptimizer | None = None):
        self.specs, self.rule, self.params, self.capacity = specs, rule, params, capacity
        self.optimizer = optimizer or ServerOptimizer("fedavg", 1.0)
        self.offsets, total = [], 0
        for spec in specs:
            self.offsets.append(total)
            total += spec.numel
        self.total = total
        self._rows: np.memmap | None = None
        self.count = 0

    def _spill_file(self) -> np.memmap:
        if self._rows is None:
            # An anonymous temporary file: deleted when closed, never left behind by a crash.
            self._file = tempfile.TemporaryFile(prefix="fl-updates-")  # noqa: SIM115 - open as long as the aggregator
            self._rows = np.memmap(self._file, dtype=np.float32, mode="w+",
                                   shape=(max(self.capacity, 1), max(self.total, 1)))
        return self._rows

    def begin_round(self) -> None:
        self._spill_file()
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
        row = self._spill_file()[self.count]
        for spec, offset in zip(self.specs, self.offsets):
            row[offset:offset + spec.numel] = diff[spec.name].reshape(-1).to(torch.float32).numpy()
        self.count += 1

    def _aggregate(self) -> np.ndarray:
        rows, n = self._spill_file(), self.count
        if self.rule in ("krum", "multikrum"):
            f = int(self.params[0])
            gram = np.zeros((n, n))
            for start in range(0, self.total, self.COLUMNS):
                block = np.asarray(rows[:n, start:start + self.COLUMNS], dtype=np.float64)
                gram += block @ block.T
            norms = np.diag(gram)
            distances = np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0)
            neighbours = max(n - f - 2, 1)
            scores = [np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)]
            keep = 1 if self.rule == "krum" else min(int(self.params[1]), n)
            chosen = np.argsort(scores)[:keep]
            return np.asarray(rows[np.sort(chosen)], dtype=np.float64).mean(axis=0).astype(np.float32)
        out = np.empty(self.total, dtype=np.float32)
        cut = int(self.params[0] * n) if self.rule == "trimmed_mean" else 0
        for start in range(0, self.total, self.COLUMNS):
            block = np.asarray(rows[:n, start:start + self.COLUMNS])
            if self.rule == "median":
                out[start:start + block.shape[1]] = np.median(block, axis=0)
            else:
                ordered = np.sort(block, axis=0)
                out[start:start + block.shape[1]] = ordered[cut:n - cut].mean(axis=0)
        return out

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        aggregate = torch.from_numpy(self._aggregate())
        new_state = {}
        for spec, offset in zip(self.specs, self.offsets):
            current = global_state[spec.name]
            step = aggregate[offset:offset + spec.numel].reshape(spec.shape)
            if current.is_floating_point():
                # Added in the model's precision: a float64 model keeps its float64 values.
                step = step.to(accumulator_dtype(current.dtype), copy=True)
                new = self.optimizer.step(spec.name, step).add_(current)
                new_state[spec.name] = new if new.dtype == current.dtype else new.to(current.dtype)
            else:
                new_state[spec.name] = step.double().add_(current).round_().to(current.dtype)
        self.discard()
        return new_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(dict(state))

    def memory_claim(self) -> int:
        """Updates live on disk; RAM holds the server optimizer's moments (in the model's precision), and
        one aggregate (float32, whole model) while finish() runs."""
        moments = sum(s.numel * accumulator_dtype(DTYPES[s.dtype]).itemsize for s in self.specs)
        return 4 * sum(s.numel for s in self.specs) + self.optimizer.moments() * moments
