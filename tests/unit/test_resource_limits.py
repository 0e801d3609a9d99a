"""The limits that hold before a client is authenticated: deadlines for a stream's first message and for an
upload's progress, the cap on concurrent calls, and the monitoring endpoint's protections. The deadlines
here are short real ones (a fraction of a second); each test waits on what the deadline must cause, with
GUARD as a bound against hanging, never a timing assertion."""
import asyncio
import http.client
import socket
import ssl
import threading
import time

import grpc
import pytest
import torch

from common import convert, tls
from common.messages import Action, JoinRequest
from common.proto import federation_pb2 as pb
from fl_client.connection import retryable
from fl_server import uploads
from fl_server.deadlines import Deadlines
from fl_server.monitoring import MonitoringServer
from fl_server.servicer import FederationServicer
from fl_server.transport import create_server, server_options
from tests.unit.test_rounds import GUARD, diff, started, update
from tests.unit.test_servicer import Aborted, Context


def test_a_deadline_fires_once_and_moves_when_extended():
    deadlines = Deadlines()
    fired = threading.Event()
    timer = deadlines.arm(0.05, fired.set)
    assert fired.wait(GUARD)
    assert timer.cancel()  # reports that it fired
    extended = threading.Event()
    timer = deadlines.arm(0.2, extended.set)
    extended_at = time.monotonic()
    timer.extend(0.6)
    assert extended.wait(GUARD)
    assert time.monotonic() - extended_at >= 0.5
    cancelled = deadlines.arm(0.05, lambda: pytest.fail("a cancelled deadline fired"))
    assert not cancelled.cancel()
    time.sleep(0.1)
    assert deadlines.pending() == 0


class StallingStream:
    """An upload's chunks: the first `before` ones, then nothing until the call is ended (`interrupt`)."""

    def __init__(self, chunks, before):
        self.chunks, self.before = list(chunks), before
        self.ended = threading.Event()
        self.why = None

    def interrupt(self, why):
        self.why = why
        self.ended.set()

    def __iter__(self):
        yield from self.chunks[:self.before]
        assert self.ended.wait(GUARD), "the stalled upload was never ended"
        # grpc's request iterator then ends, as a stream closed early does


def stalled_upload(state, cid, before=0):
    header, payload = update(state, cid, diff(1.0), chunk_size=4)
    stream = StallingStream(payload.chunks(4), before)
    state.uploads.progress_timeout = 0.2
    with pytest.raises(uploads.UploadStalledError, match="stalled"):
        state.submit(header, iter(stream), interrupt=stream.interrupt)
    assert stream.why is not None and "upload_progress_timeout" in stream.why
    return header, payload


def test_a_stalled_upload_frees_its_buffer_and_its_client_is_given_up_on():
    state = started(k=2, min_fit=1, max_concurrent_uploads=1, timeout=3600.0)
    stalled_upload(state, "a", before=1)  # sends a chunk, then nothing
    # The only receive buffer is free again: b's upload goes through at once.
    header_b, payload_b = update(state, "b", diff(3.0))
    assert state.submit(header_b, payload_b.chunks()).accepted
    # a is given up on for the round, with the reason, and not reinstated by a heartbeat or a retry.
    assert state.wait_for(lambda: state.status()["clients"]["a"]["state"] == "silent", GUARD)
    assert state.join(JoinRequest(client_id="a", num_samples=10, training_round=1), 0).action.name == "WAIT"
    assert state.join(JoinRequest(client_id="a", num_samples=10), 0).action.name == "WAIT"
    header_a, payload_a = update(state, "a", diff(1.0))
    with pytest.raises(Exception, match="given up on"):
        state.submit(header_a, payload_a.chunks())
    state.wait_until_complete()  # settled: b in, a given up on; not the hour-long deadline
    outcome = state.close_round()
    assert outcome.contributors == ["b"] and "stalled" in outcome.drop_reasons["a"]
    assert torch.equal(state.global_state["w"], torch.full((3,), 3.0))
    # The next round may select a again.
    state.open_round()
    assert state.join(JoinRequest(client_id="a", num_samples=10), 0).action.name == "TRAIN"


def test_an_upload_that_sends_nothing_after_admission_stalls_too():
    state = started(k=1, max_concurrent_uploads=1, timeout=3600.0)
    (cid,) = state.status()["selected"]
    stalled_upload(state, cid, before=0)
    assert state.uploads._buffers.qsize() == 1


def test_an_update_stream_without_a_header_is_ended_at_the_first_message_deadline():
    state = started(k=1)
    servicer = FederationServicer(state, first_message_timeout=0.2)

    class SilentStream(Context):
        async def read(self):  # the header never comes
            await asyncio.sleep(GUARD)
            raise AssertionError("the idle stream was never ended")

    context = SilentStream()
    with pytest.raises(Aborted, match="first_message_timeout"):
        asyncio.run(servicer.SubmitUpdate(None, context))
    assert context.code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.idle_streams_ended == 1 and servicer.awaiting_header == 0


