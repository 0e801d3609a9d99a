"""Many simulated clients in one process (asyncio + grpc.aio), for the round, memory and scale benchmarks.

Each simulated client speaks the real protocol (JoinRound long-poll, GetGlobalModel, SubmitUpdate,
through the same `common.convert` framing as fl-client) but replaces training by a tiny random change:
one precomputed diff, shared by all clients, so the load generator spends its time on the wire.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
import torch

from common import convert, tensors
from common import messages as m
from common.proto import federation_pb2 as pb
from fl_client.connection import CHANNEL_OPTIONS, retryable


@dataclass
class LoadStats:
    join_latencies: list[float] = field(default_factory=list)  # seconds per JoinRound call (long-polls included)
    train_received: dict[int, list[float]] = field(default_factory=dict)  # round -> time.time() of each TRAIN
    bytes_down: int = 0
    bytes_up: int = 0
    submits: int = 0
    errors: list[str] = field(default_factory=list)


def tiny_change(specs: list[tensors.TensorSpec], seed: int = 0) -> tensors.Payload:
    """A diff of the model's exact shape: zeros but for a few small random values. (Integer tensors travel
    as values, so this would set them to 0: the benchmark's models have none.)"""
    generator = torch.Generator().manual_seed(seed)
    diff = {}
    for spec in specs:
        t = torch.zeros(spec.shape, dtype=tensors.DTYPES[spec.dtype])
        if t.is_floating_point() and t.numel():
            t.view(-1)[:4] = torch.randn(min(4, t.numel()), generator=generator).to(t.dtype) * 1e-3
        diff[spec.name] = t
    return tensors.encode(diff)


class SimulatedClient:
    def __init__(self, client_id: str, address: str, stats: LoadStats, num_samples: int = 100,
                 options: list[tuple[str, int]] = CHANNEL_OPTIONS):
        """`options`: the channel's; fl-client's by default."""
        self.client_id = client_id
        self.stats = stats
        self.num_samples = num_samples
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.join = self.channel.unary_unary(convert.JOIN_ROUND, request_serializer=pb.JoinRequest.SerializeToString,
                                             response_deserializer=pb.JoinReply.FromString)
        self.get_model = self.channel.unary_stream(convert.GET_GLOBAL_MODEL,
                                                   request_serializer=pb.ModelRequest.SerializeToString,
                                                   response_deserializer=convert.raw)
        self.submit = self.channel.stream_unary(convert.SUBMIT_UPDATE, request_serializer=convert.raw,
                                                response_deserializer=pb.SubmitReply.FromString)

    async def run(self, retry: bool = False) -> None:
        """Take part until the server says FINISHED. An error ends the client, or with `retry`, is counted
        and, if fl-client would try again after it (fl_client.connection.retryable), tried again."""
        request = convert.join_request_to_proto(m.JoinRequest(client_id=self.client_id, num_samples=self.num_samples))
        try:
            while True:
                try:
                    start = time.perf_counter()
                    decision = convert.join_decision_from_proto(await self.join(request, timeout=60))
                    self.stats.join_latencies.append(time.perf_counter() - start)
                    if decision.action is m.Action.FINISHED:
                        return
                    if decision.action is m.Action.TRAIN:
                        self.stats.train_received.setdefault(decision.round, []).append(time.time())
                        await self.one_round(decision)
                except grpc.aio.AioRpcError as e:
                    self.stats.errors.append(f"{self.client_id}: {e.code().name} {e.details()}")
                    if not (retry and retryable(e.code(), e.details() or "")):
                        return
                    await asyncio.sleep(0.5)
        finally:
            await self.channel.close()

    async def prepare_update(self, decision: m.JoinDecision, metrics: dict[str, float] | None = None) -> list[bytes]:
        """Fetch the round's model and return an update's messages for it (its header first)."""
        stream = self.get_model(convert.model_request_to_proto(
            m.ModelRequest(client_id=self.client_id, model_version=decision.model_version)), timeout=600)
        header = None
        async for message in stream:
            if header is None:
                header = convert.model_header_from_raw(message)
            self.stats.bytes_down += len(message)
        if header is None:
            raise RuntimeError(f"{self.client_id}: the model stream was empty")
        payload, data_messages = _shared_change(header.payload.specs)
        update = m.UpdateHeader(client_id=self.client_id, round=decision.round,
                                model_version=header.model_version, num_samples=self.num_samples,
                                metrics=metrics or {},
                                payload=convert.payload_header_of(payload, m.Encoding.DIFF, tensors.CHUNK_SIZE))
        # Only the header differs between clients; the data messages are built once and shared.
        return [next(convert.update_stream(update, payload, tensors.CHUNK_SIZE)), *data_messages]

    async def one_round(self, decision: m.JoinDecision) -> None:
        messages = await self.prepare_update(decision)
        self.stats.bytes_up += sum(len(x) for x in messages)
        admitted = asyncio.Event()

        async def upload():  # as fl-client does: the data waits for the server's admission
            yield messages[0]
            await admitted.wait()
            for message in messages[1:]:
                yield message

        call = self.submit(upload(), timeout=600)
        try:
            await call.initial_metadata()
        finally:
            admitted.set()
        reply = await call
        if not reply.accepted:
            self.stats.errors.append(f"{self.client_id}: update refused: {reply.message}")
        self.stats.submits += 1


_SHARED: dict[tuple, tuple[tensors.Payload, list[bytes]]] = {}


def _shared_change(specs: list[tensors.TensorSpec]) -> tuple[tensors.Payload, list[bytes]]:
    key = tuple(specs)
    if key not in _SHARED:
        payload = tiny_change(specs)
        _SHARED[key] = (payload, [convert.encode_data_chunk(p) for p in payload.pieces(tensors.CHUNK_SIZE)])
    return _SHARED[key]


# fl-client's channel options, plus a connection of the channel's own: by default gRPC shares one
# connection among a process's channels to the same address, which no two real clients would.
OWN_CONNECTION = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


async def run_clients(address: str, count: int, prefix: str = "sim", own_connections: bool = False,
                      stats: LoadStats | None = None) -> LoadStats:
    """`stats`: filled as the clients go (so that a caller who cancels this still has them)."""
    stats = stats if stats is not None else LoadStats()
    options = OWN_CONNECTION if own_connections else CHANNEL_OPTIONS
    clients = [SimulatedClient(f"{prefix}{i}", address, stats, options=options) for i in range(count)]
    await asyncio.gather(*(c.run() for c in clients))
    return stats


def run(address: str, count: int, prefix: str = "sim") -> LoadStats:
    return asyncio.run(run_clients(address, count, prefix))
