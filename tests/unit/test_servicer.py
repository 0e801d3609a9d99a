"""The gRPC layer's own policies, driven directly with a stand-in for grpc.ServicerContext."""
import asyncio
import dataclasses
import threading

import grpc
import pytest
import torch

from common import convert, tensors
from common.messages import Action, Encoding, JoinRequest, ModelRequest, ModelSpec, TrainConfig, UpdateHeader
from common.tensors import CHUNK_SIZE
from fl_server import servicer as servicer_module
from fl_server.rounds import RoundRules, RoundState
from fl_server.servicer import FederationServicer

GUARD = 30.0  # real seconds after which a thread that should have finished counts as hung; never a timing assertion
CONFIG = TrainConfig(model=ModelSpec("mlp", (1, 2, 2), 2), dataset="digits", num_clients=1, seed=0,
                     local_epochs=1, batch_size=4, lr=0.1, momentum=0.0, weight_decay=0.0, optimizer="sgd")


class Aborted(Exception):
    pass


class Context:
    def __init__(self, time_remaining=None, on_time_remaining=lambda: None):
        self._time_remaining = time_remaining
        self._on_time_remaining = on_time_remaining  # the servicer asks just before it waits for a slot
        self.code = None

    def time_remaining(self):
        self._on_time_remaining()
        return self._time_remaining

    def abort(self, code, details):
        self.code, self.details = code, details
        raise Aborted(details)

    def peer(self):
        return "test"


def servicer(max_downloads):
    rules = RoundRules(clients_per_round=1, min_clients=1, min_fit=1, round_timeout=5)
    state = RoundState(global_state={"w": torch.arange(3.0)}, train_config=CONFIG, rules=rules)
    return FederationServicer(state, max_downloads=max_downloads)


def request():
    return convert.model_request_to_proto(ModelRequest(client_id="a", model_version=0)).SerializeToString()


class StreamContext(Context):
    """A download's context: records what is written; with `hold`, the first write waits for it."""

    def __init__(self, time_remaining=None, hold=None):
        super().__init__(time_remaining)
        self.written, self.hold = [], hold

    async def write(self, message):
        self.written.append(message)
        if self.hold is not None:
            await self.hold.wait()


async def written_soon(context):
    async with asyncio.timeout(GUARD):
        while not context.written:
            await asyncio.sleep(0.01)


def test_downloads_beyond_the_limit_wait_their_turn():
    async def main():
        s = servicer(max_downloads=1)
        release = asyncio.Event()
        first_context = StreamContext(hold=release)
        first = asyncio.create_task(s.GetGlobalModel(request(), first_context))
        await written_soon(first_context)  # it holds the only slot while streaming
        # No slot is left for another download meanwhile: one that may not wait at all is turned away.
        impatient = StreamContext(time_remaining=0)
        with pytest.raises(Aborted, match="try again"):
            await s.GetGlobalModel(request(), impatient)
        assert impatient.code is grpc.StatusCode.UNAVAILABLE
        second_context = StreamContext()  # no deadline: it waits for the slot
        second = asyncio.create_task(s.GetGlobalModel(request(), second_context))
        await asyncio.sleep(0.2)
        assert second_context.written == []
        release.set()  # the first stream ends and frees its slot
        async with asyncio.timeout(GUARD):
            await first
            await second
        assert second_context.written == first_context.written == s._stream[1]

    asyncio.run(main())


def test_a_download_that_cannot_get_a_slot_before_its_deadline_is_told_to_retry():
    async def main():
        s = servicer(max_downloads=1)
        holder_context = StreamContext(hold=asyncio.Event())
        holder = asyncio.create_task(s.GetGlobalModel(request(), holder_context))
        await written_soon(holder_context)
        context = StreamContext(time_remaining=0.1)
        with pytest.raises(Aborted, match="try again"):
            await s.GetGlobalModel(request(), context)
        assert context.code is grpc.StatusCode.UNAVAILABLE  # which fl-client retries with backoff
        holder.cancel()  # a cancelled stream frees its slot too
        with pytest.raises(asyncio.CancelledError):
            await holder
        again = StreamContext()
        async with asyncio.timeout(GUARD):
            await s.GetGlobalModel(request(), again)
        assert len(again.written) >= 2

    asyncio.run(main())


