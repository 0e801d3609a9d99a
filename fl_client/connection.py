"""The client's side of the wire: the three RPCs as plain method calls, with retries where they help."""
from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc
import torch

from common import convert, tensors, tokens
from common import messages as m
from common.proto import federation_pb2 as pb
from common.tensors import CHUNK_SIZE

log = logging.getLogger("fl_client.connection")

T = TypeVar("T")

# Only these can get better by trying again: the server is down or restarting, or the network is slow,
# or the server ended the call with no answer (CANCELLED: a server stopping cancels the calls still in
# progress after its grace period; no refusal of ours is CANCELLED).
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# ...and the server's cap on calls served at once (its max_rpcs), which gRPC reports with this text, and
# its client registry being full (open mode; places free up as clients leave). Other RESOURCE_EXHAUSTED
# refusals (a message over the size limit) would fail again the same way.
BUSY = "concurrent rpc limit"


def retryable(code: grpc.StatusCode, details: str) -> bool:
    return code in RETRYABLE or (code is grpc.StatusCode.RESOURCE_EXHAUSTED and (
        BUSY in details.lower() or details.startswith(m.REGISTRY_FULL)))
JOIN_DEADLINE = 30.0  # above the server's long-poll (25 s), which answers 1 s before a client's deadline at the latest
TRANSFER_DEADLINE = 600.0  # a whole model up or down; generous for slow links


class ServerUnreachableError(ConnectionError):
    pass


class RequestRefusedError(Exception):
    """The server refused a request with a status that retrying will not change."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{details} ({code.name})")
        self.code = code
        self.details = details


class Backoff:
    """Capped exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
    Jitter", 2015): spreads out many clients reconnecting to a restarted server at once."""

    def __init__(self, base: float = 0.5, cap: float = 10.0, rng: random.Random | None = None):
        self.base, self.cap = base, cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * 2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


