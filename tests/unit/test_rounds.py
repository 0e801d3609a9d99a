import logging
import threading
import time

import pytest
import torch

from common import tensors
from common.messages import Action, Encoding, JoinRequest, ModelRequest, ModelSpec, PayloadHeader, TrainConfig, UpdateHeader
from fl_server import errors, uploads
from fl_server.membership import RandomSelector
from fl_server.rounds import RoundRules, RoundState

CONFIG = TrainConfig(model=ModelSpec("mlp", (1, 2, 2), 2), dataset="digits", num_clients=3, seed=0,
                     local_epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, optimizer="sgd")
GLOBAL = {"w": torch.zeros(3), "n": torch.tensor(0, dtype=torch.int64)}


def make_state(k=2, min_fit=None, timeout=5.0, heartbeat_seconds=2.0, seed=0, global_state=GLOBAL, config=CONFIG,
               **kw):
    rules = RoundRules(clients_per_round=k, min_clients=k, min_fit=min_fit or k, round_timeout=timeout,
                       heartbeat_seconds=heartbeat_seconds)
    return RoundState(global_state=global_state, train_config=config, rules=rules, selector=RandomSelector(seed), **kw)


def join(state, cid, timeout=0.0):
    return state.join(JoinRequest(client_id=cid, num_samples=10), timeout)


def update(state, cid, diff, num_samples=10, round_=None, version=None, encoding=Encoding.DIFF, chunk_size=None):
    payload = tensors.encode(diff)
    num_chunks = payload.num_chunks(chunk_size) if chunk_size else payload.num_chunks()
    header = UpdateHeader(client_id=cid, round=state.model_version + 1 if round_ is None else round_,
                          model_version=state.model_version if version is None else version,
                          num_samples=num_samples,
                          payload=PayloadHeader(payload.specs, payload.total_bytes, num_chunks,
                                                payload.checksum, encoding))
    return header, payload


def submit(state, cid, diff, **kw):
    header, payload = update(state, cid, diff, **kw)
    return state.submit(header, payload.chunks())


def diff(value, n=0):
    return {"w": torch.full((3,), float(value)), "n": torch.tensor(n, dtype=torch.int64)}


def started(k=2, **kw):
    state = make_state(k, **kw)
    for cid in ("a", "b")[:k]:
        join(state, cid)
    state.open_round()
    return state


def test_waits_until_a_round_needs_the_client():
    state = make_state()
    decision = join(state, "a")
    assert decision.action is Action.WAIT
    assert decision.config == CONFIG  # a waiting client can already prepare its data


def test_selected_clients_get_train_with_round_and_version():
    state = started()
    d = join(state, "a")
    assert (d.action, d.round, d.model_version) == (Action.TRAIN, 1, 0)


def test_long_poll_wakes_the_moment_a_round_opens():
    state = make_state(k=1)
    result = {}

    def poll():
        start = time.monotonic()
        result["decision"] = join(state, "a", timeout=10.0)
        result["waited"] = time.monotonic() - start

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.2)
    state.open_round()
    t.join(5)
    assert result["decision"].action is Action.TRAIN
    assert result["waited"] < 2.0


def test_full_round_aggregates_by_weight():
    state = started()
    assert submit(state, "a", diff(1.0, 2), num_samples=1).accepted
    assert submit(state, "b", diff(4.0, 2), num_samples=3).accepted
    state.wait_until_complete()  # returns at once: all in
    outcome = state.close_round()
    assert outcome.aggregated and outcome.contributors == ["a", "b"] and outcome.num_samples == 4
    assert torch.allclose(state.global_state["w"], torch.full((3,), 3.25))
    assert state.global_state["n"].item() == 2
    assert state.model_version == 1
    assert state.model(ModelRequest("a")).version == 1
    assert state.global_checksum == tensors.encode(state.global_state).checksum  # what checkpoints reuse


def test_duplicate_submission_counts_once():
    state = started()
    submit(state, "a", diff(1.0))
    again = submit(state, "a", diff(100.0))
    assert again.accepted and again.duplicate
    submit(state, "b", diff(1.0))
    state.close_round()
    assert torch.allclose(state.global_state["w"], torch.ones(3))


