"""The gRPC layer: parse, call one method of `RoundState`, map its exceptions to one status each.

The server is gRPC's asyncio server, on a loop of its own thread (`Server`). A JoinRound long-poll and an
update stream waiting for its header hold no thread, only a coroutine: 10,000 clients polling cost 10,000
small objects, not 10,000 threads (each taking the GIL to wake). Work that blocks runs on the call
threads (`CallThreads`): an update's receiving and checking (`state.submit`), model downloads, secure
aggregation's stages and the health checks."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import random
import threading
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from common import convert, tls, tokens
from common.messages import Action, JoinDecision
from common.proto import federation_pb2 as pb
from common.tensors import CHUNK_SIZE
from fl_server import errors
from fl_server.publication import ModelSnapshot
from fl_server.refusals import RefusalLog
from fl_server.rounds import RoundState

log = logging.getLogger("fl_server.servicer")

# How long JoinRound holds a call open before answering WAIT (config: long_poll_seconds). Every idle client
# renews its poll this often: with 10,000 clients, 10 s polls were 1,000 calls a second for nothing.
LONG_POLL_SECONDS = 25.0
STREAM_WAIT = 30.0  # seconds a model request waits for its version's stream to be serialized
# A model whose whole GetGlobalModel stream is at most this many bytes rides in the TRAIN answer to
# JoinRound, saving each selected client a call. Small, because every such answer holds its own copies
# of it (protobuf's, then gRPC's), where model streams are bounded by max_downloads.
INLINE_MODEL_BYTES = 64 * 1024
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds an update stream may take to send its header (config: first_message_timeout)
MAX_RPCS = 8192  # calls served at once (config: max_rpcs); also the most call threads there may be
THREAD_STACK_KIB = 512  # each call thread's stack (config: rpc_thread_stack_kib)
KEEPALIVE_SECONDS, KEEPALIVE_TIMEOUT = 30.0, 10.0  # server pings (config: keepalive_seconds, keepalive_timeout)


class IdentityMismatchError(Exception):
    """The client's credentials belong to another client than its request names."""


class UnauthenticatedError(Exception):
    """The request carries no valid credentials."""


STATUS_FOR = {
    IdentityMismatchError: grpc.StatusCode.PERMISSION_DENIED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    convert.MalformedMessage: grpc.StatusCode.INVALID_ARGUMENT,
    errors.InvalidUpdateError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ProtocolMismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnknownClientError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StaleRoundError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NotSelectedError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UploadInProgressError: grpc.StatusCode.ABORTED,
    errors.InvalidJoinError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RegistryFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UploadStalledError: grpc.StatusCode.DEADLINE_EXCEEDED,
}


REFUSALS = RefusalLog(log)


def _refusal(context: grpc.ServicerContext | grpc.aio.ServicerContext, error: Exception) -> grpc.StatusCode:
    code = next(code for kind, code in STATUS_FOR.items() if isinstance(error, kind))
    REFUSALS.refused(context.peer(), code, error)
    return code


