"""The gRPC layer's own policies, driven directly with a stand-in for grpc.ServicerContext."""
import asyncio
import threading

import grpc
import pytest
import torch

from common import convert
from common.messages import Action, JoinRequest, ModelRequest, ModelSpec, TrainConfig
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
