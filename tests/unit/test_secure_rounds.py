"""Secure rounds through the server's own round state and the clients' own secure rounds, in one
process (the protocol's primitives: test_secagg.py; over the wire: tests/integration/test_secure.py)."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch

from common import convert, tensors
from common import messages as m
from common.datasets import load_digits, model_spec_for
from common.models import build_model
from fl_client.round import seed_for
from fl_client.secure import SecureRound
from fl_client.task import Result, Task
from fl_server.aggregation.secure import SecureSum
from fl_server.config import ConfigError, load
from fl_server.errors import NotSelectedError, StaleRoundError
from fl_server.membership import RandomSelector
from fl_server.rounds import RoundRules, RoundState
from fl_tools import simulation

GLOBAL = {"w": torch.tensor([[1.0, -2.0], [0.5, 4.0]]), "b": torch.tensor([0.25, -0.75]),
          "steps": torch.tensor(40, dtype=torch.int64)}


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_digits()


def config(**changes) -> m.TrainConfig:
    spec = m.ModelSpec("custom", (2,), 2)
    return dataclasses.replace(m.TrainConfig(model=spec, secure_aggregation=True, secagg_threshold=2), **changes)


def secure_state(clients: int, **changes) -> RoundState:
    state = RoundState(global_state=GLOBAL, train_config=config(**changes), selector=RandomSelector(0),
                       rules=RoundRules(clients_per_round=clients, min_clients=clients, min_fit=1, round_timeout=60))
    for i in range(clients):
        state.join(m.JoinRequest(client_id=str(i), num_samples=10), 0)
    return state


def run_round(state: RoundState, updates: dict[str, tuple[dict[str, torch.Tensor], int]], upload: set[str],
              reveal: set[str]):
    """One secure round: every selected client exchanges keys; those in `upload` send `updates`, those in
    `reveal` reveal their shares."""
    selected = state.open_round()
    start = {k: v.clone() for k, v in state.global_state.items()}
    round_ = state.model_version + 1
    rounds = simulation.exchange_keys(state, selected, state.train_config, round_, start)
    sent = {}
    for c in sorted(upload):
        local, weight = updates[c]
        task = Task(client_id=c, round=round_, config=state.train_config, global_state=start,
                    device=torch.device("cpu"), seed=seed_for(state.train_config, c, round_))
        update = rounds[c].prepare(start, task, Result(local, weight))
        sent[c] = update
        assert state.submit(update.header(state.model_version), update.payload.chunks()).accepted
    state.begin_unmasking()
    for c in sorted(reveal):
        try:
            lists = state.secure_step(rounds[c].unmask_request(), 0)
        except StaleRoundError:  # the round failed: the client is told to join again
            continue
        state.secure_step(rounds[c].revelation(lists), 0)
    return start, sent, state.close_round()


def moved(start, scale):
    return {k: (v + scale if v.is_floating_point() else v + 1) for k, v in start.items()}


def test_the_server_gets_the_weighted_mean_and_nothing_else(monkeypatch):
    state = secure_state(4)
    updates = {c: (moved(GLOBAL, 0.1 * (int(c) + 1)), 10 * (int(c) + 1)) for c in "0123"}
    start, sent, outcome = run_round(state, updates, upload=set("0123"), reveal=set("0123"))
    assert outcome.aggregated and outcome.contributors == ["0", "1", "2", "3"]
    # The weighted mean of 0.1, 0.2, 0.3, 0.4 by 10, 20, 30, 40: 0.3; within the fixed-point error.
    for name in ("w", "b"):
        assert torch.allclose(state.global_state[name] - start[name], torch.full_like(start[name], 0.3), atol=2**-16)
    assert torch.equal(state.global_state["steps"], start["steps"])  # integer buffers keep their values
    assert outcome.num_samples == 100  # the total weight, learned only from the unmasked sum
    # What the server received from one client is one int64 vector whose header says nothing of its weight.
    header = sent["3"].header(0)
    assert header.num_samples == 1 and [s.name for s in header.payload.specs] == ["masked"]


def test_a_client_gone_before_its_upload_and_one_gone_after_leave_an_exact_mean():
    state = secure_state(6, secagg_threshold=3)
    updates = {c: (moved(GLOBAL, 0.1 * (int(c) + 1)), 10) for c in "012345"}
    # "5" vanishes after the key exchange; "4" uploads, then never reveals.
    start, _, outcome = run_round(state, updates, upload=set("01234"), reveal=set("0123"))
    assert outcome.aggregated and outcome.contributors == ["0", "1", "2", "3", "4"]
    expected = sum(0.1 * (i + 1) for i in range(5)) / 5
    assert torch.allclose(state.global_state["w"] - start["w"], torch.full_like(start["w"], expected), atol=2**-16)


def test_below_the_threshold_the_round_is_not_aggregated():
    state = secure_state(4, secagg_threshold=3)
    updates = {c: (moved(GLOBAL, 0.5), 10) for c in "0123"}
    before = {k: v.clone() for k, v in state.global_state.items()}
    _, _, outcome = run_round(state, updates, upload={"0", "1"}, reveal={"0", "1"})
    assert not outcome.aggregated
    assert all("not unmasked" in outcome.drop_reasons[c] or "fewer than the threshold" in outcome.drop_reasons[c]
               for c in ("0", "1"))
    assert all(torch.equal(state.global_state[k], before[k]) for k in before)  # the model is untouched
    assert state.model_version == 0


def test_too_few_reveals_re_run_the_round_rather_than_guess():
    state = secure_state(4, secagg_threshold=3)
    updates = {c: (moved(GLOBAL, 0.5), 10) for c in "0123"}
    _, _, outcome = run_round(state, updates, upload=set("0123"), reveal={"0", "1"})
    assert not outcome.aggregated and state.model_version == 0


def test_a_masked_update_says_nothing_of_the_update():
    state = secure_state(4)
    big = {"w": torch.randn(2, 2), "b": torch.randn(2), "steps": torch.tensor(40)}
    updates = {c: ({**big, "w": torch.full((2, 2), 1.0 + int(c))}, 10) for c in "0123"}
    _, sent, _ = run_round(state, updates, upload=set("0123"), reveal=set("0123"))
    values = [tensors.decode(u.payload.specs, u.payload.data)["masked"].numpy().view(np.uint64) for u in sent.values()]
    # Uniform 64-bit words: about half of each vector's bits are set, whatever the update.
    for v in values:
        bits = np.unpackbits(v.view(np.uint8))
        assert 0.4 < bits.mean() < 0.6


def test_secure_and_plain_fedavg_learn_alike_on_digits(digits):
    """The issue's comparison: 10 clients, 10 rounds, the same seeds; within 0.5 points after every round."""
    train, test = digits
    runs = {}
    for secure in (False, True):
        accuracy, finals = [], []
        simulation.run(train, test, clients=10, rounds=10, model="mlp", secure_aggregation=secure,
                       on_round=lambda _v, r, a=accuracy: a.append(r.accuracy), on_final=finals.append)
        runs[secure] = accuracy, finals[0]
    assert all(abs(a - b) <= 0.005 for a, b in zip(runs[False][0], runs[True][0])), runs
    difference = max(float((runs[False][1][k] - runs[True][1][k]).abs().max()) for k in runs[False][1])
    assert difference < 1e-3  # fixed point: at most 2**-17 per value per round, compounded by training


