"""Exact aggregation: robust rules add their step in the model's own precision (float64 models stay
float64), and integer and bool tensors travel as the clients' values (fl_server/aggregation/values.py),
combined without wrapping around or losing large int64 counters."""
import dataclasses

import pytest
import torch
from torch import nn

from common import codecs
from common import messages as m
from common.datasets import load_digits, model_spec_for
from common.partition import client_share
from common.tensors import specs_of
from fl_client.builtin import BuiltinTraining
from fl_client.round import ClientRound, seed_for
from fl_client.task import Result, Task
from fl_server.aggregation import DPFedAvg, FedAvg, add, make_aggregator
from fl_server.aggregation.values import offsets, settle
from fl_server.uploads import UploadReceiver

ROBUST = ("median", "trimmed_mean:0.34", "krum:0", "multikrum:0:2")
ALL_RULES = ("fedavg", *ROBUST)


def aggregate(rule: str, global_state, updates, weights=None):
    agg = make_aggregator(specs_of(global_state), rule, len(updates))
    agg.begin_round()
    for update, weight in zip(updates, weights or [1] * len(updates)):
        add(agg, update, weight)
    return agg.finish({k: v.clone() for k, v in global_state.items()})


# Item 8: the robust rules' step is added in float64 for a float64 model.

@pytest.mark.parametrize("rule", ROBUST)
def test_a_float64_model_takes_the_robust_step_in_float64(rule):
    g = {"w": torch.tensor([1e8 + 0.123456789, -3.0], dtype=torch.float64)}
    # Every rule's step is 0.5 (median; the middle one after cutting one at each end; Krum's and
    # multi-Krum's two closest updates).
    updates = [{"w": torch.tensor(d, dtype=torch.float64)} for d in ([0.5, 0.25], [0.5, 0.25], [1.0, 0.5])]
    new = aggregate(rule, g, updates)["w"]
    assert new.dtype == torch.float64
    expected = torch.tensor([1e8 + 0.123456789 + 0.5, -2.75], dtype=torch.float64)
    assert torch.equal(new, expected)
    assert new[0].item() == 100000000.623456789  # float64's nearest value to it
    # (In float32 the step would be lost: float32's values near 1e8 are 8 apart.)


def test_fedavg_and_the_robust_rules_agree_on_a_float64_model():
    g = {"w": torch.tensor([1e8 + 0.123456789], dtype=torch.float64)}
    updates = [{"w": torch.tensor([0.5], dtype=torch.float64)}] * 3
    results = {rule: aggregate(rule, g, updates)["w"] for rule in ALL_RULES}
    assert all(torch.equal(r, results["fedavg"]) for r in results.values()), results


# Item 9: integer and bool tensors are values.

@pytest.mark.parametrize("rule", ALL_RULES)
def test_uint8_clients_at_3_and_7_around_5_give_5(rule):
    # As diffs they were 254 and 2 (uint8), whose mean 128 took the global 5 to 133.
    g = {"w": torch.zeros(1), "level": torch.tensor([5, 252, 1], dtype=torch.uint8)}
    updates = [{"w": torch.zeros(1), "level": torch.tensor(v, dtype=torch.uint8)} for v in ([3, 250, 0], [7, 254, 2])]
    new = aggregate(rule, g, updates)["level"]
    assert new.dtype == torch.uint8
    if rule == "krum:0":  # Krum keeps one update of the two, unchanged
        assert new.tolist() in ([3, 250, 0], [7, 254, 2])
    else:
        assert new.tolist() == [5, 252, 1]


def test_fedavg_weights_uint8_values_and_rounds_half_to_even():
    g = {"level": torch.tensor([5, 5], dtype=torch.uint8)}
    updates = [{"level": torch.tensor(v, dtype=torch.uint8)} for v in ([250, 2], [255, 3])]
    # (250 * 1 + 255 * 3) / 4 = 253.75 -> 254; (2 * 1 + 3 * 3) / 4 = 2.75 -> 3
    assert aggregate("fedavg", g, updates, [1, 3])["level"].tolist() == [254, 3]
    # Equal weights: 252.5 -> 252 and 2.5 -> 2 (half to even, as torch.round)
    assert aggregate("fedavg", g, updates, [1, 1])["level"].tolist() == [252, 2]


def test_a_bool_buffer_takes_the_weighted_majority_and_a_tie_keeps_the_current_value():
    g = {"flags": torch.tensor([False, False, True, True])}
    a, b = {"flags": torch.tensor([True, True, False, False])}, {"flags": torch.tensor([True, False, True, False])}
    assert aggregate("fedavg", g, [a, b], [3, 1])["flags"].tolist() == [True, True, False, False]
    assert aggregate("fedavg", g, [a, b], [1, 3])["flags"].tolist() == [True, False, True, False]
    # Equal weights: where they disagree it is a tie, and the global value stays.
    assert aggregate("fedavg", g, [a, b], [2, 2])["flags"].tolist() == [True, False, True, False]
    g2 = {"flags": torch.tensor([True, True, False, False])}
    assert aggregate("fedavg", g2, [a, b], [2, 2])["flags"].tolist() == [True, True, False, False]