def test_after_submitting_a_client_waits():
    state = started()
    submit(state, "a", diff(1.0))
    assert join(state, "a").action is Action.WAIT


@pytest.mark.parametrize("kw, error", [
    ({"round_": 7}, errors.StaleRoundError),
    ({"version": 3}, errors.StaleRoundError),
])
def test_stale_updates_are_refused(kw, error):
    state = started()
    with pytest.raises(error):
        submit(state, "a", diff(1.0), **kw)


def test_update_for_a_closed_round_is_stale():
    state = started()
    header, payload = update(state, "a", diff(1.0))
    state.close_round()
    with pytest.raises(errors.StaleRoundError):
        state.submit(header, payload.chunks())


def test_unknown_and_unselected_clients_are_refused():
    state = started(k=1)
    with pytest.raises(errors.UnknownClientError):
        submit(state, "stranger", diff(1.0))
    join(state, "b")
    selected = state._round.selected
    other = "b" if selected == ["a"] else "a"
    with pytest.raises(errors.NotSelectedError):
        submit(state, other, diff(1.0))


def test_protocol_version_is_checked():
    state = make_state()
    with pytest.raises(errors.ProtocolMismatchError, match="protocol version 99"):
        state.join(JoinRequest(client_id="a", num_samples=1, protocol_version=99), 0)


@pytest.mark.parametrize("bad_diff, kw", [
    ({"w": torch.full((3,), float("nan")), "n": torch.tensor(0)}, {}),
    ({"w": torch.zeros(4), "n": torch.tensor(0)}, {}),
    ({"w": torch.zeros(3, dtype=torch.float16), "n": torch.tensor(0)}, {}),
    ({"w": torch.zeros(3)}, {}),
    (diff(1.0), {"num_samples": 0}),
    (diff(1.0), {"encoding": Encoding.FULL_WEIGHTS}),
])
def test_invalid_update_never_touches_the_aggregate(bad_diff, kw):
    state = started(min_fit=1)
    submit(state, "a", diff(2.0), num_samples=5)
    with pytest.raises(errors.InvalidUpdateError):
        submit(state, "b", bad_diff, **kw)
    assert join(state, "b").action is Action.TRAIN  # may still send a good one
    assert state.close_round().contributors == ["a"]
    assert torch.equal(state.global_state["w"], torch.full((3,), 2.0))


def test_corrupted_and_truncated_streams_are_refused():
    state = started()
    distinct = {"w": torch.tensor([1.0, 2.0, 3.0]), "n": torch.tensor(4)}
    header, payload = update(state, "a", distinct, chunk_size=4)
    chunks = list(payload.chunks(4))
    with pytest.raises(errors.InvalidUpdateError, match="checksum"):
        state.submit(header, [chunks[1], chunks[0], *chunks[2:]])
    with pytest.raises(errors.InvalidUpdateError):
        state.submit(header, chunks[:-1])
    with pytest.raises(errors.InvalidUpdateError, match="longer"):
        state.submit(header, [*chunks, b"x"])
    with pytest.raises(errors.InvalidUpdateError, match="announced 5 chunks but sent 1"):
        state.submit(header, [payload.data])
    # After all that, the honest upload still goes through.
    assert state.submit(header, chunks).accepted


def test_lying_size_in_header_is_refused_before_allocating():
    state = started()
    header, payload = update(state, "a", diff(1.0))
    huge = tensors.TensorSpec("w", "float32", (25_000_000_000,))
    lying = UpdateHeader(client_id="a", round=1, model_version=0, num_samples=1,
                         payload=PayloadHeader([huge, header.payload.specs[1]], 100 * 2**30, 1, 0, Encoding.DIFF))
    with pytest.raises(errors.InvalidUpdateError, match="tensor 'w'"):
        state.submit(lying, iter(()))


def test_deadline_closes_round_below_min_fit_without_aggregating():
    state = started(k=2, min_fit=2, timeout=0.2)
    submit(state, "a", diff(1.0))
    start = time.monotonic()
    state.wait_until_complete()
    assert time.monotonic() - start < 2.0
    outcome = state.close_round()
    assert not outcome.aggregated and outcome.dropped == ["b"]
    assert state.model_version == 0 and torch.equal(state.global_state["w"], torch.zeros(3))


