"""The round state machine, driven directly. Its time is a FakeClock that moves only when a test moves it,
and threads are ordered by events and by states the test observes, never by a guessed delay: nothing here depends
on how fast the machine is."""
import logging
import threading

import pytest
import torch

from common import tensors
from common.messages import (
    Action,
    Encoding,
    JoinRequest,
    ModelRequest,
    ModelSpec,
    PayloadHeader,
    TrainConfig,
    UpdateHeader,
)
from fl_server import errors, uploads
from fl_server.membership import RandomSelector
from fl_server.rounds import RoundRules, RoundState, ServerLimits

CONFIG = TrainConfig(model=ModelSpec("mlp", (1, 2, 2), 2), dataset="digits", num_clients=3, seed=0,
                     local_epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, optimizer="sgd")
GLOBAL = {"w": torch.zeros(3), "n": torch.tensor(0, dtype=torch.int64)}
# Real seconds after which a thread that should have finished counts as hung: a guard against hanging,
# never a timing assertion. Nothing waits this long unless the behaviour under test is broken.
GUARD = 30.0
# A long-poll timeout (in the fake clock's seconds) longer than GUARD: RoundState waits on its condition for
# as many real seconds (see FakeClock), so a poll that returns within GUARD was woken, not timed out.
LONG_POLL = 10 * GUARD


def make_state(k=2, min_fit=None, timeout=5.0, *, global_state=GLOBAL, train_config=CONFIG, clock=None,
               heartbeat_seconds=2.0, seed=0, **limits):
    """Every RoundState of these tests is made here, on a FakeClock unless given another clock; `limits`
    are ServerLimits' fields."""
    rules = RoundRules(clients_per_round=k, min_clients=k, min_fit=min_fit or k, round_timeout=timeout,
                       heartbeat_seconds=heartbeat_seconds)
    return RoundState(global_state=global_state, train_config=train_config, rules=rules,
                      selector=RandomSelector(seed), clock=clock or FakeClock(), limits=ServerLimits(**limits))


class FakeClock:
    """A RoundState's clock that stands still until the test advances it.

    It remembers which threads have read it since it last moved, so that a test can wait until a thread
    has looked at the new time. RoundState's condition waits still time out after real seconds (the
    difference between the fake deadline and the fake now), so moving this clock wakes no one by itself:
    `advance` below wakes the state's waiters too."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self._changed = threading.Condition()
        self._moves = 0
        self._seen: dict[threading.Thread, int] = {}  # thread -> self._moves when it last read the time
        self._last = threading.local()

    def __call__(self) -> float:
        with self._changed:
            self._seen[threading.current_thread()] = self._moves
            self._last.now = self.now
            self._changed.notify_all()
            return self.now

    def last_read(self) -> float:
        """The time the calling thread read last."""
        return self._last.now

    def advance(self, seconds: float) -> None:
        with self._changed:
            self.now += seconds
            self._moves += 1

    def wait_until_read_by(self, thread: threading.Thread) -> None:
        """Until `thread` has read the time since the clock last moved, or has ended."""
        with self._changed:
            assert self._changed.wait_for(
                lambda: self._seen.get(thread) == self._moves or not thread.is_alive(), GUARD), \
                f"{thread.name} never looked at the time"

    def thread_ended(self) -> None:
        with self._changed:
            self._changed.notify_all()


# settled() and advance() are the only places these tests reach into RoundState's lock (see the hooks it
# should provide): to wake its waiters when the fake time moves, and to know a waiter has seen the new time.

def settled(state, thread):
    """Return once `thread`, which waits in `state` and looks at the time holding the state's lock, has
    looked at the clock's current time and is waiting again, or has returned."""
    state.clock.wait_until_read_by(thread)
    with state._cond:  # it holds the lock from looking at the time until it waits again or returns
        pass


def advance(state, seconds, waiter=None):
    """Move the state's fake clock and wake its waiters; with `waiter` (a Coordinator), return once it
    has checked the round at the new time."""
    with state._cond:  # no one looks at the time while it moves: each check sees one time throughout
        state.clock.advance(seconds)
        state._cond.notify_all()
    if waiter is not None:
        settled(state, waiter.thread)


