import numpy as np
import pytest
import torch

from common.tensors import specs_of
from fl_server.aggregation import FedAvg, UpdateRejected, add


def make(global_state, server_lr=1.0):
    return FedAvg(specs_of(global_state), server_lr)


def test_fedavg_weights_by_num_samples():
    g = {"w": torch.zeros(2)}
    agg = make(g)
    add(agg, {"w": torch.tensor([1.0, 1.0])}, weight=1)
    add(agg, {"w": torch.tensor([4.0, -2.0])}, weight=3)
    new = agg.finish(g)
    # (1*1 + 3*4)/4 = 3.25 ; (1*1 + 3*-2)/4 = -1.25
    assert torch.allclose(new["w"], torch.tensor([3.25, -1.25]))


def test_equal_weights_give_the_plain_mean_and_leave_the_old_state_alone():
    g = {"w": torch.tensor([10.0, 20.0])}
    agg = make(g)
    for d in ([1.0, 2.0], [3.0, 4.0], [5.0, 6.0]):
        add(agg, {"w": torch.tensor(d)}, weight=7)
    new = agg.finish(g)
    assert torch.allclose(new["w"], torch.tensor([13.0, 24.0]))
    assert torch.equal(g["w"], torch.tensor([10.0, 20.0]))


@pytest.mark.parametrize("server_lr", [0.1, 0.5, 1.0, 2.0])
def test_server_lr_scales_the_averaged_diff(server_lr):
    g = {"w": torch.ones(3)}
    agg = make(g, server_lr)
    add(agg, {"w": torch.full((3,), 2.0)}, weight=5)
    add(agg, {"w": torch.full((3,), 4.0)}, weight=5)
    assert torch.allclose(agg.finish(g)["w"], torch.full((3,), 1.0 + server_lr * 3.0))


def test_integer_buffers_are_rounded_not_truncated():
    g = {"num_batches_tracked": torch.tensor(100, dtype=torch.int64)}
    agg = make(g)
    # Integer tensors travel as the clients' values. Mean 114.75: truncation would give 114, rounding 115.
    add(agg, {"num_batches_tracked": torch.tensor(115, dtype=torch.int64)}, weight=3)
    add(agg, {"num_batches_tracked": torch.tensor(114, dtype=torch.int64)}, weight=1)
    new = agg.finish(g)
    assert new["num_batches_tracked"].dtype == torch.int64
    assert new["num_batches_tracked"].item() == 115


def test_large_integer_buffers_keep_exact_values():
    g = {"n": torch.tensor(2**40, dtype=torch.int64)}
    agg = make(g)
    add(agg, {"n": torch.tensor(2**40 + 3, dtype=torch.int64)}, weight=10)
    assert agg.finish(g)["n"].item() == 2**40 + 3


def test_half_precision_models_keep_their_dtype():
    g = {"w": torch.zeros(4, dtype=torch.bfloat16)}
    agg = make(g)
    add(agg, {"w": torch.ones(4, dtype=torch.bfloat16)}, weight=2)
    new = agg.finish(g)
    assert new["w"].dtype == torch.bfloat16 and torch.equal(new["w"], torch.ones(4, dtype=torch.bfloat16))


@pytest.mark.parametrize("bad", [
    {"w": torch.tensor([float("nan"), 0.0])},
    {"w": torch.tensor([float("inf"), 0.0])},
    {"w": torch.zeros(3)},
    {"w": torch.zeros(2, dtype=torch.float64)},
    {"v": torch.zeros(2)},
    {"w": torch.zeros(2), "extra": torch.zeros(1)},
    {},
])
def test_rejected_update_leaves_the_sum_exactly_as_it_was(bad):
    g = {"w": torch.zeros(2)}
    agg = make(g)
    add(agg, {"w": torch.tensor([1.0, 2.0])}, weight=2)
    before = {name: t.clone() for name, t in agg._sums.items()}
    with pytest.raises(UpdateRejected):
        add(agg, bad, weight=5)
    assert agg.count == 1 and agg.total_weight == 2
    assert agg._sums.keys() == before.keys() and all(torch.equal(agg._sums[k], before[k]) for k in before)
    assert torch.equal(agg.finish(g)["w"], torch.tensor([1.0, 2.0]))


def test_non_positive_weight_is_rejected():
    agg = make({"w": torch.zeros(1)})
    with pytest.raises(UpdateRejected, match="positive"):
        add(agg, {"w": torch.zeros(1)}, weight=0)


def test_apply_without_updates_is_an_error():
    with pytest.raises(ValueError):
        make({"w": torch.zeros(1)}).finish({"w": torch.zeros(1)})


def test_apply_reuses_the_sums_memory_and_empties_the_aggregator():
    g = {"w": torch.zeros(3)}
    agg = make(g)
    add(agg, {"w": torch.ones(3)}, weight=1)
    sums = agg._sums["w"]
    new = agg.finish(g)
    assert new["w"].data_ptr() == sums.data_ptr()
    assert agg.count == 0 and agg.total_weight == 0
    add(agg, {"w": torch.ones(3)}, weight=1)  # ready for the next round
    assert torch.equal(agg.finish(new)["w"], torch.full((3,), 2.0))


def test_finite_but_huge_update_is_refused_before_it_can_overflow_the_sum():
    g = {"w": torch.zeros(2)}
    agg = make(g)
    add(agg, {"w": torch.tensor([1.0, 1.0])}, weight=1)
    with pytest.raises(UpdateRejected, match="overflow"):
        add(agg, {"w": torch.tensor([3e30, 0.0])}, weight=1000)
    assert torch.allclose(agg.finish(g)["w"], torch.ones(2))