def test_deadline_with_quorum_aggregates_what_arrived():
    state = started(k=2, min_fit=1, timeout=0.2)
    submit(state, "a", diff(1.0))
    state.wait_until_complete()
    outcome = state.close_round()
    assert outcome.aggregated and outcome.contributors == ["a"] and outcome.dropped == ["b"]
    assert torch.allclose(state.global_state["w"], torch.ones(3))


def test_finished_and_stale_model_requests():
    state = started()
    submit(state, "a", diff(1.0))
    submit(state, "b", diff(1.0))
    state.close_round()
    with pytest.raises(errors.StaleRoundError):
        state.model(ModelRequest("a", model_version=0 + 5))
    state.finish()
    assert join(state, "a").action is Action.FINISHED


def test_sampling_is_seeded():
    def sample(seed):
        state = make_state(k=2, seed=seed)
        for cid in "abcdefgh":
            join(state, cid)
        state.min_clients = 2
        return state.open_round()

    assert sample(1) == sample(1)
    assert len({tuple(sample(s)) for s in range(10)}) > 1


def heartbeat(state, cid, round_):
    return state.join(JoinRequest(client_id=cid, num_samples=10, training_round=round_), 10.0)


def test_heartbeat_answers_at_once_carry_on_or_stop():
    state = started()
    start = time.monotonic()
    d = heartbeat(state, "a", 1)
    assert d.action is Action.TRAIN and d.round == 1 and d.heartbeat_seconds == 2.0
    assert time.monotonic() - start < 1.0  # not held as a long-poll
    assert heartbeat(state, "a", 5).action is Action.WAIT  # not the open round
    submit(state, "a", diff(1.0))
    assert heartbeat(state, "a", 1).action is Action.WAIT  # already delivered
    state.close_round()
    assert heartbeat(state, "b", 1).action is Action.WAIT  # round closed: stop training


def test_silent_client_is_given_up_on_long_before_the_deadline():
    state = started(k=2, min_fit=1, timeout=60.0, heartbeat_seconds=0.1)  # silence limit 2.3 s
    submit(state, "a", diff(1.0))
    start = time.monotonic()
    state.wait_until_complete()
    assert 2.0 < time.monotonic() - start < 10.0
    outcome = state.close_round()
    assert outcome.aggregated and outcome.contributors == ["a"]
    assert "silent" in outcome.drop_reasons["b"]
    # Not sampled again while it stays silent; "a", which calls again, is.
    join(state, "a")
    assert state.members.live() == ["a"]


def test_a_client_that_keeps_sending_heartbeats_is_waited_for():
    state = started(k=2, min_fit=2, timeout=60.0, heartbeat_seconds=0.1)
    submit(state, "a", diff(1.0))
    stop = threading.Event()

    def beat():
        while not stop.wait(0.1):
            heartbeat(state, "b", 1)

    t = threading.Thread(target=beat)
    t.start()
    threading.Timer(3.5, lambda: (stop.set(), submit(state, "b", diff(3.0)))).start()
    state.wait_until_complete()
    t.join()
    outcome = state.close_round()
    assert outcome.contributors == ["a", "b"] and outcome.drop_reasons == {}
    assert torch.allclose(state.global_state["w"], torch.full((3,), 2.0))


def test_rerun_below_quorum_records_why():
    state = started(k=2, min_fit=2, timeout=0.3)
    submit(state, "a", diff(1.0))
    state.wait_until_complete()
    outcome = state.close_round()
    assert not outcome.aggregated
    assert outcome.drop_reasons == {"b": "no update by the round's deadline"}


def test_compressed_updates_are_decoded_and_other_codecs_refused():
    from dataclasses import replace

    from common import codecs

    state = make_state(k=1, config=replace(CONFIG, compression="int8"))
    join(state, "a")
    state.open_round()
    with pytest.raises(errors.InvalidUpdateError, match="compressed with 'none'"):
        submit(state, "a", diff(1.0))
    wire = codecs.encode(diff(1.0, 3), codecs.parse("int8"))
    payload = tensors.encode(wire)
    header = UpdateHeader(client_id="a", round=1, model_version=0, num_samples=4,
                          payload=PayloadHeader(payload.specs, payload.total_bytes, payload.num_chunks(),
                                                payload.checksum, Encoding.DIFF, "int8"))
    assert state.submit(header, payload.chunks()).accepted
    outcome = state.close_round()
    assert outcome.bytes_in == payload.total_bytes < tensors.encode(diff(1.0)).total_bytes
    assert torch.allclose(state.global_state["w"], torch.ones(3)) and state.global_state["n"].item() == 3


