"""Secure aggregation's side of the Aggregator protocol: a running sum of masked vectors, unmasked once.

Each client of a secure round uploads one int64 tensor, `masked`: its update's floating-point values
in fixed point, weighted by its sample count, with the count itself as the last value, plus masks
(common/secagg.py). The sum is taken mod 2**64 (int64 addition wraps); no single vector means anything
and none is kept. `finish` has the round's ServerSession remove the masks that do not cancel (self
masks, and the pairwise masks of clients that dropped out), decodes the weighted mean, and moves the
model by it through the server optimizer as FedAvg does. Integer and bool tensors (BatchNorm's
counters) cannot be summed in secret with the floats' encoding: they keep their global values.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from common import secagg, secagg_sessions
from common.secure_rounds import masked_length
from common.tensors import TensorSpec
from fl_server.aggregation.base import UpdateRejected, spec_mismatch
from fl_server.aggregation.optimizers import OptimizerState, ServerOptimizer

MASKED = "masked"  # the one tensor of a secure round's update


class SecureSum(OptimizerState):
    """The Aggregator of a secure round. `session` is set by the round state when a round opens."""

    def __init__(self, model_specs: list[TensorSpec], optimizer: ServerOptimizer | None = None):
        self.model_specs = model_specs
        self.length = masked_length(model_specs)
        self.specs = [TensorSpec(MASKED, "int64", (self.length + 1,))]
        self.optimizer = optimizer or ServerOptimizer("fedavg")
        self.session: secagg_sessions.ServerSession | None = None
        self.params: secagg.SecAggParams | None = None
        self._sum: torch.Tensor | None = None
        self.count = 0
        self.last_total_weight = 0  # the samples behind the last round's mean (unmasked with it)

    def begin_round(self) -> None:
        self._sum = torch.zeros(self.length + 1, dtype=torch.int64)
        self.count = 0

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        # Masked values are uniformly random 64-bit words: there is nothing to check but their shape.
        mismatch = spec_mismatch([TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                                  for n, t in diff.items()], self.specs)
        if mismatch:
            raise UpdateRejected(mismatch)

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        if self._sum is None:
            self.begin_round()
        assert self._sum is not None
        self._sum.add_(diff[MASKED])  # wraps around mod 2**64, as the masks need
        self.count += 1

    def unmasked_mean(self) -> tuple[np.ndarray, int]:
        """The round's weighted mean of the clients' float values, and their total weight; SecAggError when
        the masks cannot be removed (too few clients revealed their shares)."""
        if self._sum is None or self.count == 0 or self.session is None or self.params is None:
            raise ValueError("no updates to aggregate")
        total = self.session.unmask(self._sum.numpy().view(np.uint64))
        return secagg.decode(total, self.params)

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mean, self.last_total_weight = self.unmasked_mean()
        new_state: dict[str, torch.Tensor] = {}
        offset = 0
        for name, current in global_state.items():
            if current.is_floating_point():
                size = current.numel()
                step = torch.from_numpy(mean[offset:offset + size].copy()).reshape(current.shape)
                offset += size
                new_state[name] = self.optimizer.move(name, step, current)
            else:
                new_state[name] = current.clone()
        self.discard()
        return new_state

    def discard(self) -> None:
        self._sum = None
        self.count = 0
        self.session = None

    def memory_claim(self) -> int:
        """The int64 sum, the float64 mean it decodes to, and the server optimizer's moments."""
        return 8 * (self.length + 1) + 8 * self.length * (1 + self.optimizer.moments())