class Coordinator:
    """`wait_until_complete` on a thread of its own, as the coordinator's loop calls it."""

    def __init__(self, state):
        self.state = state
        self.returned_at = None  # the time wait_until_complete last looked at before it returned
        self.error = None
        self.thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.state.wait_until_complete()
            self.returned_at = self.state.clock.last_read()
        except BaseException as e:  # re-raised in the test's thread by join()
            self.error = e
        finally:
            self.state.clock.thread_ended()

    def join(self):
        """Wait for wait_until_complete to return; the fake time at which it decided to."""
        self.thread.join(GUARD)
        assert not self.thread.is_alive(), "wait_until_complete did not return"
        if self.error is not None:
            raise self.error
        return self.returned_at


def promptly(call, *args, **kwargs):
    """`call(...)`'s result, if it returns without being woken: the fake clock stands still meanwhile, so a
    call that waits for time to pass (as a long-poll does) never returns, and this fails after GUARD."""
    result = {}

    def run():
        try:
            result["value"] = call(*args, **kwargs)
        except BaseException as e:  # re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(GUARD)
    assert not thread.is_alive(), f"{getattr(call, '__name__', call)} was held instead of answered at once"
    if "error" in result:
        raise result["error"]
    return result["value"]


def wait_until(state, predicate, what):
    """Until `predicate()` holds: RoundState wakes its waiters at every change, so the test is ordered
    after the state, not after a guessed delay."""
    assert state.wait_for(predicate, GUARD), f"never saw: {what}"


def client_state(state, cid):
    return state.status()["clients"][cid]["state"]


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
    poller = threading.Thread(target=lambda: result.update(decision=join(state, "a", timeout=LONG_POLL)),
                              daemon=True)
    poller.start()
    wait_until(state, lambda: "a" in state.status()["clients"] and client_state(state, "a") == "waiting",
               "a's long-poll being held")
    state.open_round()
    # The clock stands still and the poll's timeout is longer than GUARD: only the round opening ends it.
    poller.join(GUARD)
    assert not poller.is_alive(), "the long-poll was not woken when the round opened"
    assert result["decision"].action is Action.TRAIN


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
    state = started(k=2, min_fit=2, timeout=5.0)  # "b"'s silence limit is 8 s: the deadline comes first
    opened = state.clock.now
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    advance(state, 4.9, coordinator)  # it checked the round just before the deadline, and waits on
    advance(state, 0.2, coordinator)
    assert coordinator.join() == pytest.approx(opened + 5.1)  # released as soon as the deadline passed
    outcome = state.close_round()
    assert not outcome.aggregated and outcome.dropped == ["b"]
    assert state.model_version == 0 and torch.equal(state.global_state["w"], torch.zeros(3))


def test_deadline_with_quorum_aggregates_what_arrived():
    state = started(k=2, min_fit=1, timeout=5.0)
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    advance(state, 5.1)
    coordinator.join()
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
    """A heartbeat with a long-poll's timeout, which must be answered at once all the same."""
    return promptly(state.join, JoinRequest(client_id=cid, num_samples=10, training_round=round_), LONG_POLL)


def test_heartbeat_answers_at_once_carry_on_or_stop():
    state = started()
    d = heartbeat(state, "a", 1)  # never held as a long-poll, whatever the answer
    assert d.action is Action.TRAIN and d.round == 1 and d.heartbeat_seconds == 2.0
    assert heartbeat(state, "a", 5).action is Action.WAIT  # not the open round
    submit(state, "a", diff(1.0))
    assert heartbeat(state, "a", 1).action is Action.WAIT  # already delivered
    state.close_round()
    assert heartbeat(state, "b", 1).action is Action.WAIT  # round closed: stop training


def test_silent_client_is_given_up_on_long_before_the_deadline():
    state = started(k=2, min_fit=1, timeout=60.0)  # heartbeats every 2 s: silence limit 3 * 2 + 2 = 8 s
    opened = state.clock.now
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    advance(state, state.members.silence_limit - 0.5, coordinator)
    assert client_state(state, "b") == "training"  # quiet, but not for long enough
    advance(state, 1.0, coordinator)
    assert coordinator.join() == pytest.approx(opened + state.members.silence_limit + 0.5)  # not the 60 s deadline
    outcome = state.close_round()
    assert outcome.aggregated and outcome.contributors == ["a"]
    assert "silent" in outcome.drop_reasons["b"]
    # Not sampled again while it stays silent; "a", which calls again, is.
    join(state, "a")
    assert state.members.live() == ["a"]