@pytest.mark.parametrize("rule", ROBUST)
def test_the_robust_rules_take_the_majority_of_three_bools(rule):
    g = {"w": torch.zeros(1), "flags": torch.tensor([False, False, True])}
    rows = ([True, True, False], [True, False, False], [False, True, False])
    # The floats make the first two updates Krum's choice (between them, a tie).
    updates = [{"w": torch.tensor([w]), "flags": torch.tensor(r)} for w, r in zip((0.0, 0.0, 9.0), rows)]
    new = aggregate(rule, g, updates)["flags"]
    if rule == "krum:0":
        assert new.tolist() in (rows[0], rows[1])  # one update's values
    elif rule == "multikrum:0:2":
        assert new.tolist() == [True, False, False]  # [T, T] -> T, [T, F] -> tie: current False, [F, F] -> F
    else:
        assert new.tolist() == [True, True, False]


@pytest.mark.parametrize("rule", ALL_RULES)
def test_int64_counters_at_2_pow_40_and_beyond_are_exact(rule):
    g = {"w": torch.zeros(1), "n": torch.tensor([2**40, 2**60, -(2**62)], dtype=torch.int64)}
    values = ([2**40 + 1, 2**60 + 1, -(2**62) + 7], [2**40 + 2, 2**60 + 2, -(2**62) + 8],
              [2**40 + 9, 2**60 + 9, -(2**62) + 9])
    # Krum's choice is one of the first two updates (the floats); multi-Krum's, both.
    updates = [{"w": torch.tensor([w]), "n": torch.tensor(v, dtype=torch.int64)}
               for w, v in zip((0.0, 0.0, 5.0), values)]
    new = aggregate(rule, g, updates)["n"]
    assert new.dtype == torch.int64
    expected = {"fedavg": [2**40 + 4, 2**60 + 4, -(2**62) + 8],  # means 4, 4, 8 above the base
                "median": [2**40 + 2, 2**60 + 2, -(2**62) + 8],
                "trimmed_mean:0.34": [2**40 + 2, 2**60 + 2, -(2**62) + 8],  # one cut at each end
                "multikrum:0:2": [2**40 + 2, 2**60 + 2, -(2**62) + 8]}  # 1.5 -> 2 and 7.5 -> 8: half to even
    if rule == "krum:0":
        assert new.tolist() in (values[0], values[1])
    else:
        assert new.tolist() == expected[rule]


def test_fedavg_of_counters_at_2_pow_40_with_real_sample_counts_is_exact():
    # 60000 * 2**40 is beyond float64's exact integers: only offsets from a reference stay exact.
    g = {"n": torch.tensor(2**40, dtype=torch.int64)}
    updates = [{"n": torch.tensor(2**40 + 10)}, {"n": torch.tensor(2**40 + 14)}, {"n": torch.tensor(2**40 + 30)}]
    # (10 * 60000 + 14 * 20000 + 30 * 20000) / 100000 = 14.8 -> 15
    assert aggregate("fedavg", g, updates, [60000, 20000, 20000])["n"].item() == 2**40 + 15


def test_what_fedavg_gives_a_counter_is_what_the_mean_diff_gave():
    # Today's BatchNorm counters: every client adds its batches to the global count.
    g = {"n": torch.tensor(1234, dtype=torch.int64)}
    batches, weights = (15, 14, 20), (3, 1, 2)
    new = aggregate("fedavg", g, [{"n": g["n"] + b} for b in batches], list(weights))["n"].item()
    mean_diff = sum(b * w for b, w in zip(batches, weights)) / sum(weights)  # 16.5... -> 1234 + 16.5 = 1250.5
    assert new == round(1234 + mean_diff) == 1250  # half to even


def test_dp_fedavg_leaves_integer_and_bool_buffers_as_they_were():
    g = {"w": torch.zeros(2), "level": torch.tensor([5], dtype=torch.uint8), "flags": torch.tensor([True]),
         "n": torch.tensor(2**40)}
    agg = DPFedAvg(specs_of(g), noise_multiplier=0.0, clip=1e6, clients_per_round=2)
    agg.begin_round()
    for v in (3, 7):
        add(agg, {"w": torch.ones(2), "level": torch.tensor([v], dtype=torch.uint8), "flags": torch.tensor([False]),
                  "n": torch.tensor(2**40 + v)}, 10)
    new = agg.finish({k: t.clone() for k, t in g.items()})
    assert new["level"].tolist() == [5] and new["flags"].tolist() == [True] and new["n"].item() == 2**40
    assert new["w"].tolist() == [1.0, 1.0]