def test_a_model_request_waits_for_the_version_being_serialized():
    s = servicer(max_downloads=1)
    snapshot = s.state.publisher.current
    with s._streams_lock:
        s._stream = None  # as while _cache_stream serializes a newly published version
    served = {}
    asking = threading.Thread(target=lambda: served.update(stream=s._stream_for(snapshot, 0)), daemon=True)
    asking.start()
    s._cache_stream(snapshot)  # the serialization ends
    asking.join(GUARD)
    assert served["stream"] == s._stream[1]  # served, not refused as a version that is gone


def join(s, training_round=0):
    raw = convert.join_request_to_proto(JoinRequest(client_id="a", num_samples=10,
                                                    training_round=training_round)).SerializeToString()
    return convert.join_decision_from_proto(asyncio.run(s.JoinRound(raw, Context(time_remaining=1.0))))  # no long-poll


def test_a_small_model_rides_in_the_train_answer_and_uploads_need_no_admission():
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    decision = join(s)
    assert decision.action is Action.TRAIN and decision.upload_admitted  # a receive buffer for each selected
    assert list(decision.model_stream) == s._stream[1]  # what GetGlobalModel would have streamed
    header = convert.model_header_from_raw(decision.model_stream[0])
    assert header.model_version == decision.model_version
    heartbeat = join(s, training_round=decision.round)
    assert heartbeat.action is Action.TRAIN and heartbeat.model_stream == ()  # heartbeats carry no model


def test_a_larger_model_is_fetched_and_uploads_wait_for_admission_when_buffers_are_fewer(monkeypatch):
    monkeypatch.setattr(servicer_module, "INLINE_MODEL_BYTES", 10)
    s = servicer(max_downloads=1)
    s.state.uploads.max_concurrent = 0  # fewer receive buffers than selected clients
    join(s)
    s.state.open_round()
    decision = join(s)
    assert decision.action is Action.TRAIN and decision.model_stream == () and not decision.upload_admitted


class UpdateContext(Context):
    """An update stream's context: `messages` are what the client sent."""

    def __init__(self, messages, time_remaining=None):
        super().__init__(time_remaining)
        self.messages = list(messages)

    async def read(self):
        return self.messages.pop(0) if self.messages else grpc.aio.EOF


def inline_update(decision, diff, join_after=False, num_chunks=None):
    """The one message of an update whose data is inside its header."""
    payload = tensors.encode(diff)
    header = UpdateHeader(client_id="a", round=decision.round, model_version=decision.model_version, num_samples=10,
                          payload=convert.payload_header_of(payload, Encoding.DIFF, CHUNK_SIZE), join_after=join_after)
    if num_chunks is not None:
        header = dataclasses.replace(header, payload=dataclasses.replace(header.payload, num_chunks=num_chunks))
    return next(convert.update_stream(header, payload, CHUNK_SIZE, inline=True)), header


def next_round(state):
    """What the coordinator does between two rounds, without evaluating or saving."""
    state.wait_until_complete()
    state.close_round()
    state.open_round()


def test_a_small_update_travels_inside_its_header_and_its_answer_brings_the_next_round():
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    decision = join(s)
    assert decision.inline_upload_bytes == servicer_module.INLINE_UPLOAD_BYTES
    raw, _ = inline_update(decision, {"w": torch.ones(3)}, join_after=True)
    context = UpdateContext([raw], time_remaining=GUARD)

    async def main():
        submitting = asyncio.create_task(s.SubmitUpdate(None, context))
        await asyncio.to_thread(next_round, s.state)  # the update completes the round; the next one opens
        return await asyncio.wait_for(submitting, GUARD)

    reply = convert.submit_result_from_proto(asyncio.run(main()))
    assert reply.accepted and context.code is None
    assert torch.equal(s.state.global_state["w"], torch.arange(3.0) + 1)  # one client: global + its diff
    # The answer waited for the client's next join: round 2, with the new model in it, and no JoinRound call.
    assert reply.next.action is Action.TRAIN and reply.next.round == decision.round + 1
    assert list(reply.next.model_stream) == s._stream[1] and reply.next.model_version == s.state.model_version
    assert s.state.members.clients["a"].num_samples == 10  # the join was the update's client's, with its samples


def test_an_update_without_join_after_is_answered_at_once_without_a_next_join():
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    raw, _ = inline_update(join(s), {"w": torch.ones(3)})
    reply = convert.submit_result_from_proto(asyncio.run(s.SubmitUpdate(None, UpdateContext([raw]))))
    assert reply.accepted and reply.next is None


