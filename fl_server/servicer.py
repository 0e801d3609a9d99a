"""The gRPC layer: parse, call one method of `RoundState`, map its exceptions to one status each.

The server is gRPC's asyncio server, on a loop of its own thread (fl_server/transport.py). A JoinRound long-poll and an
update stream waiting for its header hold no thread, only a coroutine: 10,000 clients polling cost 10,000
small objects, not 10,000 threads (each taking the GIL to wake). Work that blocks runs on the call
threads (`transport.CallThreads`): an update's receiving and checking (`state.submit`), model downloads, secure
aggregation's stages and the health checks."""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

import grpc

from common import convert, timeline, tls, tokens
from common.messages import Action, JoinDecision, JoinRequest, SubmitResult, UpdateHeader
from common.proto import federation_pb2 as pb
from common.tensors import CHUNK_SIZE
from fl_server import errors
from fl_server.publication import ModelSnapshot
from fl_server.refusals import RefusalLog
from fl_server.rounds import RoundState
from fl_server.transport import MAX_RPCS, THREAD_STACK_KIB, CallThreads

log = logging.getLogger("fl_server.servicer")

# How long JoinRound holds a call open before answering WAIT (config: long_poll_seconds). Every idle client
# renews its poll this often: with 10,000 clients, 10 s polls were 1,000 calls a second for nothing.
LONG_POLL_SECONDS = 25.0
STREAM_WAIT = 30.0  # seconds a model request waits for its version's stream to be serialized
# A model whose whole GetGlobalModel stream is at most this many bytes rides in the TRAIN answer to
# JoinRound, saving each selected client a call. Small, because every such answer holds its own copies
# of it (protobuf's, then gRPC's), where model streams are bounded by max_downloads.
INLINE_MODEL_BYTES = 64 * 1024
# ...and an update of at most this size may come inside its header: one message instead of three
# (header, data, end) and the admission, which is what a round of a small model costs the server most.
INLINE_UPLOAD_BYTES = 64 * 1024
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds an update stream may take to send its header (config: first_message_timeout)


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
        self._download_slots = asyncio.Semaphore(max_downloads)
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
            return convert.join_decision_to_proto(await self._join(req, context))
        except _REFUSABLE as e:
            await _abort_async(context, e)

    async def _join(self, req: JoinRequest, context: grpc.aio.ServicerContext) -> JoinDecision:
        decision = await self.state.join_async(req, self._long_poll_for(context))
        if decision.action is Action.TRAIN and not req.training_round:  # not to heartbeats
            decision = self._with_small_model(decision)
            timeline.mark("train", decision.round, req.client_id)
        return decision

    async def _join_after(self, header: UpdateHeader, result: SubmitResult,
                          context: grpc.aio.ServicerContext) -> SubmitResult:
        """`result` of a taken update with the answer to its client's next join (UpdateHeader.join_after),
        held as a JoinRound poll is. A join refused (the registry full, say) leaves `next` out: the update is
        taken whatever happens, and the client's own join then meets the refusal."""
        try:
            decision = await self._join(JoinRequest(client_id=header.client_id, num_samples=header.num_samples),
                                        context)
        except _REFUSABLE:
            return result
        return dataclasses.replace(result, next=decision)

    async def GetGlobalModel(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            req = convert.model_request_from_raw(request)
            self._check_identity(context, req.client_id)
            snapshot = self.state.model(req)
            # A version being serialized is waited for on a call thread, not on the loop.
            stream = await self.blocking(functools.partial(self._stream_for, snapshot, req.model_version))
        except _REFUSABLE as e:
            await _abort_async(context, e)
        with self.state.downloading(req.client_id):
            try:
                async with asyncio.timeout(context.time_remaining()):
                    await self._download_slots.acquire()
            except TimeoutError:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is busy sending the model to other "
                                                                 "clients until this call's deadline; try again")
            try:
                # Written from the loop: a handler that yields from a thread pays a thread hop per chunk
                # (1.11 GB/s for a 44.7 MB model, against 1.37 GB/s this way).
                for message in stream:
                    await context.write(message)
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
        return dataclasses.replace(decision, model_stream=tuple(cached[1]),
                                   inline_upload_bytes=INLINE_UPLOAD_BYTES if decision.upload_admitted else 0)

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
            header, inline = convert.update_opening_from_raw(first)
            self._check_identity(context, header.client_id)
            timeline.mark("update", header.round, header.client_id)
            if inline:
                # A small update inside its header (JoinReply.inline_upload_bytes): all of it is here, so
                # there is nothing to admit or read ahead, and no stream to watch for stalls.
                if len(inline) > INLINE_UPLOAD_BYTES:
                    raise errors.InvalidUpdateError(
                        f"an update of {len(inline)} bytes may not travel inside its header (at most "
                        f"{INLINE_UPLOAD_BYTES}); send it as data chunks after the header")
                await self._end_of_stream(context)
                result = await self.blocking(functools.partial(self.state.submit, header, (inline,)))
            else:
                reads = ThreadedReads(context, asyncio.get_running_loop())
                chunks = convert.data_chunks(reads, pb.UpdateChunk, "update")
                # The client sends its data only once it has our initial metadata (see fl_client.connection),
                # which goes out when a receive buffer is free: waiting uploads then cost no memory. An upload
                # that then stalls is ended by the receiver's progress deadline, through `interrupt`.
                result = await self.blocking(functools.partial(self.state.submit, header, chunks,
                                                               on_admitted=reads.admit, interrupt=reads.interrupt))
            # Not in a secure round: its clients unmask after their update is taken, which this wait would block.
            if header.join_after and result.accepted and self.state.secure is None:
                del first, inline  # not held through the wait
                result = await self._join_after(header, result, context)
            return convert.submit_result_to_proto(result)
        except _REFUSABLE as e:
            await _abort_async(context, e)

    async def _end_of_stream(self, context: grpc.aio.ServicerContext) -> None:
        """The stream ends after an update whose data is inside its header; InvalidUpdateError if more
        follows, or if it is held open for first_message_timeout."""
        try:
            async with asyncio.timeout(self.first_message_timeout):
                more = await context.read()
        except TimeoutError:
            raise errors.InvalidUpdateError(
                f"an update whose data is inside its header ends there, but the stream stayed open for "
                f"{self.first_message_timeout:g} s; close it after the header") from None
        if more is not grpc.aio.EOF:
            raise errors.InvalidUpdateError("an update whose data is inside its header is one message, but more "
                                            "followed; send the data either inside or after the header")

    async def blocking(self, work: Callable[[], T]) -> T:
        """`work()` on a call thread, awaited on the loop."""
        return await asyncio.get_running_loop().run_in_executor(self.threads, work)


T = TypeVar("T")