def test_values_far_apart_saturate_instead_of_wrapping():
    lo, hi = torch.iinfo(torch.int64).min, torch.iinfo(torch.int64).max
    reference = torch.tensor([hi, lo])
    assert offsets(torch.tensor([lo, hi]), reference).tolist() == [float(lo), float(hi)]
    assert settle(torch.tensor([hi - 1]), torch.tensor([4.0], dtype=torch.float64), torch.tensor([0])).tolist() == [hi]
    assert settle(torch.tensor([300]), torch.tensor([0.0], dtype=torch.float64),
                  torch.tensor([0], dtype=torch.uint8)).tolist() == [255]


# A model with uint8 and bool buffers through a real client round and the server's receive path.

class Flagged(nn.Module):
    """An MLP with a BatchNorm (int64 counter), a uint8 buffer and a bool buffer."""

    def __init__(self, inputs: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, classes))
        self.register_buffer("level", torch.tensor([5, 250], dtype=torch.uint8))
        self.register_buffer("flags", torch.tensor([False, False, True, True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


CLIENT_BUFFERS = {"0": ([3, 255], [True, True, False, False]), "1": ([7, 251], [True, False, True, False])}


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_digits()


@pytest.mark.parametrize("compression", ["none", "int8", "topk:0.5"])
@pytest.mark.parametrize("rule", ["fedavg", "median"])
def test_a_model_with_uint8_and_bool_buffers_goes_through_a_client_round_and_the_server(digits, rule, compression):
    train, _ = digits
    cfg = m.TrainConfig(model=model_spec_for("mlp", train), dataset="", num_clients=2, seed=0, local_epochs=1,
                        batch_size=64, lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    cfg = dataclasses.replace(cfg, compression=compression)
    inputs = int(torch.tensor(cfg.model.input_shape).prod())
    torch.manual_seed(0)
    global_state = {k: v.clone() for k, v in Flagged(inputs, cfg.model.num_classes).state_dict().items()}
    specs = specs_of(global_state)
    agg = make_aggregator(specs, rule, 2)
    receiver = UploadReceiver(specs, codecs.parse(compression), agg.check)
    agg.begin_round()
    counters = []
    for cid, (level, flags) in CLIENT_BUFFERS.items():
        # Real training: the floats and BatchNorm's counter move.
        training = BuiltinTraining(client_share(train, int(cid), 2, 0), model=Flagged(inputs, cfg.model.num_classes))
        task = Task(client_id=cid, round=1, config=cfg, global_state=global_state, device=torch.device("cpu"),
                    seed=seed_for(cfg, cid, 1))
        trained = training.train(task)
        state = {**trained.weights.state_dict(), "level": torch.tensor(level, dtype=torch.uint8),
                 "flags": torch.tensor(flags)}
        counters.append(int(state["net.2.num_batches_tracked"]))
        update = ClientRound(cid).prepare(global_state, task, Result(state, 100, trained.metrics))
        # The top-k residual only concerns floating-point tensors.
        assert set(update.residual) <= {k for k, v in global_state.items() if v.is_floating_point()}
        assert bool(update.residual) == (compression == "topk:0.5")
        checked = receiver.receive(update.header(model_version=0), update.payload.chunks())
        assert checked.diff["level"].tolist() == level and checked.diff["flags"].tolist() == flags
        agg.fold(checked.diff, checked.header.num_samples)
        receiver.release(checked.buffer)
    new = agg.finish({k: v.clone() for k, v in global_state.items()})
    assert new["level"].dtype == torch.uint8 and new["level"].tolist() == [5, 253]  # (3+7)/2, (255+251)/2
    assert new["flags"].tolist() == [True, False, True, False]  # agreed; tie: kept; tie: kept; agreed
    assert min(counters) > 0  # BatchNorm counted the batches of each client's training, from 0
    assert new["net.2.num_batches_tracked"].item() == round(sum(counters) / 2)  # half to even, as round()
    assert all(torch.isfinite(new[k]).all() for k, v in global_state.items() if v.is_floating_point())
    assert not torch.equal(new["net.1.weight"], global_state["net.1.weight"])


def test_fedavg_memory_claim_counts_the_reference_values():
    g = {"w": torch.zeros(4), "level": torch.zeros(8, dtype=torch.uint8)}
    assert FedAvg(specs_of(g)).memory_claim() == 4 * 4 + 8 * 8 + 8 * 8  # float32 sum; float64 sum, int64 reference