@pytest.mark.parametrize("kind, lr", [("fedavg", 1.0), ("fedavgm", 0.5), ("fedadam", 0.1), ("fedyogi", 0.1)])
def test_each_server_optimizer_reaches_the_clients_optimum(kind, lr):
    # Two clients whose local training ends at their own optimum; the federation's optimum is their
    # sample-weighted mean. Each round's diff is (optimum - global).
    from fl_server.aggregation import ServerOptimizer

    optima, weights = (torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 2.0, -1.0])), (1, 3)
    target = (optima[0] * 1 + optima[1] * 3) / 4
    g = {"w": torch.zeros(3), "n": torch.tensor(0)}
    optimizer = ServerOptimizer(kind, lr)
    for _ in range(300):
        agg = FedAvg(specs_of(g), optimizer=optimizer)
        for optimum, weight in zip(optima, weights):
            add(agg, {"w": optimum - g["w"], "n": g["n"] + 1}, weight)  # a counter's new value
        g = agg.finish(g)
    assert torch.allclose(g["w"], target, atol=0.05), (kind, g["w"], target)
    assert g["n"].item() == 300  # counters take the plain mean, whatever the optimizer


def test_server_optimizer_state_survives_a_checkpoint_round_trip():
    from fl_server.aggregation import ServerOptimizer

    a = ServerOptimizer("fedadam", 0.1)
    a.step("w", torch.ones(2))
    b = ServerOptimizer("fedadam", 0.1)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.step("w", torch.ones(2)), b.step("w", torch.ones(2)))


def test_unknown_server_optimizer():
    from fl_server.aggregation import ServerOptimizer

    with pytest.raises(ValueError, match="unknown server optimizer"):
        ServerOptimizer("fedsgd")


def robust(rule, rows, capacity=None):
    from fl_server.aggregation import make_aggregator

    g = {"w": torch.zeros(len(rows[0]))}
    agg = make_aggregator(specs_of(g), rule, capacity or len(rows))
    for row in rows:
        add(agg, {"w": torch.tensor(row, dtype=torch.float32)}, weight=1)
    return agg.finish(g)["w"]


HONEST = [[1.0, 2.0], [1.1, 2.1], [0.9, 1.9], [1.0, 2.2], [1.05, 1.95]]
POISONED = HONEST + [[-50.0, 100.0], [-60.0, 90.0]]


def test_median_and_trimmed_mean_ignore_outliers():
    assert torch.allclose(robust("median", POISONED), torch.tensor([1.0, 2.1]))
    # 7 updates, 2 cut at each end: the middle three of each coordinate.
    assert torch.allclose(robust("trimmed_mean:0.29", POISONED), torch.tensor([2.9 / 3, 2.1]), atol=1e-6)
    assert robust("fedavg", POISONED)[0] < -10  # the plain mean is dragged far away


def test_krum_picks_an_honest_update_and_multikrum_averages_honest_ones():
    chosen = robust("krum:2", POISONED)
    assert any(torch.allclose(chosen, torch.tensor(h)) for h in HONEST)
    averaged = robust("multikrum:2:3", POISONED)
    assert 0.8 < averaged[0] < 1.2 and 1.8 < averaged[1] < 2.3


def test_robust_rules_spill_updates_to_disk_and_reset_between_rounds():
    from fl_server.aggregation import RobustAggregator, make_aggregator

    g = {"w": torch.zeros(3), "n": torch.tensor(0)}
    agg = make_aggregator(specs_of(g), "median", capacity=3)
    assert isinstance(agg, RobustAggregator)
    for value in (1.0, 2.0, 3.0):
        add(agg, {"w": torch.full((3,), value), "n": torch.tensor(2)}, weight=1)
    # Float diffs on disk; the integer values in RAM, as int64.
    assert isinstance(agg._rows, np.memmap) and agg._rows.shape == (3, 3)
    assert agg._values is not None and agg._values.shape == (3, 1) and agg._values.dtype == np.int64
    with pytest.raises(UpdateRejected, match="already holds 3"):
        add(agg, {"w": torch.zeros(3), "n": torch.tensor(0)}, weight=1)
    new = agg.finish(g)
    assert torch.equal(new["w"], torch.full((3,), 2.0)) and new["n"].item() == 2
    add(agg, {"w": torch.full((3,), 5.0), "n": torch.tensor(0)}, weight=1)  # the next round starts empty
    assert torch.equal(agg.finish(new)["w"], torch.full((3,), 7.0))


@pytest.mark.parametrize("text", ["mean", "trimmed_mean:0.5", "krum", "krum:1.5", "multikrum:1", "median:3"])
def test_unknown_aggregators_are_clear_errors(text):
    from fl_server.aggregation import parse_aggregator

    with pytest.raises(ValueError, match="unknown aggregator"):
        parse_aggregator(text)


def test_sums_reuse_a_retired_state_when_dtypes_allow():
    retired = {"w": torch.ones(4), "n": torch.tensor(7)}
    agg = FedAvg(specs_of(retired))
    add(agg, {"w": torch.ones(4), "n": torch.tensor(1)}, 1)
    new = agg.finish(retired)
    assert torch.equal(retired["w"], torch.ones(4))  # left alone until the next round begins
    agg.begin_round()
    sums = agg._sums
    assert sums["w"].data_ptr() == retired["w"].data_ptr() and torch.equal(sums["w"], torch.zeros(4))
    assert sums["w"].data_ptr() != new["w"].data_ptr()
    # Integer buffers are summed in float64, so theirs cannot be reused.
    assert sums["n"].dtype == torch.float64 and float(sums["n"]) == 0.0