def _abort(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    """End a call served on a thread with the status of `error`."""
    context.abort(_refusal(context, error), str(error))
    raise AssertionError("unreachable: context.abort raises")


async def _abort_async(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    """End a call served on the loop with the status of `error`."""
    await context.abort(_refusal(context, error), str(error))
    raise AssertionError("unreachable: context.abort raises")


_REFUSABLE = tuple(STATUS_FOR)


class ThreadedReads:
    """An asyncio call's remaining request messages, for blocking code on a call thread
    (`RoundState.submit`) to take as a plain iterator.

    Once the upload is admitted (`admit`, from the thread: its initial metadata goes out then), a task on
    the loop reads the messages and hands them over, at most AHEAD of them ahead of the reader, so that
    an upload still waits on gRPC's flow control rather than in this process's memory. A small update
    (a message or two) crosses threads once each way, not once per read (each crossing wakes the loop
    or a thread: for a small model's round, such hand-offs were a third of the server's CPU).
    `interrupt(why)`, from any thread, ends the stream: the reader sees it end (the upload's receiver
    then raises UploadStalledError, which ends the call with DEADLINE_EXCEEDED)."""

    AHEAD = 4

    def __init__(self, context: grpc.aio.ServicerContext, loop: asyncio.AbstractEventLoop):
        self._context = context
        self._loop = loop
        self._ready = threading.Condition()
        self._messages: collections.deque[bytes | BaseException | None] = collections.deque()  # None: the end
        self._room = asyncio.Event()  # set on the loop when the reader has taken messages
        self._task: asyncio.Task[None] | None = None
        self.interrupted = ""

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._ready:
            while not self._messages and not self.interrupted:
                self._ready.wait()
            if self.interrupted:
                raise StopIteration
            message = self._messages.popleft()
            if len(self._messages) == self.AHEAD - 1:  # the loop may be waiting for room
                self._loop.call_soon_threadsafe(self._room.set)
        if message is None:
            raise StopIteration
        if isinstance(message, BaseException):
            raise message
        return message

    def admit(self) -> None:
        """Tell the client it may send its data now (see fl_client.connection), and start reading it."""
        self._loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        if not self.interrupted:
            self._task = self._loop.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            await self._context.send_initial_metadata(convert.UPLOAD_ADMITTED)
            while True:
                while len(self._messages) >= self.AHEAD:
                    self._room.clear()
                    await self._room.wait()
                message = await self._context.read()
                self._hand_over(None if message is grpc.aio.EOF else message)
                if message is grpc.aio.EOF:
                    return
        except asyncio.CancelledError:
            self._hand_over(None)
            raise
        except Exception as e:  # noqa: BLE001 - the reader raises it (the client went away, ...)
            self._hand_over(e)

    def _hand_over(self, message: bytes | BaseException | None) -> None:
        with self._ready:
            self._messages.append(message)
            self._ready.notify()

    def interrupt(self, why: str) -> None:
        with self._ready:
            self.interrupted = why
            self._ready.notify_all()
        self._loop.call_soon_threadsafe(self._cancel)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class FederationServicer:
    """The three RPCs. The streaming ones take and give serialized messages (see common.convert)."""

    def __init__(self, state: RoundState, long_poll: float = LONG_POLL_SECONDS, check_identity: bool = False,
                 client_tokens: dict[str, str] | None = None, max_downloads: int = 8,
                 first_message_timeout: float = FIRST_MESSAGE_TIMEOUT, max_rpcs: int = MAX_RPCS,
                 thread_stack_kib: int = THREAD_STACK_KIB):
        self.state = state
        # An update stream's identity is checked on its first message (the header), so a stream that
        # never sends one is anonymous: it holds a place among max_rpcs only until this deadline.
        self.first_message_timeout = first_message_timeout
        self.awaiting_header = 0  # update streams waiting for their header now (on the loop: no lock)
        self.idle_streams_ended = 0  # streams ended for sending no header in time
        # The cap on calls served at once, and the threads for calls' blocking work: never more than that.
        self.max_rpcs = max_rpcs
        self.threads = CallThreads(max_rpcs, thread_stack_kib)
        # Each stream being served holds about one chunk in gRPC's send path; bounding how many are
        # served at once bounds that memory whatever the number of clients (measured: 50 concurrent
        # streams held 1.4 models of memory, 10 held 0.27). The others wait their turn, which costs no
        # throughput when the server's link or CPU is what limits the transfers.
        self._download_slots = threading.Semaphore(max_downloads)
        self.long_poll = long_poll
        self._jitter = random.Random()
        # With mutual TLS, a client may only act as the id in its certificate; with tokens, as the id
        # whose secret it presents.
        self.check_identity = check_identity
        self.client_tokens = client_tokens
        # Each model version's stream, serialized once when the version is published and replayed to
        # every client that asks for it: (version, messages).
        self._streams_lock = threading.Lock()
        self._stream_made = threading.Condition(self._streams_lock)
        self._stream: tuple[int, list[bytes]] | None = None
        state.subscribe(self._cache_stream)

    async def JoinRound(self, request: bytes, context: grpc.aio.ServicerContext) -> pb.JoinReply:
        try:
            req = convert.join_request_from_raw(request)
            self._check_identity(context, req.client_id)
            decision = await self.state.join_async(req, self._long_poll_for(context))
            if decision.action is Action.TRAIN and not req.training_round:  # not to heartbeats
                decision = self._with_small_model(decision)
            return convert.join_decision_to_proto(decision)
        except _REFUSABLE as e:
            await _abort_async(context, e)

    def GetGlobalModel(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            req = convert.model_request_from_raw(request)
            self._check_identity(context, req.client_id)
            snapshot = self.state.model(req)
            stream = self._stream_for(snapshot, req.model_version)
        except _REFUSABLE as e:
            _abort(context, e)
        with self.state.downloading(req.client_id):
            if not self._download_slots.acquire(timeout=context.time_remaining()):
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is busy sending the model to other "
                                                           "clients until this call's deadline; try again")
            try:
                yield from stream
            finally:
                self._download_slots.release()
        self.state.count_sent(sum(map(len, stream)))  # reached only when the whole stream went out

    def SecureAggregation(self, request: bytes, context: grpc.ServicerContext) -> pb.SecAggReply:
        try:
            req = convert.secagg_request_from_raw(request)
            self._check_identity(context, req.client_id)
            return convert.secagg_reply_to_proto(self.state.secure_step(req, self._long_poll_for(context)))
        except _REFUSABLE as e:
            _abort(context, e)

    def _with_small_model(self, decision: JoinDecision) -> JoinDecision:
        """`decision` carrying its model's stream when that is cached and small (INLINE_MODEL_BYTES)."""
        with self._streams_lock:
            cached = self._stream
        if cached is None or cached[0] != decision.model_version:
            return decision
        size = sum(map(len, cached[1]))
        if size > INLINE_MODEL_BYTES:
            return decision
        self.state.count_sent(size)
        return dataclasses.replace(decision, model_stream=tuple(cached[1]))

    def _long_poll_for(self, context: grpc.ServicerContext) -> float:
        """How long a long-poll may hold the call: answer before the client's own deadline runs out, or it
        would see DEADLINE_EXCEEDED; and a random fifth less at most, so that clients that all joined at once
        (10,000 at a server's start) do not renew their polls in one wave every long_poll seconds."""
        remaining = context.time_remaining()
        hold = self.long_poll if remaining is None else max(0.0, min(self.long_poll, remaining - 1.0))
        return hold * self._jitter.uniform(0.8, 1.0)

    def _check_identity(self, context: grpc.ServicerContext, client_id: str) -> None:
        if self.check_identity:
            certified = tls.peer_common_name(context)
            if certified != client_id:
                raise IdentityMismatchError(f"this client's certificate is for {certified!r}, not {client_id!r}")
        if self.client_tokens is not None:
            owner = tokens.owner_of(tokens.presented(context.invocation_metadata()), self.client_tokens)
            if owner is None:
                raise UnauthenticatedError("no valid client token; start fl-client with --token-file holding the "
                                           "secret the server lists for this client")
            if owner != client_id:
                raise IdentityMismatchError(f"this token belongs to another client than {client_id!r}")

    def _cache_stream(self, snapshot: ModelSnapshot) -> None:
        """Runs under the round state's lock whenever a model version is published."""
        with self._streams_lock:
            # Let the old version's stream go before making the new one (streams sending it hold their
            # own reference), so two never sit in memory side by side.
            self._stream = None
        header = convert.model_header_of(snapshot.round, snapshot.version, snapshot.payload, CHUNK_SIZE)
        stream = convert.model_stream(header, snapshot.payload, CHUNK_SIZE)
        with self._streams_lock:
            self._stream = (snapshot.version, stream)
            self._stream_made.notify_all()

    def _stream_for(self, snapshot: ModelSnapshot, requested: int) -> list[bytes]:
        """The serialized stream of `snapshot`, or of a newer version when the client asked for the
        current one (0) and one was published since. A version being serialized right now is waited for
        (a publish takes milliseconds), not answered as gone."""
        with self._streams_lock:
            self._stream_made.wait_for(lambda: self._stream is not None and self._stream[0] >= snapshot.version,
                                       timeout=STREAM_WAIT)
            cached = self._stream
        if cached is None or (cached[0] != snapshot.version and requested != 0):
            raise errors.StaleRoundError(f"model version {snapshot.version} was replaced while it was asked for; "
                                         "join again")
        return cached[1]

    async def _first_message(self, context: grpc.aio.ServicerContext) -> bytes | None:
        """The stream's first message (None if it ended without one); the call is ended with
        DEADLINE_EXCEEDED if that takes longer than first_message_timeout."""
        self.awaiting_header += 1
        try:
            async with asyncio.timeout(self.first_message_timeout):
                first = await context.read()
        except TimeoutError:
            why = (f"no update header within {self.first_message_timeout:g} s (first_message_timeout); "
                   "fl-client sends it at once")
            self.idle_streams_ended += 1
            log.info("%s: update stream ended: %s", context.peer(), why)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, why)
        finally:
            self.awaiting_header -= 1
        return None if first is grpc.aio.EOF else first

    async def SubmitUpdate(self, request_iterator: object, context: grpc.aio.ServicerContext) -> pb.SubmitReply:
        first = await self._first_message(context)
        try:
            header = convert.update_header_from_raw(first)
            self._check_identity(context, header.client_id)
            reads = ThreadedReads(context, asyncio.get_running_loop())
            chunks = convert.data_chunks(reads, pb.UpdateChunk, "update")
            # The client sends its data only once it has our initial metadata (see fl_client.connection),
            # which goes out when a receive buffer is free: waiting uploads then cost no memory. An upload
            # that then stalls is ended by the receiver's progress deadline, through `interrupt`.
            result = await self.blocking(functools.partial(self.state.submit, header, chunks,
                                                           on_admitted=reads.admit, interrupt=reads.interrupt))
            return convert.submit_result_to_proto(result)
        except _REFUSABLE as e:
            await _abort_async(context, e)

    async def blocking(self, work: Callable[[], T]) -> T:
        """`work()` on a call thread, awaited on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.threads, work)


T = TypeVar("T")


def _handlers(servicer: FederationServicer) -> grpc.GenericRpcHandler:
    # Written out rather than taken from the generated add_FederationServicer_to_server, so that requests
    # arrive as bytes (`convert.raw`) and are parsed inside the handlers: a malformed request then gets
    # INVALID_ARGUMENT rather than gRPC's INTERNAL "Exception deserializing request". The streaming
    # replies are pre-serialized. Method names and message types are the generated ones.
    return grpc.method_handlers_generic_handler(convert.SERVICE, {
        "JoinRound": grpc.unary_unary_rpc_method_handler(
            servicer.JoinRound, request_deserializer=convert.raw,
            response_serializer=pb.JoinReply.SerializeToString),
        "GetGlobalModel": grpc.unary_stream_rpc_method_handler(
            servicer.GetGlobalModel, request_deserializer=convert.raw,
            response_serializer=convert.raw),
        "SubmitUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.SubmitUpdate, request_deserializer=convert.raw,
            response_serializer=pb.SubmitReply.SerializeToString),
        "SecureAggregation": grpc.unary_unary_rpc_method_handler(
            servicer.SecureAggregation, request_deserializer=convert.raw,
            response_serializer=pb.SecAggReply.SerializeToString),
    })


class PortInUseError(OSError):
    pass


# The server's gRPC channel arguments; bench/bare_grpc.py measures plain gRPC with the same ones.
SERVER_OPTIONS = [
    # Chunks are 1 MiB; headers list every tensor's name and shape. 8 MiB leaves room for a
    # large model's header without letting one message balloon.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # A second server on the same port would silently share its traffic: refuse instead.
    ("grpc.so_reuseport", 0),
    # Let clients send a 1 MiB chunk in one HTTP/2 frame rather than 64 of 16 KiB.
    ("grpc.http2.max_frame_size", CHUNK_SIZE),
    # A fixed per-stream receive window of 4 chunks rather than one sized by BDP probing: it keeps
    # an upload streaming while its previous chunk is being checked (with one chunk of window, uploads
    # ran slower in the experiment that chose it: 0.55 of raw TCP), and bounds what a client that
    # ignores upload admission (SubmitUpdate) can make the server buffer. With BDP windows, waiting
    # uploads were read whole into gRPC's memory (2.3 GB for 50 clients of a 45 MB model).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 4 * CHUNK_SIZE),
    # Clients ping every 10 s to notice dead links (fl_client.connection); by default the server
    # would answer such pings on idle connections with GOAWAY "too_many_pings".
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    # The server's own pings: a connection whose peer vanished (no RST: power cut, NAT entry dropped) is
    # closed after keepalive_timeout without an answer, with every call on it, instead of holding their
    # threads until each call's deadline. Pings go out on idle connections too.
    ("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
    ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT * 1000)),
    ("grpc.http2.max_pings_without_data", 0),
    # A ping that comes sooner than min_recv_ping_interval after the last counts a strike, and two strikes
    # (gRPC's default) close the connection with GOAWAY "too_many_pings". A server busy with thousands of
    # connections reads their pings late, in bunches: 10,000 clients pinging every 10 s then had thousands
    # of connections closed, each call on them failing. Strikes are not counted: a ping costs the server a
    # few bytes, answered in gRPC's core.
    ("grpc.http2.max_ping_strikes", 0),
    # Calls that have arrived but that the server's loop has not yet picked up (it takes them one at a
    # time). Past gRPC's default 1,000 such calls, core drops new
    # ones at random (none are kept past 3,000), each dropped call ending in a bare CANCELLED (RST_STREAM):
    # 2,000 idle streams opened at once made honest calls among them fail that way. Sized from max_rpcs
    # instead (never below gRPC's defaults), a burst up to the cap on calls is picked up and served, and
    # calls past the cap get its RESOURCE_EXHAUSTED; the queue stays bounded (core still drops calls past
    # twice the cap), and a pending call holds only its stream's state.
    ("grpc.server.max_pending_requests", MAX_RPCS),
    ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_RPCS),
]


def server_options(keepalive_seconds: float = KEEPALIVE_SECONDS,
                   keepalive_timeout: float = KEEPALIVE_TIMEOUT, max_rpcs: int = MAX_RPCS) -> list[tuple[str, int]]:
    """SERVER_OPTIONS with the keepalive settings and the cap on calls (max_rpcs) given."""
    values = {"grpc.keepalive_time_ms": int(keepalive_seconds * 1000),
              "grpc.keepalive_timeout_ms": int(keepalive_timeout * 1000),
              "grpc.server.max_pending_requests": max(1000, max_rpcs),
              "grpc.server.max_pending_requests_hard_limit": max(3000, 2 * max_rpcs)}
    return [(key, values.get(key, value)) for key, value in SERVER_OPTIONS]


class CallThreads(ThreadPoolExecutor):
    """The calls' thread pool, its threads made with a stack of `stack_kib` KiB (0 = the system's).

    A thread blocked on a socket costs no CPU, but each reserves its stack's address space (8 MiB by
    default, touched only as used). Python sets the size of the threads it creates next, process-wide,
    so it is set around this pool's thread creation only, under a lock."""

    _stack_lock = threading.Lock()

    def __init__(self, max_workers: int, stack_kib: int = THREAD_STACK_KIB):
        super().__init__(max_workers=max_workers, thread_name_prefix="rpc")
        self.stack_kib = stack_kib

    def _adjust_thread_count(self) -> None:
        if not self.stack_kib:
            super()._adjust_thread_count()
            return
        with CallThreads._stack_lock:
            previous = threading.stack_size(self.stack_kib * 1024)
            try:
                super()._adjust_thread_count()
            finally:
                threading.stack_size(previous)


