"""Protobuf <-> dataclasses, in pairs. The only module besides the gRPC layers that imports protobuf.

`from_proto` functions raise `MalformedMessage` for anything a well-behaved peer would never send,
which the servicer turns into INVALID_ARGUMENT.
"""
from __future__ import annotations

from collections.abc import Iterator

from common import messages as m
from common.proto import federation_pb2 as pb
from common.tensors import DTYPES, Payload, TensorSpec

# Hard bounds on what a header may describe; checked before anything is allocated.
MAX_TENSORS = 100_000
MAX_NAME_LENGTH = 1_000
MAX_RANK = 16
MAX_CLIENT_ID_LENGTH = 200


class MalformedMessage(ValueError):
    """A message that no correct peer sends (missing header, unknown dtype, absurd sizes...)."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise MalformedMessage(what)


# --- tensor specs and payload headers --------------------------------------------------------------

def spec_to_proto(spec: TensorSpec) -> pb.TensorSpec:
    return pb.TensorSpec(name=spec.name, dtype=spec.dtype, shape=spec.shape)


def spec_from_proto(msg: pb.TensorSpec) -> TensorSpec:
    _require(0 < len(msg.name) <= MAX_NAME_LENGTH, "tensor name is empty or too long")
    _require(msg.dtype in DTYPES, f"tensor {msg.name!r} has unknown dtype {msg.dtype!r}")
    _require(len(msg.shape) <= MAX_RANK, f"tensor {msg.name!r} has more than {MAX_RANK} dimensions")
    return TensorSpec(msg.name, msg.dtype, tuple(int(d) for d in msg.shape))


_ENCODINGS = {m.Encoding.FULL_WEIGHTS: pb.FULL_WEIGHTS, m.Encoding.DIFF: pb.DIFF}
_ENCODINGS_BACK = {v: k for k, v in _ENCODINGS.items()}


def payload_header_to_proto(header: m.PayloadHeader) -> pb.PayloadHeader:
    return pb.PayloadHeader(tensors=[spec_to_proto(s) for s in header.specs], total_bytes=header.total_bytes,
                            num_chunks=header.num_chunks, crc32=header.crc32,
                            encoding=_ENCODINGS[header.encoding])


def payload_header_from_proto(msg: pb.PayloadHeader) -> m.PayloadHeader:
    _require(len(msg.tensors) <= MAX_TENSORS, f"payload lists more than {MAX_TENSORS} tensors")
    _require(msg.encoding in _ENCODINGS_BACK, f"unknown payload encoding {msg.encoding}")
    specs = [spec_from_proto(t) for t in msg.tensors]
    _require(len({s.name for s in specs}) == len(specs), "payload names a tensor twice")
    return m.PayloadHeader(specs=specs, total_bytes=msg.total_bytes, num_chunks=msg.num_chunks,
                           crc32=msg.crc32, encoding=_ENCODINGS_BACK[msg.encoding])


def payload_header_of(payload: Payload, encoding: m.Encoding, chunk_size: int) -> m.PayloadHeader:
    return m.PayloadHeader(specs=payload.specs, total_bytes=payload.total_bytes,
                           num_chunks=payload.num_chunks(chunk_size), crc32=payload.crc32, encoding=encoding)


def model_header_of(round_: int, version: int, payload: Payload, chunk_size: int) -> m.ModelHeader:
    return m.ModelHeader(round=round_, model_version=version,
                         payload=payload_header_of(payload, m.Encoding.FULL_WEIGHTS, chunk_size))


# --- JoinRound ---------------------------------------------------------------------------------------

def join_request_to_proto(req: m.JoinRequest) -> pb.JoinRequest:
    return pb.JoinRequest(protocol_version=req.protocol_version, client_id=req.client_id,
                          num_samples=req.num_samples, device=req.device, training_round=req.training_round)


def _client_id(value: str) -> str:
    _require(0 < len(value) <= MAX_CLIENT_ID_LENGTH and value.isprintable(),
             f"client_id must be 1 to {MAX_CLIENT_ID_LENGTH} printable characters")
    return value


def join_request_from_proto(msg: pb.JoinRequest) -> m.JoinRequest:
    return m.JoinRequest(client_id=_client_id(msg.client_id), num_samples=msg.num_samples,
                         device=msg.device[:100], training_round=msg.training_round,
                         protocol_version=msg.protocol_version)


def train_config_to_proto(cfg: m.TrainConfig) -> pb.TrainConfig:
    model = pb.ModelSpec(name=cfg.model.name, input_shape=cfg.model.input_shape, num_classes=cfg.model.num_classes)
    return pb.TrainConfig(model=model, dataset=cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed,
                          local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer)


def train_config_from_proto(msg: pb.TrainConfig) -> m.TrainConfig:
    model = m.ModelSpec(name=msg.model.name, input_shape=tuple(msg.model.input_shape),
                        num_classes=msg.model.num_classes)
    return m.TrainConfig(model=model, dataset=msg.dataset, num_clients=msg.num_clients, seed=msg.seed,
                         local_epochs=msg.local_epochs, batch_size=msg.batch_size, lr=msg.lr,
                         momentum=msg.momentum, weight_decay=msg.weight_decay, optimizer=msg.optimizer)


_ACTIONS = {m.Action.TRAIN: pb.TRAIN, m.Action.WAIT: pb.WAIT, m.Action.FINISHED: pb.FINISHED}
_ACTIONS_BACK = {v: k for k, v in _ACTIONS.items()}


def join_decision_to_proto(d: m.JoinDecision) -> pb.JoinReply:
    return pb.JoinReply(action=_ACTIONS[d.action], round=d.round, model_version=d.model_version,
                        config=train_config_to_proto(d.config), retry_after_seconds=d.retry_after,
                        message=d.message, heartbeat_seconds=d.heartbeat_seconds)


def join_decision_from_proto(msg: pb.JoinReply) -> m.JoinDecision:
    _require(msg.action in _ACTIONS_BACK, f"unknown action {msg.action}")
    return m.JoinDecision(action=_ACTIONS_BACK[msg.action], config=train_config_from_proto(msg.config),
                          round=msg.round, model_version=msg.model_version,
                          retry_after=max(0.0, msg.retry_after_seconds), message=msg.message,
                          heartbeat_seconds=max(0.0, msg.heartbeat_seconds))


# --- GetGlobalModel ----------------------------------------------------------------------------------

def model_request_to_proto(req: m.ModelRequest) -> pb.ModelRequest:
    return pb.ModelRequest(protocol_version=req.protocol_version, client_id=req.client_id,
                           model_version=req.model_version)


def model_request_from_proto(msg: pb.ModelRequest) -> m.ModelRequest:
    return m.ModelRequest(client_id=_client_id(msg.client_id), model_version=msg.model_version,
                          protocol_version=msg.protocol_version)


def model_chunks_to_proto(header: m.ModelHeader, payload: Payload, chunk_size: int) -> list[pb.ModelChunk]:
    """Every message of one GetGlobalModel stream, built once and replayed to every client."""
    first = pb.ModelChunk(header=pb.ModelHeader(round=header.round, model_version=header.model_version,
                                                payload=payload_header_to_proto(header.payload)))
    return [first, *(pb.ModelChunk(data=c) for c in payload.chunks(chunk_size))]


def model_header_from_proto(msg: pb.ModelChunk) -> m.ModelHeader:
    _require(msg.WhichOneof("kind") == "header", "the model stream must start with a header")
    h = msg.header
    return m.ModelHeader(round=h.round, model_version=h.model_version,
                         payload=payload_header_from_proto(h.payload))


# --- SubmitUpdate ------------------------------------------------------------------------------------

def update_chunks_to_proto(header: m.UpdateHeader, payload: Payload, chunk_size: int) -> Iterator[pb.UpdateChunk]:
    yield pb.UpdateChunk(header=pb.UpdateHeader(
        protocol_version=header.protocol_version, client_id=header.client_id, round=header.round,
        model_version=header.model_version, num_samples=header.num_samples, metrics=header.metrics,
        payload=payload_header_to_proto(header.payload)))
    for chunk in payload.chunks(chunk_size):
        yield pb.UpdateChunk(data=chunk)


def update_header_from_proto(msg: pb.UpdateChunk) -> m.UpdateHeader:
    _require(msg.WhichOneof("kind") == "header", "the update stream must start with a header")
    h = msg.header
    return m.UpdateHeader(client_id=_client_id(h.client_id), round=h.round, model_version=h.model_version,
                          num_samples=h.num_samples, payload=payload_header_from_proto(h.payload),
                          metrics=dict(list(h.metrics.items())[:50]), protocol_version=h.protocol_version)


def data_chunks(stream: Iterator, what: str) -> Iterator[bytes]:
    """The raw bytes of the chunks after a stream's header; a second header is malformed."""
    for msg in stream:
        _require(msg.WhichOneof("kind") == "data", f"{what} stream carries a second header")
        yield msg.data


def submit_result_to_proto(r: m.SubmitResult) -> pb.SubmitReply:
    return pb.SubmitReply(accepted=r.accepted, duplicate=r.duplicate, message=r.message)


def submit_result_from_proto(msg: pb.SubmitReply) -> m.SubmitResult:
    return m.SubmitResult(accepted=msg.accepted, duplicate=msg.duplicate, message=msg.message)
