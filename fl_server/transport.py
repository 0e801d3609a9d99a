"""The gRPC server around FederationServicer: gRPC's asyncio server on a loop of its own thread
(`Server`), its channel options, and the call threads for the handlers' blocking work."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from common import convert
from common.proto import federation_pb2 as pb
from common.tensors import CHUNK_SIZE

if TYPE_CHECKING:
    from fl_server.servicer import FederationServicer

T = TypeVar("T")

MAX_RPCS = 8192  # calls served at once (config: max_rpcs); also the most call threads there may be
THREAD_STACK_KIB = 512  # each call thread's stack (config: rpc_thread_stack_kib)
KEEPALIVE_SECONDS, KEEPALIVE_TIMEOUT = 30.0, 10.0  # server pings (config: keepalive_seconds, keepalive_timeout)


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