def test_secure_rounds_with_a_sparse_graph_and_a_dropout(digits):
    train, test = digits
    outcomes = []
    simulation.run(train, test, clients=8, rounds=2, model="mlp", secure_aggregation=True, secagg_neighbours=4,
                   drop_after_keys=lambda round_, selected: [selected[0]] if round_ == 1 else [],
                   on_outcome=outcomes.append)
    assert all(o.aggregated for o in outcomes)
    assert len(outcomes[0].contributors) == 7 and len(outcomes[1].contributors) == 8


def test_secure_aggregation_refuses_what_cannot_combine_with_it():
    for changes, key in [({"aggregator": "median"}, "aggregator"), ({"compression": "int8"}, "compression"),
                         ({"dp_noise_multiplier": 1.0}, "dp_noise_multiplier")]:
        with pytest.raises(ConfigError, match=key):
            load(None, secure_aggregation=True, **changes)


def test_the_threshold_defaults_to_a_majority_of_the_neighbourhood():
    cfg = load(None, secure_aggregation=True, clients_per_round=10)
    spec = m.ModelSpec("mlp", (1, 8, 8), 10)
    assert cfg.train_config(spec).secagg_threshold == 5  # 9 neighbours: 9 // 2 + 1
    assert load(None, secure_aggregation=True, clients_per_round=50, secagg_neighbours=8).train_config(
        spec).secagg_threshold == 5


