"""How a round's updates become the next global model: one protocol (`Aggregator`, in base.py), the
built-in rules that keep it, and one factory from the config's `aggregator` text.

    base.py        the protocol, UpdateRejected and the checks every rule shares
    fedavg.py      FedAvg: a running weighted sum (memory: one model)
    optimizers.py  server optimizers applied to the averaged diff (FedAvgM, FedAdam, FedYogi)
    robust.py      median, trimmed mean, Krum, multi-Krum (updates spilled to disk)
    dp.py          DP-FedAvg (clipping and Gaussian noise) and its privacy accounting
    values.py      integer and bool tensors, which updates carry as values: combined exactly
"""
from __future__ import annotations

from common.tensors import TensorSpec
from fl_server.aggregation.base import (
    MAX_WEIGHTED_MAGNITUDE,
    Aggregator,
    UpdateRejected,
    add,
    check_update,
    spec_mismatch,
)
from fl_server.aggregation.dp import DPFedAvg, epsilon
from fl_server.aggregation.fedavg import FedAvg
from fl_server.aggregation.optimizers import ServerOptimizer
from fl_server.aggregation.robust import ROBUST_RULES, RobustAggregator

__all__ = ["MAX_WEIGHTED_MAGNITUDE", "ROBUST_RULES", "Aggregator", "DPFedAvg", "FedAvg", "RobustAggregator",
           "ServerOptimizer", "UpdateRejected", "add", "check_update", "epsilon", "make_aggregator",
           "parse_aggregator", "spec_mismatch"]


def parse_aggregator(text: str) -> tuple[str, tuple[float, ...]]:
    """`fedavg`, `median`, `trimmed_mean:BETA` (fraction cut at each end), `krum:F` or `multikrum:F:M`
    (F = Byzantine clients tolerated, M = updates averaged)."""
    name, *params = text.split(":")
    try:
        values = tuple(float(p) for p in params)
    except ValueError:
        values = (-1.0,)
    ok = {"fedavg": lambda v: not v, "median": lambda v: not v,
          "trimmed_mean": lambda v: len(v) == 1 and 0 <= v[0] < 0.5,
          "krum": lambda v: len(v) == 1 and v[0] >= 0 and v[0] == int(v[0]),
          "multikrum": lambda v: len(v) == 2 and all(x >= 0 and x == int(x) for x in v) and v[1] >= 1}
    if name not in ok or not ok[name](values):
        raise ValueError(f"unknown aggregator {text!r}; use fedavg, median, trimmed_mean:BETA (0 <= BETA < 0.5), "
                         "krum:F or multikrum:F:M")
    return name, values


def make_aggregator(specs: list[TensorSpec], text: str, capacity: int, optimizer: ServerOptimizer | None = None,
                    dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0) -> Aggregator:
    """The aggregator for the config's `aggregator`; with `dp_noise_multiplier` > 0, DP-FedAvg, which
    only fedavg supports. `capacity`: the most updates a round folds (clients per round)."""
    rule, params = parse_aggregator(text)
    if dp_noise_multiplier > 0:
        if rule != "fedavg":
            raise ValueError(f"differential privacy needs the fedavg aggregator, not {text!r}: the robust rules' "
                             "outputs have no bounded sensitivity to add noise to")
        return DPFedAvg(specs, dp_noise_multiplier, dp_clip, capacity, optimizer)
    if rule == "fedavg":
        return FedAvg(specs, optimizer=optimizer)
    return RobustAggregator(specs, rule, params, capacity, optimizer)
