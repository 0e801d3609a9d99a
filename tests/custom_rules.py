"""Aggregation rules of a user's own, as `fl-server --aggregator tests.custom_rules:NormClippedMean` names
them: what a rule outside fl_server looks like (built as ClassName(specs, optimizer, capacity)), and what
tests/unit/test_aggregator_contract.py checks a user's rule with."""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from common.tensors import DTYPES, TensorSpec
from fl_server.aggregation import MAX_WEIGHTED_MAGNITUDE, ServerOptimizer, UpdateRejected, check_update


class NormClippedMean:
    """The sample-weighted mean of the updates after each is scaled down to L2 norm `MAX_NORM` (over its
    floating-point tensors) when it is longer: one client's update moves the model by a bounded amount
    whatever it sends, while honest updates, shorter than the bound, are averaged as FedAvg would. Integer
    and bool buffers keep their global values. Memory: one float64 model of sums."""

    MAX_NORM = 10.0

    def __init__(self, specs: list[TensorSpec], optimizer: ServerOptimizer, capacity: int):
        self.specs = specs
        self.optimizer = optimizer  # applied to the clipped mean: server_lr and server_optimizer still hold
        self._floats = [s for s in specs if DTYPES[s.dtype].is_floating_point]
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0

    def begin_round(self) -> None:
        self._sums = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in self._floats}
        self.total_weight = 0

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        check_update(diff, self.specs, largest)
        if weight <= 0:
            raise UpdateRejected(f"update weight (num_samples) must be positive, got {weight}")
        if weight * self.MAX_NORM > MAX_WEIGHTED_MAGNITUDE:
            raise UpdateRejected(f"a weight of {weight} samples would overflow the aggregate")

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        if not self._sums:
            self.begin_round()
        norm = math.sqrt(sum(float(diff[s.name].to(torch.float64).square().sum()) for s in self._floats))
        scale = min(1.0, self.MAX_NORM / norm) if norm > 0 else 1.0
        for s in self._floats:
            self._sums[s.name].add_(diff[s.name].to(torch.float64), alpha=weight * scale)
        self.total_weight += weight

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.total_weight == 0:
            raise ValueError("no updates to aggregate")
        new_state = {}
        for name, current in global_state.items():
            if current.is_floating_point():
                new_state[name] = self.optimizer.move(name, self._sums[name].div_(self.total_weight), current)
            else:
                new_state[name] = current.clone()
        self.discard()
        return new_state

    def discard(self) -> None:
        self._sums = {}
        self.total_weight = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(state)

    def memory_claim(self) -> int:
        """The float64 sums, and the server optimizer's moments (float64 too: they follow the sums)."""
        return 8 * sum(s.numel for s in self._floats) * (1 + self.optimizer.moments())


class LacksFold:
    """Not an aggregator: no fold (fl-server refuses it at start-up)."""

    def __init__(self, specs: list[TensorSpec], optimizer: ServerOptimizer, capacity: int):
        self.specs = specs


class RefusesToBuild:
    def __init__(self, specs: list[TensorSpec], optimizer: ServerOptimizer, capacity: int):
        raise RuntimeError("needs a GPU")
