"""How a round's updates become the next global model: one protocol (`Aggregator`, in base.py), the
built-in rules that keep it, and one factory from the config's `aggregator` text.

    base.py        the protocol, UpdateRejected and the checks every rule shares
    fedavg.py      FedAvg: a running weighted sum (memory: one model)
    optimizers.py  server optimizers applied to the averaged diff (FedAvgM, FedAdam, FedYogi)
    robust.py      median, trimmed mean, Krum, multi-Krum (updates spilled to disk)
    dp.py          DP-FedAvg (clipping and Gaussian noise) and its privacy accounting
    values.py      integer and bool tensors, which updates carry as values: combined exactly

A rule of your own: `aggregator = "package.module:ClassName"` names a class keeping the Aggregator
protocol, built as `ClassName(specs, optimizer, capacity)`: the model's tensors (list[TensorSpec]), the
configured ServerOptimizer (apply it with `optimizer.move(name, mean_diff, current)` for the server_lr
and server_optimizer settings to take effect, or ignore it), and the most updates a round folds
(clients_per_round). Its `state_dict()` is saved in every checkpoint (tensors and plain values only).
tests/unit/test_aggregator_contract.py runs the checks every built-in rule passes on it.
"""
from __future__ import annotations

import re

from common.models import import_object
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
           "ServerOptimizer", "UpdateRejected", "add", "check_update", "epsilon", "is_custom_rule",
           "make_aggregator", "make_custom_aggregator", "parse_aggregator", "spec_mismatch"]


# A user's rule: `package.module:ClassName`, imported by make_aggregator (at the server's start-up).
CUSTOM_RULE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
BUILT_IN_RULES = ("fedavg", *ROBUST_RULES)
PROTOCOL_MEMBERS = ("specs", "begin_round", "check", "fold", "finish", "discard", "state_dict", "load_state_dict",
                    "memory_claim")


def parse_aggregator(text: str) -> tuple[str, tuple[float, ...]]:
    """`fedavg`, `median`, `trimmed_mean:BETA` (fraction cut at each end), `krum:F` or `multikrum:F:M`
    (F = Byzantine clients tolerated, M = updates averaged); or `package.module:ClassName`, a rule of your
    own, returned as (text, ()) and imported only when make_aggregator builds it."""
    name, *params = text.split(":")
    try:
        values = tuple(float(p) for p in params)
    except ValueError:
        values = (-1.0,)
    ok = {"fedavg": lambda v: not v, "median": lambda v: not v,
          "trimmed_mean": lambda v: len(v) == 1 and 0 <= v[0] < 0.5,
          "krum": lambda v: len(v) == 1 and v[0] >= 0 and v[0] == int(v[0]),
          "multikrum": lambda v: len(v) == 2 and all(x >= 0 and x == int(x) for x in v) and v[1] >= 1}
    if is_custom_rule(text):
        return text, ()
    if name not in ok or not ok[name](values):
        raise ValueError(f"unknown aggregator {text!r}; use fedavg, median, trimmed_mean:BETA (0 <= BETA < 0.5), "
                         "krum:F, multikrum:F:M or package.module:ClassName (your own rule)")
    return name, values


def is_custom_rule(text: str) -> bool:
    return text.split(":")[0] not in BUILT_IN_RULES and CUSTOM_RULE.match(text) is not None


def make_custom_aggregator(text: str, specs: list[TensorSpec], optimizer: ServerOptimizer,
                           capacity: int) -> Aggregator:
    """A user's rule, built as ClassName(specs, optimizer, capacity) and checked against the protocol;
    ValueError in one sentence when it cannot be imported, built, or does not keep the protocol."""
    cls = import_object(text, "aggregator class", program="fl-server")
    if not isinstance(cls, type):
        raise ValueError(f"aggregator {text!r} is not a class; name a class keeping the Aggregator protocol "
                         "(fl_server/aggregation/base.py)")
    try:
        aggregator = cls(specs, optimizer, capacity)
    except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises is one sentence
        raise ValueError(f"aggregator {text!r} failed to build as {cls.__name__}(specs, optimizer, capacity) "
                         f"({type(e).__name__}: {str(e)[:200]}); fix its constructor") from None
    if not isinstance(aggregator, Aggregator):
        missing = [m for m in PROTOCOL_MEMBERS if not hasattr(aggregator, m)]
        raise ValueError(f"aggregator {text!r} does not keep the Aggregator protocol (fl_server/aggregation/"
                         f"base.py): it lacks {', '.join(missing)}")
    return aggregator


def make_aggregator(specs: list[TensorSpec], text: str, capacity: int, optimizer: ServerOptimizer | None = None,
                    dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0) -> Aggregator:
    """The aggregator for the config's `aggregator`; with `dp_noise_multiplier` > 0, DP-FedAvg, which
    only fedavg supports. `capacity`: the most updates a round folds (clients per round)."""
    rule, params = parse_aggregator(text)
    if dp_noise_multiplier > 0:
        if rule != "fedavg":
            raise ValueError(f"differential privacy needs the fedavg aggregator, not {text!r}: other rules' "
                             "outputs have no bounded sensitivity to add noise to")
        return DPFedAvg(specs, dp_noise_multiplier, dp_clip, capacity, optimizer)
    if is_custom_rule(text):
        return make_custom_aggregator(text, specs, optimizer or ServerOptimizer(), capacity)
    if rule == "fedavg":
        return FedAvg(specs, optimizer=optimizer)
    return RobustAggregator(specs, rule, params, capacity, optimizer)