def test_the_secure_sum_keeps_the_contract_of_memory():
    specs = tensors.specs_of(build_model(model_spec_for("mlp", load_digits()[0])).state_dict())
    agg = SecureSum(specs)
    assert agg.specs[0].shape == (agg.length + 1,) and agg.memory_claim() >= 8 * (agg.length + 1)


def test_the_graph_is_sparse_by_default_beyond_ten_clients():
    spec = m.ModelSpec("mlp", (1, 8, 8), 10)
    for clients, neighbours, threshold in [(10, 9, 5), (50, 13, 7), (1000, 21, 11)]:
        cfg = load(None, secure_aggregation=True, clients_per_round=clients).train_config(spec)
        assert (cfg.secagg_neighbours, cfg.secagg_threshold) == (neighbours, threshold)


def test_a_simulated_secure_round_below_the_threshold_is_re_run(digits):
    train, test = digits
    outcomes = []
    # Round 1's first attempt loses two of four clients after the key exchange: with threshold 3, the
    # round cannot be unmasked and is run again with a fresh sample (in which nobody vanishes).
    simulation.run(train, test, clients=4, rounds=1, model="mlp", secure_aggregation=True, secagg_threshold=3,
                   drop_after_keys=lambda r, selected: selected[:2] if not outcomes else [],
                   on_outcome=outcomes.append)
    assert [o.aggregated for o in outcomes] == [False, True]


def test_uploads_outside_the_protocol_are_refused():
    state = secure_state(4)
    selected = state.open_round()
    # A selected client that has not exchanged keys cannot put anything into the sum.
    bogus = {"masked": torch.zeros(SecureSum(tensors.specs_of(GLOBAL)).length + 1, dtype=torch.int64)}
    payload = tensors.encode(bogus)
    header = m.UpdateHeader(client_id=selected[0], round=1, model_version=0, num_samples=1000,
                            payload=convert.payload_header_of(payload, m.Encoding.DIFF, tensors.CHUNK_SIZE))
    with pytest.raises(NotSelectedError, match="takes masked updates only from the clients that exchanged keys"):
        state.submit(header, payload.chunks())


def test_waiting_clients_do_not_wake_each_other_in_a_loop():
    state = secure_state(3)
    state.open_round()
    calls = []
    handle = state.secure.handle

    def counted(r, req):
        calls.append(req.client_id)
        return handle(r, req)

    state.secure.handle = counted
    rnd = SecureRound("0", state.train_config, 1, state.global_state, lambda req: state.secure_step(req, 0))
    threads = [threading.Thread(target=state.secure_step, args=(rnd.advertisement(), 1.0))]
    other = SecureRound("1", state.train_config, 1, state.global_state, lambda req: state.secure_step(req, 0))
    threads.append(threading.Thread(target=state.secure_step, args=(other.advertisement(), 1.0)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) < 20  # each waits for the stage; before, they woke each other some 80,000 times a second