def test_a_real_server_caps_calls_and_ends_idle_streams():
    """Through gRPC: calls beyond max_workers get RESOURCE_EXHAUSTED at once; a stream that sends no header
    gets DEADLINE_EXCEEDED with the reason when first_message_timeout passes, and its thread is freed."""
    state = started(k=1)
    servicer = FederationServicer(state, first_message_timeout=0.5, max_rpcs=4)
    server, port = create_server(servicer, "127.0.0.1", 0)
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    submit = channel.stream_unary(convert.SUBMIT_UPDATE, request_serializer=convert.raw,
                                  response_deserializer=pb.SubmitReply.FromString)
    hold = threading.Event()

    def silent():
        hold.wait(GUARD)
        yield from ()

    try:
        idle = [submit.future(silent(), timeout=GUARD) for _ in range(4)]
        # Let the four reach their handlers (a late one would only be refused below instead), where they wait
        # for their headers holding no thread. On a busy machine that takes longer than any fixed pause.
        deadline = time.monotonic() + GUARD
        while servicer.awaiting_header < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not servicer.threads._threads, "an idle stream holds a call thread"
        with pytest.raises(grpc.RpcError) as refused:
            submit(silent(), timeout=GUARD)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retryable(refused.value.code(), refused.value.details())
        for call in idle:
            assert call.exception(GUARD) is not None
            assert call.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "first_message_timeout" in call.details()
        # Their places are free again: a new call is served.
        join = channel.unary_unary(convert.JOIN_ROUND, request_serializer=pb.JoinRequest.SerializeToString,
                                   response_deserializer=pb.JoinReply.FromString)
        # (a heartbeat, answered at once: the state's clock is a FakeClock, which a long-poll would wait on)
        # The ended calls' handlers return a moment after their clients have the status: until then they
        # still count against the cap, and a call is refused as fl-client would retry it.
        request = convert.join_request_to_proto(JoinRequest(client_id="x", num_samples=1, training_round=1))
        deadline = time.monotonic() + GUARD
        while True:
            try:
                reply = join(request, timeout=GUARD)
                break
            except grpc.RpcError as e:
                if e.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        assert convert.join_decision_from_proto(reply).action is Action.WAIT  # no round 1 is open
    finally:
        hold.set()
        channel.close()
        server.stop(None).wait()


def test_calls_not_yet_picked_up_queue_up_to_the_call_cap_rather_than_being_dropped(monkeypatch):
    """gRPC core drops calls the server has not picked up yet, as a bare CANCELLED, past 1,000 of them by
    default: a burst of 2,000 idle streams then cancelled honest calls too. The queue follows max_rpcs (never
    below gRPC's defaults), bounded at twice the cap."""
    options = dict(server_options(max_rpcs=8192))
    assert options["grpc.server.max_pending_requests"] == 8192
    assert options["grpc.server.max_pending_requests_hard_limit"] == 2 * 8192
    small = dict(server_options(max_rpcs=4))
    assert (small["grpc.server.max_pending_requests"], small["grpc.server.max_pending_requests_hard_limit"]) == \
        (1000, 3000)
    given = {}
    real_server = grpc.aio.server

    def spy(*args, options=(), **kw):
        given.update(options)
        return real_server(*args, options=options, **kw)

    monkeypatch.setattr(grpc.aio, "server", spy)
    server, _ = create_server(FederationServicer(started(k=1), max_rpcs=5000), "127.0.0.1", 0)
    server.stop(None).wait()
    assert given["grpc.server.max_pending_requests"] == 5000
    assert given["grpc.server.max_pending_requests_hard_limit"] == 10000


def test_only_the_call_cap_is_retried_among_resource_exhausted():
    assert retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
    assert not retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, "Received message larger than max")
    assert retryable(grpc.StatusCode.UNAVAILABLE, "")
    # A full client registry (open mode) frees places as clients leave: fl-client tries again later.
    assert retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, "the client registry is full: the server already keeps")


def monitoring(**kw):
    state = started(k=1)
    server = MonitoringServer(state, lambda: [], "127.0.0.1", 0, **kw)
    server.start()
    return server


def get(port, path, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=GUARD)
    connection.request("GET", path, headers=headers or {})
    reply = connection.getresponse()
    return reply.status, reply.read()


def test_monitoring_needs_the_token_when_one_is_set():
    server = monitoring(token="s" * 20)
    try:
        assert get(server.port, "/status")[0] == 401
        assert get(server.port, "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
        status, body = get(server.port, "/metrics", {"Authorization": "Bearer " + "s" * 20})
        assert status == 200 and b"fl_round" in body
    finally:
        server.stop()


def test_a_half_sent_request_blocks_no_one_and_times_out():
    server = monitoring(request_timeout=0.5)
    try:
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert get(server.port, "/metrics")[0] == 200  # served meanwhile, on its own thread
        half.settimeout(GUARD)
        assert half.recv(1024) == b""  # closed by the server after its socket timeout
        half.close()
    finally:
        server.stop()


def test_monitoring_speaks_tls_with_the_given_certificate(tmp_path):
    tls.make_certificates(tmp_path, ["localhost"], [])
    server = monitoring(tls=(str(tmp_path / "server.pem"), str(tmp_path / "server.key")), token="t" * 20)
    try:
        context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        connection = http.client.HTTPSConnection("localhost", server.port, timeout=GUARD, context=context)
        connection.request("GET", "/status", headers={"Authorization": "Bearer " + "t" * 20})
        reply = connection.getresponse()
        assert reply.status == 200 and b"phase" in reply.read()
        # A client that connects and never starts the handshake holds only its own thread.
        silent = socket.create_connection(("127.0.0.1", server.port))
        connection = http.client.HTTPSConnection("localhost", server.port, timeout=GUARD, context=context)
        connection.request("GET", "/metrics", headers={"Authorization": "Bearer " + "t" * 20})
        assert connection.getresponse().status == 200
        silent.close()
    finally:
        server.stop()


def test_call_threads_are_made_with_the_configured_stack(monkeypatch):
    from fl_server import transport

    sizes = []
    original = threading.stack_size

    def recording(*size):
        if size:
            sizes.append(size[0])
        return original(*size)

    monkeypatch.setattr(transport.threading, "stack_size", recording)
    pool = transport.CallThreads(2, stack_kib=256)
    pool.submit(lambda: None).result(GUARD)
    pool.shutdown()
    assert sizes[:2] == [256 * 1024, 0]  # set for the pool's new thread, then put back
    assert original() == 0