def test_a_client_that_keeps_sending_heartbeats_is_waited_for():
    state = started(k=2, min_fit=2, timeout=60.0)  # silence limit 8 s
    opened = state.clock.now
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    for _ in range(6):  # 12 s of training in all, well past the silence limit
        advance(state, state.rules.heartbeat_seconds, coordinator)
        assert client_state(state, "b") == "training"
        assert heartbeat(state, "b", 1).action is Action.TRAIN
    submit(state, "b", diff(3.0))
    assert coordinator.join() == pytest.approx(opened + 12.0)  # waited until b's update came in
    outcome = state.close_round()
    assert outcome.contributors == ["a", "b"] and outcome.drop_reasons == {}
    assert torch.allclose(state.global_state["w"], torch.full((3,), 2.0))


def test_a_client_waiting_for_its_download_is_not_given_up_on_and_is_heard_from_when_it_ends():
    """A thousand clients fetching through max_downloads slots: one may wait longer than the silence limit
    for its turn, with no heartbeat (fl-client starts them once it has the model)."""
    state = started(k=2, min_fit=2, timeout=60.0)  # silence limit 8 s
    opened = state.clock.now
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    with state.downloading("b"):
        for _ in range(6):  # 12 s waiting for a download slot, well past the silence limit
            advance(state, state.rules.heartbeat_seconds, coordinator)
            assert "b" not in state._round.silent
    advance(state, state.members.silence_limit - 0.5, coordinator)  # silent since the download ended, not long
    assert "b" not in state._round.silent
    submit(state, "b", diff(3.0))
    assert coordinator.join() == pytest.approx(opened + 12.0 + state.members.silence_limit - 0.5)
    assert state.close_round().contributors == ["a", "b"]


def test_a_client_that_reports_a_failed_round_is_not_waited_for():
    state = started(k=2, min_fit=1, timeout=60.0)
    opened = state.clock.now
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    failed = promptly(state.join, JoinRequest(client_id="b", num_samples=10, training_round=1,
                                              failure="ValueError: bad batch"), LONG_POLL)
    assert failed.action is Action.WAIT
    assert coordinator.join() == pytest.approx(opened)  # closed at once: neither the silence limit nor the deadline
    # Not offered the round again, nor reinstated by a heartbeat, nor let upload into it.
    assert join(state, "b").action is Action.WAIT
    assert heartbeat(state, "b", 1).action is Action.WAIT
    with pytest.raises(errors.NotSelectedError, match="failed on the client: ValueError: bad batch"):
        submit(state, "b", diff(3.0))
    outcome = state.close_round()
    assert outcome.contributors == ["a"]
    assert outcome.drop_reasons == {"b": "failed on the client: ValueError: bad batch"}


def test_a_failure_report_for_another_round_changes_nothing():
    state = started(k=2, min_fit=2, timeout=60.0)
    promptly(state.join, JoinRequest(client_id="b", num_samples=10, training_round=7, failure="old news"), LONG_POLL)
    assert heartbeat(state, "b", 1).action is Action.TRAIN


def test_rerun_below_quorum_records_why():
    state = started(k=2, min_fit=2, timeout=5.0)
    submit(state, "a", diff(1.0))
    coordinator = Coordinator(state)
    advance(state, 5.1)
    coordinator.join()
    outcome = state.close_round()
    assert not outcome.aggregated
    assert outcome.drop_reasons == {"b": "no update by the round's deadline"}