# The client's gRPC channel arguments; bench/bare_grpc.py measures plain gRPC with the same ones.
CHANNEL_OPTIONS = [
    # Models arrive in 1 MiB chunks, but a large model's header (every tensor's name and shape)
    # can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    # Reconnect promptly after a server restart rather than after gRPC's default 20 s+ backoff;
    # our own retry loop adds the jitter.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5000),
    # A link that dies silently (cable pulled, NAT entry dropped) sends no RST; without pings a
    # call on it would hang until its deadline. Ping every 10 s, give up after 5 s of silence.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


class ServerConnection:
    def __init__(self, address: str, give_up_after: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, credentials: grpc.ChannelCredentials | None = None,
                 token: str | None = None, client_certificate: bool = False):
        """`credentials`: TLS (see common.tls); None is plaintext. `token`: this client's secret
        (common.tokens), sent with every call."""
        self._metadata = tokens.metadata(token) if token else None
        self.address = address
        self.client_certificate = client_certificate  # mutual TLS: named in the unreachable message
        self.give_up_after = give_up_after  # seconds of failing in a row; None = keep trying forever
        self.sleep = sleep
        self.channel = (grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS) if credentials is not None
                        else grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        # The streaming calls take and give serialized messages (see common.convert).
        self._join_round = self.channel.unary_unary(
            convert.JOIN_ROUND, request_serializer=pb.JoinRequest.SerializeToString,
            response_deserializer=pb.JoinReply.FromString)
        self._get_global_model = self.channel.unary_stream(
            convert.GET_GLOBAL_MODEL, request_serializer=pb.ModelRequest.SerializeToString,
            response_deserializer=convert.raw)
        self._submit_update = self.channel.stream_unary(
            convert.SUBMIT_UPDATE, request_serializer=convert.raw, response_deserializer=pb.SubmitReply.FromString)
        # An update that is one message (its data inside the header) goes as a unary call on the same
        # method: on the wire that is a stream of one message, and gRPC's client then needs no thread to
        # feed the stream.
        self._submit_one_message = self.channel.unary_unary(
            convert.SUBMIT_UPDATE, request_serializer=convert.raw, response_deserializer=pb.SubmitReply.FromString)
        self._secure_aggregation = self.channel.unary_unary(
            convert.SECURE_AGGREGATION, request_serializer=pb.SecAggRequest.SerializeToString,
            response_deserializer=pb.SecAggReply.FromString)
        # The global model is received into the same buffer every round (fresh memory costs page faults);
        # the tensors fetch_model returns share it and are valid until the next fetch.
        self._model_buffer: bytearray | None = None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ServerConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        backoff = Backoff()
        first_failure: float | None = None
        while True:
            try:
                return fn()
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
                if not retryable(code, details):
                    raise RequestRefusedError(code, details) from None
                if "handshake failed" in details.lower():  # the server's certificate: no retry will change it
                    raise ServerUnreachableError(
                        f"the TLS handshake with {self.address} failed: its certificate is not one the CA in "
                        "--tls-ca signed, or is for another host name; check --tls-ca and --server") from None
                now = time.monotonic()
                first_failure = first_failure or now
                if self.give_up_after is not None and now - first_failure > self.give_up_after:
                    raise ServerUnreachableError(
                        f"server {self.address} unreachable for {self.give_up_after:.0f} s ({code.name}); check "
                        "that fl-server runs there and the address is right" + (
                            ", and that the CA the server trusts (its --tls-client-ca) signed this client's "
                            "--tls-cert: a server refusing a client certificate just closes the connection"
                            if self.client_certificate else "")) from None
                delay = backoff.next_delay()
                log.warning("%s: server %s unavailable (%s); retrying in %.1f s", what, self.address,
                            code.name, delay)
                self.sleep(delay)

    def join(self, req: m.JoinRequest) -> m.JoinDecision:
        reply = self._call("JoinRound", lambda: self._join_round(
            convert.join_request_to_proto(req), timeout=JOIN_DEADLINE, metadata=self._metadata))
        return convert.join_decision_from_proto(reply)

    def heartbeat(self, req: m.JoinRequest, timeout: float) -> m.JoinDecision | None:
        """One attempt, no retries: a missed heartbeat costs nothing, and the main loop handles outages."""
        try:
            return convert.join_decision_from_proto(
                self._join_round(convert.join_request_to_proto(req), timeout=timeout, metadata=self._metadata))
        except (grpc.RpcError, convert.MalformedMessage, ValueError):  # ValueError: the channel is closed already
            return None

    def fetch_model(self, req: m.ModelRequest) -> tuple[m.ModelHeader, dict[str, torch.Tensor]]:
        def fetch() -> tuple[m.ModelHeader, dict[str, torch.Tensor]]:
            return self.model_of(self._get_global_model(convert.model_request_to_proto(req),
                                                        timeout=TRANSFER_DEADLINE, metadata=self._metadata))

        return self._call("GetGlobalModel", fetch)

    def model_of(self, stream: Iterator[bytes]) -> tuple[m.ModelHeader, dict[str, torch.Tensor]]:
        """The model a GetGlobalModel stream's messages carry (fetched, or in a TRAIN answer)."""
        # An empty stream (None) is refused as malformed there.
        header = convert.model_header_from_raw(next(stream, None))
        size = sum(s.nbytes for s in header.payload.specs)
        if self._model_buffer is None or len(self._model_buffer) != size:
            self._model_buffer = bytearray(size)
        state = tensors.assemble(header.payload.specs, convert.data_chunks(stream, pb.ModelChunk, "model"),
                                 header.payload.checksum, self._model_buffer)
        return header, state

    def submit(self, header: m.UpdateHeader, payload: tensors.Payload, admitted: bool = False,
               inline_limit: int = 0) -> m.SubmitResult:
        """`admitted`: the server said that this round's uploads need no admission (JoinDecision's
        upload_admitted), so the data follows the header at once; `inline_limit` (its inline_upload_bytes):
        a payload up to that size goes inside the header, the whole update one message."""
        inline = 0 < payload.total_bytes <= inline_limit and header.payload.num_chunks == 1

        def eager() -> pb.SubmitReply:
            messages = convert.update_stream(header, payload, CHUNK_SIZE, inline=inline)
            if inline:
                return self._submit_one_message(next(messages), timeout=TRANSFER_DEADLINE, metadata=self._metadata)
            return self._submit_update(messages, timeout=TRANSFER_DEADLINE, metadata=self._metadata)

        def attempt() -> pb.SubmitReply:  # a stream is single-use, so each retry builds a fresh one
            admitted = threading.Event()

            def stream() -> Iterator[bytes]:
                messages = convert.update_stream(header, payload, CHUNK_SIZE)
                yield next(messages)  # the header: the server checks it, then admits the data (convert.UPLOAD_ADMITTED)
                admitted.wait()
                yield from messages

            call = self._submit_update.future(stream(), timeout=TRANSFER_DEADLINE, metadata=self._metadata)
            try:
                call.initial_metadata()  # returns when the server admits the upload, or the call ends
            finally:
                admitted.set()
            return call.result()

        return convert.submit_result_from_proto(self._call("SubmitUpdate", eager if admitted or inline else attempt))

    def secure_step(self, req: m.SecAggRequest) -> m.SecAggReply:
        """One stage of a secure round: the server's answer once the stage is complete (it holds each
        call up to its long-poll, and is asked again until then)."""
        while True:
            reply = convert.secagg_reply_from_proto(self._call("SecureAggregation", lambda: self._secure_aggregation(
                convert.secagg_request_to_proto(req), timeout=JOIN_DEADLINE, metadata=self._metadata)))
            if reply.ready:
                return reply
