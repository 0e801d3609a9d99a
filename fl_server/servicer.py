"""The gRPC layer: parse, call one method of `RoundState`, map its exceptions to one status each."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_health.v1.health import HealthServicer

from common import convert, tls, tokens
from common.proto import federation_pb2 as pb
from common.tensors import CHUNK_SIZE
from fl_server import errors
from fl_server.publication import ModelSnapshot
from fl_server.rounds import RoundState

log = logging.getLogger("fl_server.servicer")

LONG_POLL_SECONDS = 10.0  # how long JoinRound holds a call open before answering WAIT

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
}


def _abort(context: grpc.ServicerContext, error: Exception) -> NoReturn:
    code = next(code for kind, code in STATUS_FOR.items() if isinstance(error, kind))
    log.warning("%s refused (%s): %s", context.peer(), code.name, error)
    context.abort(code, str(error))
    raise AssertionError("unreachable: context.abort raises")


_REFUSABLE = tuple(STATUS_FOR)


class FederationServicer:
    """The three RPCs. The streaming ones take and give serialized messages (see common.convert)."""

    def __init__(self, state: RoundState, long_poll: float = LONG_POLL_SECONDS, check_identity: bool = False,
                 client_tokens: dict[str, str] | None = None, max_downloads: int = 8):
        self.state = state
        # Each stream being served holds about one chunk in gRPC's send path; bounding how many are
        # served at once bounds that memory whatever the number of clients (measured: 50 concurrent
        # streams held 1.4 models of memory, 10 held 0.27). The others wait their turn, which costs no
        # throughput when the server's link or CPU is what limits the transfers.
        self._download_slots = threading.Semaphore(max_downloads)
        self.long_poll = long_poll
        # With mutual TLS, a client may only act as the id in its certificate; with tokens, as the id
        # whose secret it presents.
        self.check_identity = check_identity
        self.client_tokens = client_tokens
        # Each model version's stream, serialized once when the version is published and replayed to
        # every client that asks for it: (version, messages).
        self._streams_lock = threading.Lock()
        self._stream: tuple[int, list[bytes]] | None = None
        state.subscribe(self._cache_stream)

    def JoinRound(self, request: bytes, context: grpc.ServicerContext) -> pb.JoinReply:
        try:
            req = convert.join_request_from_raw(request)
            self._check_identity(context, req.client_id)
            # Answer before the client's own deadline runs out, or it would see DEADLINE_EXCEEDED.
            remaining = context.time_remaining()
            timeout = self.long_poll if remaining is None else max(0.0, min(self.long_poll, remaining - 1.0))
            return convert.join_decision_to_proto(self.state.join(req, timeout))
        except _REFUSABLE as e:
            _abort(context, e)

    def GetGlobalModel(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            req = convert.model_request_from_raw(request)
            self._check_identity(context, req.client_id)
            snapshot = self.state.model(req)
            stream = self._stream_for(snapshot, req.model_version)
        except _REFUSABLE as e:
            _abort(context, e)
        if not self._download_slots.acquire(timeout=context.time_remaining()):
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is busy sending the model to other clients "
                                                       "until this call's deadline; try again")
        try:
            yield from stream
        finally:
            self._download_slots.release()
        self.state.count_sent(sum(map(len, stream)))  # reached only when the whole stream went out

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

    def _stream_for(self, snapshot: ModelSnapshot, requested: int) -> list[bytes]:
        """The serialized stream of `snapshot`, or of a newer version when the client asked for the
        current one (0) and one was published since."""
        with self._streams_lock:
            cached = self._stream
        if cached is None or (cached[0] != snapshot.version and requested != 0):
            raise errors.StaleRoundError(f"model version {snapshot.version} was replaced while it was asked for; "
                                         "join again")
        return cached[1]

    def SubmitUpdate(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> pb.SubmitReply:
        try:
            header = convert.update_header_from_raw(next(request_iterator, None))
            self._check_identity(context, header.client_id)
            chunks = convert.data_chunks(request_iterator, pb.UpdateChunk, "update")
            # The client sends its data only once it has our initial metadata (see fl_client.connection),
            # which goes out when a receive buffer is free: waiting uploads then cost no memory.
            return convert.submit_result_to_proto(self.state.submit(
                header, chunks, on_admitted=lambda: context.send_initial_metadata(convert.UPLOAD_ADMITTED)))
        except _REFUSABLE as e:
            _abort(context, e)


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
]


def create_server(servicer: FederationServicer, host: str, port: int, max_workers: int = 1024,
                  health: HealthServicer | None = None,
                  credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, int]:
    """Build (not start) a server; port 0 binds a free port, which is returned. With `health`, the server
    also answers the standard gRPC health checks (grpc.health.v1) that load balancers and orchestrators use."""
    server = grpc.server(
        # Each long-polling JoinRound holds a worker thread until a round needs its client, so the
        # pool must exceed the number of clients, or unselected pollers would starve selected ones.
        # Threads are created only as needed.
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
        options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(servicer),))
    if health is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials is not None
                 else server.add_insecure_port(address))
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortInUseError(f"cannot listen on {address}: the port is in use or the address is not this "
                             "machine's; pick another with --port (0 picks a free one) or --host")
    return server, bound