def test_data_is_read_only_after_the_upload_is_admitted():
    state = started(max_concurrent_uploads=1)
    header, payload = update(state, "a", diff(1.0))
    events = []

    def chunks():
        events.append("first chunk read")
        yield from payload.chunks()

    state.submit(header, chunks(), on_admitted=lambda: events.append("admitted"))
    assert events == ["admitted", "first chunk read"]


def test_an_upload_waits_for_a_free_buffer_before_it_is_admitted(caplog):
    caplog.set_level(logging.INFO, logger="fl_server.rounds")
    state = started(max_concurrent_uploads=1)
    header_a, payload_a = update(state, "a", diff(1.0))
    header_b, payload_b = update(state, "b", diff(3.0))
    release_a, b_admitted = threading.Event(), threading.Event()

    def slow_chunks():
        release_a.wait(5)
        yield from payload_a.chunks()

    uploading_a = threading.Thread(target=state.submit, args=(header_a, slow_chunks()))
    uploading_a.start()
    time.sleep(0.1)  # a holds the only buffer now
    uploading_b = threading.Thread(target=state.submit, args=(header_b, payload_b.chunks()),
                                   kwargs={"on_admitted": b_admitted.set})
    uploading_b.start()
    assert not b_admitted.wait(0.3)
    release_a.set()
    assert b_admitted.wait(5)
    uploading_a.join(5)
    uploading_b.join(5)
    state.wait_until_complete()
    assert state.close_round().contributors == ["a", "b"]
    assert torch.equal(state.global_state["w"], torch.full((3,), 2.0))
    # The log says how long each upload waited for its buffer: b at least the 0.3 s it was held back.
    waits = {m.split()[4]: float(m.split("waited ")[1].split()[0]) for m in caplog.messages if "waited" in m}
    assert waits["a"] < 0.3 <= waits["b"]


def test_closing_a_round_waits_for_accepted_updates_to_be_folded(monkeypatch):
    state = started()
    real_fold = state.aggregator.fold

    def slow_fold(*args):
        time.sleep(0.3)
        real_fold(*args)

    monkeypatch.setattr(state.aggregator, "fold", slow_fold)
    assert submit(state, "a", diff(1.0)).accepted  # answered before its fold is done
    assert submit(state, "b", diff(3.0)).accepted
    outcome = state.close_round()
    assert outcome.aggregated and outcome.contributors == ["a", "b"]
    assert torch.equal(state.global_state["w"], torch.full((3,), 2.0))


def test_a_round_reuses_the_replaced_model_as_its_sums():
    state = started(k=1)
    initial = state.global_state["w"]
    submit(state, "a", diff(1.0))
    state.close_round()  # round 1's model lives in round 1's sums; the initial model is retired
    after_round_1 = state.global_state["w"]
    state.open_round()
    threading.Thread(target=lambda: (time.sleep(0.1), submit(state, "a", diff(2.0)))).start()
    state.wait_until_complete()  # prepares round 2's sums in the retired model's memory
    state.close_round()
    assert torch.equal(state.global_state["w"], torch.full((3,), 3.0))
    assert state.global_state["w"].data_ptr() == initial.data_ptr()
    assert torch.equal(after_round_1, torch.full((3,), 1.0))  # the model before is left alone


def test_automatic_upload_concurrency_fits_a_memory_budget():
    small = make_state()  # a 20-byte model: as many uploads at once as fit in the budget, up to a cap
    assert small.uploads.max_concurrent == uploads.MAX_AUTO_UPLOADS
    medium = make_state(global_state={"w": torch.zeros(1_000_000)})
    assert medium.uploads.max_concurrent == uploads.UPLOAD_MEMORY // 4_000_000
    big = make_state(global_state={"w": torch.zeros(20_000_000)})
    assert big.uploads.max_concurrent == 1  # 80 MB: one at a time
    assert make_state(max_concurrent_uploads=3).uploads.max_concurrent == 3
