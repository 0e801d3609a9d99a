"""What every aggregator must do, written once (`AggregatorContract`) and run against each
implementation by a subclass that says how to build it (as Flower's state tests run one base class
against each store). A new rule, built in or a user's own, gets the same checks by adding a subclass.

Your own rule (`aggregator = "mypackage.rules:MyRule"`): in a test file of yours, with this repository
and your package importable (e.g. `PYTHONPATH=/path/to/this/repo:/path/to/yours`),

    from fl_server.aggregation import ServerOptimizer, make_aggregator
    from tests.unit.test_aggregator_contract import AggregatorContract

    class TestMyRule(AggregatorContract):
        integers = "keep"  # or "values", if your rule combines integer and bool buffers (see below)

        def make(self, specs, capacity):  # as fl-server builds it
            return make_aggregator(specs, "mypackage.rules:MyRule", capacity, ServerOptimizer(self.optimizer))

then `python -m pytest your_test_file.py`. The checks assume a rule that gives back the common update
when all updates are equal and modest (norm below 10), as any mean-like rule does; TestNormClippedMean
below runs them on tests/custom_rules.py.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.tensors import specs_of
from fl_server.aggregation import (
    Aggregator,
    DPFedAvg,
    FedAvg,
    RobustAggregator,
    ServerOptimizer,
    UpdateRejected,
    add,
    make_aggregator,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

_GLOBAL = {"w": torch.tensor([[1.0, -2.0], [0.5, 4.0]]), "b": torch.tensor([0.25, -0.75], dtype=torch.float64),
          "steps": torch.tensor(40, dtype=torch.int64),
          "level": torch.tensor([5, 250, 0], dtype=torch.uint8),
          "flags": torch.tensor([True, False, True])}


def fresh_global() -> dict[str, torch.Tensor]:
    """A copy: `finish` takes over the state it is given (its memory may become the next round's sums)."""
    return {name: t.clone() for name, t in _GLOBAL.items()}


GLOBAL = fresh_global()


def update(scale: float, steps: int = 43, level: tuple[int, ...] = (7, 255, 1),
           flags: tuple[bool, ...] = (False, True, True)) -> dict[str, torch.Tensor]:
    """Floating-point tensors are diffs (local - global); integer and bool tensors are the client's new
    values (as diffs, uint8 ones would wrap around, and bools have none)."""
    return {"w": torch.tensor([[1.0, 2.0], [-3.0, 0.5]]) * scale,
            "b": torch.tensor([0.125, -1.0], dtype=torch.float64) * scale,
            "steps": torch.tensor(steps, dtype=torch.int64),
            "level": torch.tensor(level, dtype=torch.uint8),
            "flags": torch.tensor(flags)}


def held_bytes(obj: object, seen: set[int] | None = None, depth: int = 0) -> int:
    """RAM held by the tensors and arrays reachable from `obj`'s attributes (memory-mapped files excluded:
    they live on disk)."""
    seen = set() if seen is None else seen
    if depth > 4 or id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, np.memmap):
        return 0
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(held_bytes(v, seen, depth + 1) for v in obj.values())
    if isinstance(obj, list | tuple | set):
        return sum(held_bytes(v, seen, depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(held_bytes(v, seen, depth + 1) for v in vars(obj).values())
    return 0


class AggregatorContract:
    """Subclasses set `make(specs, capacity)`; `optimizer` (the server optimizer it applies to the
    aggregate) and `integers` ("values": integer and bool buffers take the rule's combination of the
    values the updates carry, which is those values when the updates agree on them; "keep": they are
    left as they were)."""

    optimizer = "fedavg"
    integers = "values"

    def make(self, specs, capacity: int) -> Aggregator:
        raise NotImplementedError

    def expected(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global state for an aggregate of `mean`, by a reference server optimizer that has seen
        the same rounds (one per call) as the aggregator under test."""
        if not hasattr(self, "_reference"):
            self._reference = ServerOptimizer(self.optimizer)
        reference = self._reference
        out = {}
        for name, current in GLOBAL.items():
            if current.is_floating_point():
                out[name] = current + reference.step(name, mean[name].clone().to(torch.float64)).to(current.dtype)
            elif self.integers == "values":
                out[name] = mean[name].clone()  # the values the (agreeing) updates carry
            else:
                out[name] = current.clone()
        return out

    def started(self, capacity: int) -> Aggregator:
        agg = self.make(specs_of(GLOBAL), capacity)
        agg.begin_round()
        return agg

    def assert_state(self, got, want):
        assert list(got) == list(want)
        for name in want:
            assert got[name].dtype == want[name].dtype, name
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)

    def test_keeps_the_protocol(self):
        assert isinstance(self.make(specs_of(GLOBAL), 1), Aggregator)

    def test_one_client_gives_back_its_own_update(self):
        agg = self.started(1)
        add(agg, update(1.0), 10)
        self.assert_state(agg.finish(fresh_global()), self.expected(update(1.0)))

    def test_equal_updates_give_that_update(self):
        agg = self.started(3)
        for weight in (1, 5, 2):
            add(agg, update(0.5), weight)
        self.assert_state(agg.finish(fresh_global()), self.expected(update(0.5)))

    def test_integer_and_bool_buffers_take_the_values_updates_carry_in_their_dtype(self):
        agg = self.started(2)
        add(agg, update(1.0, steps=43, level=(7, 255, 1), flags=(False, True, True)), 1)
        add(agg, update(1.0, steps=43, level=(7, 255, 1), flags=(False, True, True)), 3)
        new = agg.finish(fresh_global())
        assert [new[k].dtype for k in ("steps", "level", "flags")] == [torch.int64, torch.uint8, torch.bool]
        if self.integers == "values":  # the values, not the global ones plus them (83; 12, 249 wrapped, 1)
            assert int(new["steps"]) == 43 and new["level"].tolist() == [7, 255, 1]
            assert new["flags"].tolist() == [False, True, True]
        else:
            assert int(new["steps"]) == 40 and new["level"].tolist() == [5, 250, 0]
            assert new["flags"].tolist() == [True, False, True]

    def test_integer_values_are_combined_within_their_range_never_wrapped(self):
        agg = self.started(2)
        add(agg, update(1.0, steps=2**40 + 1, level=(3, 250, 0)), 1)
        add(agg, update(1.0, steps=2**40 + 5, level=(7, 255, 2)), 1)
        new = agg.finish(fresh_global())
        if self.integers == "values":  # whatever the rule's statistic: between the clients' values
            assert 2**40 + 1 <= int(new["steps"]) <= 2**40 + 5
            assert [lo <= v <= hi for v, lo, hi in zip(new["level"].tolist(), (3, 250, 0), (7, 255, 2))] == [True] * 3
        else:
            assert int(new["steps"]) == 40 and new["level"].tolist() == [5, 250, 0]

    @pytest.mark.parametrize("bad", [
        {**update(1.0), "w": torch.full((2, 2), float("nan"))},
        {**update(1.0), "b": torch.tensor([float("inf"), 0.0], dtype=torch.float64)},
        {"w": torch.zeros(2, 2), "steps": torch.tensor(0)},
        {**update(1.0), "w": torch.zeros(2, 3)},
        {**update(1.0), "extra": torch.zeros(1)},
    ])
    def test_a_rejected_update_leaves_the_aggregate_exactly_as_it_was(self, bad):
        agg, twin = self.started(3), self.started(3)
        for a in (agg, twin):
            add(a, update(1.0), 4)
        with pytest.raises(UpdateRejected):
            add(agg, bad, 4)
        with pytest.raises(UpdateRejected):
            agg.check(update(1.0), 0)  # a weight must be positive
        for a in (agg, twin):
            add(a, update(-2.0), 4)
        got, want = agg.finish(fresh_global()), twin.finish(fresh_global())
        for name in want:
            assert torch.equal(got[name], want[name]), name

    def test_finish_leaves_the_old_state_alone_and_empties_the_aggregator(self):
        old = {k: v.clone() for k, v in GLOBAL.items()}
        agg = self.started(1)
        add(agg, update(1.0), 1)
        self.assert_state(agg.finish(old), self.expected(update(1.0)))
        for name in GLOBAL:
            assert torch.equal(old[name], GLOBAL[name])
        agg.begin_round()
        add(agg, update(0.25), 1)  # the next round sees only its own updates
        self.assert_state(agg.finish(fresh_global()), self.expected(update(0.25)))

    def test_discard_forgets_the_round(self):
        agg = self.started(1)
        add(agg, update(5.0), 1)
        agg.discard()
        agg.begin_round()
        add(agg, update(1.0), 1)
        self.assert_state(agg.finish(fresh_global()), self.expected(update(1.0)))

    def test_finish_without_updates_is_an_error(self):
        with pytest.raises(ValueError):
            self.started(1).finish(fresh_global())

    def test_memory_is_what_it_claims_whatever_the_number_of_updates(self):
        model = {"w": torch.zeros(256, 128), "steps": torch.tensor(0), "level": torch.zeros(64, dtype=torch.uint8),
                 "flags": torch.zeros(64, dtype=torch.bool)}
        agg = self.make(specs_of(model), 6)
        claim = agg.memory_claim()
        agg.begin_round()
        for i in range(6):
            add(agg, {"w": torch.full((256, 128), float(i)), "steps": torch.tensor(i),
                      "level": torch.full((64,), i, dtype=torch.uint8), "flags": torch.full((64,), i % 2 == 1)}, 1)
            assert held_bytes(agg) <= claim
        assert agg.memory_claim() == claim

    def test_state_survives_a_restart(self):
        agg = self.started(1)
        add(agg, update(1.0), 1)
        agg.finish(fresh_global())
        restarted = self.make(specs_of(GLOBAL), 1)
        restarted.load_state_dict(agg.state_dict())
        for a in (agg, restarted):
            a.begin_round()
            add(a, update(0.5), 1)
        got, want = restarted.finish(fresh_global()), agg.finish(fresh_global())
        for name in want:
            assert torch.equal(got[name], want[name]), name


class TestFedAvg(AggregatorContract):
    def make(self, specs, capacity):
        return FedAvg(specs)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi"])
class TestServerOptimizers(AggregatorContract):
    @pytest.fixture(autouse=True)
    def _kind(self, kind):
        self.optimizer = kind

    def make(self, specs, capacity):
        return make_aggregator(specs, "fedavg", capacity, ServerOptimizer(self.optimizer))



@pytest.mark.parametrize("rule", ["median", "trimmed_mean:0.2", "krum:0", "multikrum:0:2"])
class TestRobustRules(AggregatorContract):
    @pytest.fixture(autouse=True)
    def _rule(self, rule):
        self.rule = rule

    def make(self, specs, capacity):
        agg = make_aggregator(specs, self.rule, capacity)
        assert isinstance(agg, RobustAggregator)
        return agg


class TestDPFedAvgWithoutNoise(AggregatorContract):
    """With no noise and a clip no update reaches, DP-FedAvg is the unweighted mean over the round's
    capacity; integer buffers are left alone (their mean would publish the clients' data noise-free)."""

    integers = "keep"

    def make(self, specs, capacity):
        return DPFedAvg(specs, noise_multiplier=0.0, clip=1e6, clients_per_round=capacity)


@pytest.mark.parametrize("kind", ["fedavg", "fedadam"])
class TestNormClippedMean(AggregatorContract):
    """A user's rule (tests/custom_rules.py), built by name as fl-server builds it; integer buffers keep
    their global values."""

    integers = "keep"

    @pytest.fixture(autouse=True)
    def _kind(self, kind):
        self.optimizer = kind

    def make(self, specs, capacity):
        return make_aggregator(specs, "tests.custom_rules:NormClippedMean", capacity, ServerOptimizer(self.optimizer))


def test_a_users_rule_clips_what_one_client_can_do():
    agg = make_aggregator(specs_of(GLOBAL), "tests.custom_rules:NormClippedMean", 2)
    agg.begin_round()
    add(agg, update(1000.0), 1)  # norm about 3907: scaled down to 10
    add(agg, update(0.0), 1)
    new = agg.finish(fresh_global())
    step = torch.cat([(new["w"] - GLOBAL["w"]).flatten(), (new["b"] - GLOBAL["b"]).flatten().float()])
    assert float(step.norm()) == pytest.approx(5.0, rel=1e-4)  # half of 10: the mean with a zero update


@pytest.mark.parametrize("kind", ["fedavg", "fedavgm"])
class TestCappedWeightMeanExample(AggregatorContract):
    """examples/custom_aggregation/capped_mean.py, the rule a user's project names, imported from its own
    folder as fl-server run there imports it."""

    integers = "keep"

    @pytest.fixture(autouse=True)
    def _kind(self, kind, monkeypatch):
        self.optimizer = kind
        monkeypatch.syspath_prepend(str(EXAMPLES / "custom_aggregation"))

    def make(self, specs, capacity):
        return make_aggregator(specs, "capped_mean:CappedWeightMean", capacity, ServerOptimizer(self.optimizer))


def test_the_examples_rule_caps_what_one_client_can_claim(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES / "custom_aggregation"))
    agg = make_aggregator(specs_of(GLOBAL), "capped_mean:CappedWeightMean", 2)
    agg.begin_round()
    add(agg, update(3.0), 10**9)  # claims a billion samples: weighs CAP (1000)
    add(agg, update(1.0), 1000)
    new = agg.finish(fresh_global())
    assert torch.allclose(new["w"] - GLOBAL["w"], update(2.0)["w"])  # the plain mean of the two
