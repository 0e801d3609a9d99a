"""An aggregation rule of one's own: FedAvg in which no client weighs more than CAP samples.

FedAvg weighs each update by the sample count its client reports, and nothing checks that count: a
client that claims a million samples all but replaces the global model. Capping each client's weight
bounds what one client can claim, while clients of ordinary size are averaged exactly as FedAvg would.

fl-server builds it as `CappedWeightMean(specs, optimizer, capacity)` when its config says
`aggregator = "capped_mean:CappedWeightMean"`, and drives it through the Aggregator protocol
(fl_server/aggregation/base.py): begin_round, then check and fold for each update, then finish (or
discard when the round is not aggregated).
"""
from collections.abc import Mapping

import torch

from common.tensors import DTYPES, TensorSpec
from fl_server.aggregation import ServerOptimizer, UpdateRejected, check_update


class CappedWeightMean:
    CAP = 1000  # samples: the most weight one update carries

    def __init__(self, specs: list[TensorSpec], optimizer: ServerOptimizer, capacity: int):
        self.specs = specs
        self.optimizer = optimizer  # moves the model by the mean: server_lr and server_optimizer still apply
        self.floats = [s for s in specs if DTYPES[s.dtype].is_floating_point]
        self.sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0

    def begin_round(self) -> None:
        self.sums = {s.name: torch.zeros(s.shape, dtype=torch.float64) for s in self.floats}
        self.total_weight = 0

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        """Refuse what must not touch the model (the wrong tensors, NaN, Inf); change nothing."""
        check_update(diff, self.specs, largest)
        if weight <= 0:
            raise UpdateRejected(f"an update must weigh at least one sample, got {weight}")

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        if not self.sums:
            self.begin_round()
        weight = min(weight, self.CAP)
        for s in self.floats:
            self.sums[s.name].add_(diff[s.name].to(torch.float64), alpha=weight)
        self.total_weight += weight

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.total_weight == 0:
            raise ValueError("no updates to aggregate")  # the round drives finish only after a fold
        new_state = {}
        for name, current in global_state.items():
            if current.is_floating_point():
                new_state[name] = self.optimizer.move(name, self.sums[name] / self.total_weight, current)
            else:  # integer and bool buffers (BatchNorm's counters): kept as they are
                new_state[name] = current.clone()
        self.discard()
        return new_state

    def discard(self) -> None:
        self.sums = {}
        self.total_weight = 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()  # a server optimizer's moments, saved in every checkpoint

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(state)

    def memory_claim(self) -> int:
        """The float64 sums, and the server optimizer's moments: whatever the number of updates."""
        return 8 * sum(s.numel for s in self.floats) * (1 + self.optimizer.moments())