def test_compressed_updates_are_decoded_and_other_codecs_refused():
    from dataclasses import replace

    from common import codecs

    state = make_state(k=1, train_config=replace(CONFIG, compression="int8"))
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
    clock = FakeClock()
    state = started(max_concurrent_uploads=1, clock=clock)
    header_a, payload_a = update(state, "a", diff(1.0))
    header_b, payload_b = update(state, "b", diff(3.0))
    a_admitted, release_a, b_admitted = threading.Event(), threading.Event(), threading.Event()
    a_released_when_b_was_admitted = []

    def held_chunks():
        assert release_a.wait(GUARD)
        yield from payload_a.chunks()

    def admit_b():
        a_released_when_b_was_admitted.append(release_a.is_set())
        b_admitted.set()

    uploading_a = threading.Thread(target=state.submit, args=(header_a, held_chunks()),
                                   kwargs={"on_admitted": a_admitted.set}, daemon=True)
    uploading_a.start()
    assert a_admitted.wait(GUARD)  # a holds the only buffer now, until its update is in and folded
    uploading_b = threading.Thread(target=state.submit, args=(header_b, payload_b.chunks()),
                                   kwargs={"on_admitted": admit_b}, daemon=True)
    uploading_b.start()
    clock.wait_until_read_by(uploading_b)  # b noted when it began to wait for a buffer
    assert client_state(state, "b") == "uploading"
    # A bounded look for a wrong admission, which cannot fail a correct RoundState however slow the machine.
    assert not b_admitted.wait(0.1)
    advance(state, 5.0)  # b waits 5 s (of the fake clock) for a's buffer
    release_a.set()
    assert b_admitted.wait(GUARD)
    uploading_a.join(GUARD)
    uploading_b.join(GUARD)
    assert a_released_when_b_was_admitted == [True]
    state.wait_until_complete()
    assert state.close_round().contributors == ["a", "b"]
    assert torch.equal(state.global_state["w"], torch.full((3,), 2.0))
    # The log says how long each upload waited for its buffer: a not at all, b the 5 s it was held back.
    waits = {m.split()[4]: float(m.split("waited ")[1].split()[0]) for m in caplog.messages if "waited" in m}
    assert waits == {"a": 0.0, "b": 5.0}


def test_closing_a_round_waits_for_accepted_updates_to_be_folded(monkeypatch):
    state = started()
    real_fold = state.aggregator.fold
    folds_may_run = threading.Event()

    def held_fold(*args):
        assert folds_may_run.wait(GUARD)
        real_fold(*args)

    monkeypatch.setattr(state.aggregator, "fold", held_fold)
    assert submit(state, "a", diff(1.0)).accepted  # answered while its fold is held back
    assert submit(state, "b", diff(3.0)).accepted
    closing = {}
    closer = threading.Thread(target=lambda: closing.update(outcome=state.close_round()), daemon=True)
    closer.start()
    # Closed to uploads, and waiting (status() takes the lock close_round releases only to wait).
    wait_until(state, lambda: state.status()["phase"] == "waiting", "the round closed to uploads")
    assert "outcome" not in closing
    folds_may_run.set()
    closer.join(GUARD)
    assert not closer.is_alive(), "close_round did not return once the folds were done"
    outcome = closing["outcome"]
    assert outcome.aggregated and outcome.contributors == ["a", "b"]
    assert torch.equal(state.global_state["w"], torch.full((3,), 2.0))


def test_a_round_reuses_the_replaced_model_as_its_sums():
    state = started(k=1)
    initial = state.global_state["w"]
    submit(state, "a", diff(1.0))
    state.close_round()  # round 1's model lives in round 1's sums; the initial model is retired
    after_round_1 = state.global_state["w"]
    state.open_round()
    coordinator = Coordinator(state)  # wait_until_complete prepares round 2's sums in the retired model's memory
    settled(state, coordinator.thread)  # ...before it checks the round, and waits
    submit(state, "a", diff(2.0))
    coordinator.join()
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


def test_a_join_that_names_no_device_keeps_the_one_the_client_named():
    # The join held after an update (SubmitUpdate's join_after) is made from the update's header, which
    # names no device: the server's log and /status keep showing the one the client joined with.
    state = make_state()
    state.join(JoinRequest(client_id="a", num_samples=10, device="cuda:1"), 0)
    state.join(JoinRequest(client_id="a", num_samples=12), 0)
    info = state.members.clients["a"]
    assert (info.device, info.num_samples) == ("cuda:1", 12)
