"""Client-level differential privacy: DP-FedAvg's aggregation and its privacy accounting.

DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models"): the
server clips each client's update to L2 norm `clip`, sums the clipped updates with equal weights, adds
Gaussian noise of standard deviation `noise_multiplier * clip` to every coordinate of the sum, and
divides by the fixed number of clients per round. Whatever one client's data, its influence on what
the server publishes is then bounded and masked by the noise.

The privacy spent is computed by Google's `dp_accounting` library (its Renyi-DP accountant). Rounds
sample a fixed number of clients without replacement from the live ones, which that accountant
analyses under the replace-one relation (Wang, Balle and Kasiviswanathan, 2019): two federations are
neighbours if one client's data differs. Replacing one client's clipped update moves the sum by up to
2 * clip, so the accountant is given a noise multiplier of noise_multiplier / 2.
"""
from __future__ import annotations

import collections
import logging
import math
import secrets
from collections.abc import Iterable, Mapping

import torch

from common.tensors import TensorSpec
from fl_server.aggregation.base import check_update, check_weight
from fl_server.aggregation.fedavg import FedAvg
from fl_server.aggregation.optimizers import ServerOptimizer

# The accountant's absl logging warns about orders it skips; that is its normal working.
logging.getLogger("absl").setLevel(logging.ERROR)


class DPFedAvg(FedAvg):
    """FedAvg with clipping, equal weights and Gaussian noise.
    Integer and bool buffers (BatchNorm's batch counter), which updates carry as values, are left as
    they were: their mean would publish a function of the clients' data without noise."""

    def __init__(self, specs: list[TensorSpec], noise_multiplier: float, clip: float, clients_per_round: int,
                 optimizer: ServerOptimizer | None = None):
        super().__init__(specs, optimizer=optimizer)
        self.noise_multiplier, self.clip, self.clients_per_round = noise_multiplier, clip, clients_per_round
        # The noise must be unpredictable: seeded from the operating system, never from the run's seed.
        self._generator = torch.Generator().manual_seed(secrets.randbits(63))

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        # The tensors, their finiteness and a valid weight only: clipping bounds every value, and the
        # weight itself is not used.
        check_update(diff, self.specs, largest)
        check_weight(weight)

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        floats = [(name, t) for name, t in diff.items() if t.is_floating_point()]
        norm = math.sqrt(sum(_squared_norm(t) for _, t in floats))
        self._accumulate(floats, min(1.0, self.clip / norm) if norm > 0 else 1.0)
        self.total_weight += 1
        self.count += 1

    def finish(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        std = self.noise_multiplier * self.clip
        new_state = {}
        for name, current in global_state.items():
            if not current.is_floating_point():
                new_state[name] = current.clone()
                continue
            total = self._sums[name]
            total.add_(torch.randn(total.shape, generator=self._generator, dtype=total.dtype), alpha=std)
            # A fixed denominator: dividing by the number that arrived would publish it, noise-free.
            new_state[name] = self.optimizer.move(name, total.div_(self.clients_per_round), current)
        self.discard()
        self._spare = global_state
        return new_state


def _squared_norm(tensor: torch.Tensor) -> float:
    """The squared L2 norm, accumulated in float64. torch converts a CPU tensor to the dtype it is asked
    to accumulate in, so it is given 1 M values at a time: 8 MB of scratch rather than a float64 copy
    of the whole tensor."""
    return sum(float(torch.linalg.vector_norm(part, dtype=torch.float64)) ** 2
               for part in tensor.reshape(-1).split(1 << 20))


def epsilon(noise_multiplier: float, rounds: Iterable[tuple[int, int]], delta: float) -> float:
    """Epsilon at `delta` after the given rounds, each a (live clients, clients sampled) pair."""
    import dp_accounting  # noqa: PLC0415 - only DP runs need it (and its start-up cost)
    from dp_accounting.rdp import RdpAccountant  # noqa: PLC0415

    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    # Rounds alike are composed in one call: each compose evaluates the RDP of its event at every order.
    for (population, sampled), count in collections.Counter(rounds).items():
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            population, sampled, dp_accounting.GaussianDpEvent(noise_multiplier / 2)), count)
    return float(accountant.get_epsilon(delta))