class Server:
    """gRPC's asyncio server, serving on an event loop in a thread of its own ("grpc-loop"), so that the
    rest of fl-server stays plain threads: build it with `create_server`, then `start()` and `stop(grace)`
    as a grpc.Server."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="grpc-loop", daemon=True)
        self._thread.start()
        self._server: grpc.aio.Server | None = None

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def start(self) -> None:
        assert self._server is not None
        self.run(self._server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Refuse new calls, end those in progress after `grace` seconds (at once with None), then end the
        loop. The returned event is set when all is done."""
        done = threading.Event()

        async def stopping() -> None:
            if self._server is not None:
                await self._server.stop(grace)

        def ended(_: object) -> None:
            done.set()
            self._loop.call_soon_threadsafe(self._loop.stop)

        asyncio.run_coroutine_threadsafe(stopping(), self._loop).add_done_callback(ended)
        return done


def create_server(servicer: FederationServicer, host: str, port: int, health: HealthServicer | None = None,
                  credentials: grpc.ServerCredentials | None = None, *,
                  keepalive_seconds: float = KEEPALIVE_SECONDS,
                  keepalive_timeout: float = KEEPALIVE_TIMEOUT) -> tuple[Server, int]:
    """Build (not start) a server; port 0 binds a free port, which is returned. With `health`, the server
    also answers the standard gRPC health checks (grpc.health.v1) that load balancers and orchestrators use.
    A call beyond the servicer's max_rpcs gets RESOURCE_EXHAUSTED at once, rather than a place in a queue
    it may not leave before its deadline."""
    server = Server()
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"

    async def build() -> int:
        # Created on its loop: gRPC's asyncio server belongs to the loop it is made on.
        server._server = aio = grpc.aio.server(
            # The call threads serve the handlers that are not coroutines, and the blocking work of those
            # that are (FederationServicer.blocking).
            migration_thread_pool=servicer.threads,
            options=server_options(keepalive_seconds, keepalive_timeout, servicer.max_rpcs),
            maximum_concurrent_rpcs=servicer.max_rpcs)
        aio.add_generic_rpc_handlers((_handlers(servicer),))
        if health is not None:
            health_pb2_grpc.add_HealthServicer_to_server(health, aio)
        try:
            return aio.add_secure_port(address, credentials) if credentials is not None \
                else aio.add_insecure_port(address)
        except RuntimeError:
            return 0

    bound = server.run(build())
    if bound == 0:
        server.stop(None).wait()
        raise PortInUseError(f"cannot listen on {address}: the port is in use or the address is not this "
                             "machine's; pick another with --port (0 picks a free one) or --host")
    return server, bound