@pytest.mark.parametrize("too_big, num_chunks, expected", [
    (True, None, "may not travel inside its header"),
    (False, 2, "announced 2 chunks but sent 1"),
])
def test_an_inline_update_that_breaks_the_rules_is_refused_and_changes_nothing(monkeypatch, too_big, num_chunks,
                                                                                 expected):
    if too_big:
        monkeypatch.setattr(servicer_module, "INLINE_UPLOAD_BYTES", 4)
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    raw, _ = inline_update(join(s), {"w": torch.ones(3)}, join_after=True, num_chunks=num_chunks)
    context = UpdateContext([raw])
    with pytest.raises(Aborted, match=expected):
        asyncio.run(s.SubmitUpdate(None, context))
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert not s.state._round.submitted and torch.equal(s.state.global_state["w"], torch.arange(3.0))


def test_an_update_sent_again_after_its_round_closed_is_answered_as_counted():
    # The answer to an update asking for join_after waits for the next round: a link that fails meanwhile
    # makes fl-client send the update again, to a server whose round has moved on.
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    raw, _ = inline_update(join(s), {"w": torch.ones(3)})
    assert convert.submit_result_from_proto(asyncio.run(s.SubmitUpdate(None, UpdateContext([raw])))).accepted
    next_round(s.state)
    again = convert.submit_result_from_proto(asyncio.run(s.SubmitUpdate(None, UpdateContext([raw]))))
    assert again.accepted and again.duplicate and "already counted" in again.message
    assert torch.equal(s.state.global_state["w"], torch.arange(3.0) + 1)  # counted once
    assert not s.state._round.submitted  # and not into the round now open


def test_more_messages_after_an_update_inside_its_header_are_refused():
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    raw, _ = inline_update(join(s), {"w": torch.ones(3)})
    context = UpdateContext([raw, convert.encode_data_chunk(b"\0" * 12)])
    with pytest.raises(Aborted, match="more followed"):
        asyncio.run(s.SubmitUpdate(None, context))
    assert context.code is grpc.StatusCode.INVALID_ARGUMENT and not s.state._round.submitted


def test_a_secure_round_answers_an_update_at_once_even_when_asked_to_join_after(monkeypatch):
    class Stages:  # a secure round whose uploads are open to every selected client
        def check_upload(self, client_id):
            pass

    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    monkeypatch.setattr(s.state, "secure", Stages())
    raw, _ = inline_update(join(s), {"w": torch.ones(3)}, join_after=True)

    async def main():  # long enough to hold, were it to: the answer must come before the round moves on
        return await asyncio.wait_for(s.SubmitUpdate(None, UpdateContext([raw], time_remaining=GUARD)), GUARD / 2)

    reply = convert.submit_result_from_proto(asyncio.run(main()))
    assert reply.accepted and reply.next is None


def test_a_new_update_for_a_re_run_of_a_closed_round_is_not_taken_for_a_copy():
    # A round that failed min_fit is re-run under the same number and version: an update of the re-run
    # that comes after it closed is stale, not a copy of the update the failed run counted.
    s = servicer(max_downloads=1)
    join(s)
    s.state.open_round()
    decision = join(s)
    first, _ = inline_update(decision, {"w": torch.ones(3)})
    assert convert.submit_result_from_proto(asyncio.run(s.SubmitUpdate(None, UpdateContext([first])))).accepted
    next_round(s.state)
    other, _ = inline_update(decision, {"w": torch.full((3,), 2.0)})  # same round and version, other bytes
    context = UpdateContext([other])
    with pytest.raises(Aborted, match="join again"):
        asyncio.run(s.SubmitUpdate(None, context))
    assert context.code is grpc.StatusCode.FAILED_PRECONDITION


def test_an_update_inside_its_header_whose_stream_stays_open_is_refused(monkeypatch):
    class HeldOpen(UpdateContext):
        async def read(self):
            if self.messages:
                return self.messages.pop(0)
            await asyncio.sleep(GUARD)  # never ends the stream

    s = servicer(max_downloads=1)
    s.first_message_timeout = 0.2
    join(s)
    s.state.open_round()
    raw, _ = inline_update(join(s), {"w": torch.ones(3)})
    with pytest.raises(Aborted, match="stream stayed open"):
        asyncio.run(s.SubmitUpdate(None, HeldOpen([raw])))
    assert not s.state._round.submitted
