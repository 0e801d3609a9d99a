"""Protobuf <-> dataclasses, in pairs. The only module besides the gRPC layers that imports protobuf.

`from_proto` functions raise `MalformedMessage` for anything a well-behaved peer would never send,
which the servicer turns into INVALID_ARGUMENT.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any

from google.protobuf.message import DecodeError

from common import messages as m
from common import settings
from common.proto import federation_pb2 as pb
from common.tensors import DTYPES, Payload, TensorSpec

# Hard bounds on what a header may describe; checked before anything is allocated.
MAX_TENSORS = 100_000
MAX_NAME_LENGTH = 1_000
MAX_RANK = 16
MAX_CLIENT_ID_LENGTH = 200
MAX_FAILURE_LENGTH = 500  # characters of a client's failure report kept (it goes into the log and the round's record)
MAX_METRICS = 1_000  # an update's metrics; the server's own limits (max_metrics...) are tighter


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
                            num_chunks=header.num_chunks, checksum=header.checksum,
                            encoding=_ENCODINGS[header.encoding], codec=header.codec)


def payload_header_from_proto(msg: pb.PayloadHeader) -> m.PayloadHeader:
    _require(len(msg.tensors) <= MAX_TENSORS, f"payload lists more than {MAX_TENSORS} tensors")
    _require(msg.encoding in _ENCODINGS_BACK, f"unknown payload encoding {msg.encoding}")
    specs = [spec_from_proto(t) for t in msg.tensors]
    _require(len({s.name for s in specs}) == len(specs), "payload names a tensor twice")
    return m.PayloadHeader(specs=specs, total_bytes=msg.total_bytes, num_chunks=msg.num_chunks,
                           checksum=msg.checksum, encoding=_ENCODINGS_BACK[msg.encoding],
                           codec=msg.codec[:50] or "none")


def payload_header_of(payload: Payload, encoding: m.Encoding, chunk_size: int, codec: str = "none") -> m.PayloadHeader:
    return m.PayloadHeader(specs=payload.specs, total_bytes=payload.total_bytes,
                           num_chunks=payload.num_chunks(chunk_size), checksum=payload.checksum, encoding=encoding,
                           codec=codec)


def model_header_of(round_: int, version: int, payload: Payload, chunk_size: int) -> m.ModelHeader:
    return m.ModelHeader(round=round_, model_version=version,
                         payload=payload_header_of(payload, m.Encoding.FULL_WEIGHTS, chunk_size))


# --- JoinRound ---------------------------------------------------------------------------------------

def join_request_to_proto(req: m.JoinRequest) -> pb.JoinRequest:
    return pb.JoinRequest(protocol_version=req.protocol_version, client_id=req.client_id,
                          num_samples=req.num_samples, device=req.device, training_round=req.training_round,
                          failure=req.failure)


def _client_id(value: str) -> str:
    _require(0 < len(value) <= MAX_CLIENT_ID_LENGTH and value.isprintable(),
             f"client_id must be 1 to {MAX_CLIENT_ID_LENGTH} printable characters")
    return value


def join_request_from_raw(message: bytes) -> m.JoinRequest:
    return join_request_from_proto(_parse(message, pb.JoinRequest, "JoinRound request"))


def join_request_from_proto(msg: pb.JoinRequest) -> m.JoinRequest:
    return m.JoinRequest(client_id=_client_id(msg.client_id), num_samples=msg.num_samples,
                         device=msg.device[:100], training_round=msg.training_round,
                         failure=msg.failure[:MAX_FAILURE_LENGTH], protocol_version=msg.protocol_version)


def train_config_to_proto(cfg: m.TrainConfig) -> pb.TrainConfig:
    model = pb.ModelSpec(name=cfg.model.name, input_shape=cfg.model.input_shape, num_classes=cfg.model.num_classes)
    return pb.TrainConfig(model=model, hyperparameters=_hyperparameters_json(cfg))


@functools.lru_cache(maxsize=4)
def _hyperparameters_json(cfg: m.TrainConfig) -> str:
    # Once per config, not once per JoinRound reply: a server sends the same one for its whole run.
    return json.dumps(settings.values_of(cfg, m.ClientHyperparameters), allow_nan=False)


def train_config_from_proto(msg: pb.TrainConfig) -> m.TrainConfig:
    return _train_config(msg.model.name, tuple(msg.model.input_shape), msg.model.num_classes, msg.hyperparameters)


@functools.lru_cache(maxsize=4)
def _train_config(name: str, input_shape: tuple[int, ...], num_classes: int, hyperparameters: str) -> m.TrainConfig:
    # Once per config, not once per JoinRound reply: a client receives the same one all run long, and
    # checking its JSON took a fifth of a millisecond of each round (a TrainConfig is frozen: shared safely).
    model = m.ModelSpec(name=name, input_shape=input_shape, num_classes=num_classes)
    return m.TrainConfig(model=model, **_hyperparameters(hyperparameters))


def _hyperparameters(text: str) -> dict[str, Any]:
    _require(text != "", "the training config carries no hyperparameters")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays, which nothing sends
        raise MalformedMessage("the training config's hyperparameters are not valid JSON") from None
    _require(isinstance(raw, dict), "the training config's hyperparameters are not a JSON object")
    try:
        values = settings.typed_values(m.ClientHyperparameters, raw)
    except settings.SettingError as e:
        raise MalformedMessage(f"the server's training config is wrong: {e}") from None
    return values


_ACTIONS = {m.Action.TRAIN: pb.TRAIN, m.Action.WAIT: pb.WAIT, m.Action.FINISHED: pb.FINISHED}
_ACTIONS_BACK = {v: k for k, v in _ACTIONS.items()}


def join_decision_to_proto(d: m.JoinDecision) -> pb.JoinReply:
    return pb.JoinReply(action=_ACTIONS[d.action], round=d.round, model_version=d.model_version,
                        config=train_config_to_proto(d.config), retry_after_seconds=d.retry_after,
                        message=d.message, heartbeat_seconds=d.heartbeat_seconds, upload_admitted=d.upload_admitted,
                        model_stream=d.model_stream, inline_upload_bytes=d.inline_upload_bytes)


def join_decision_from_proto(msg: pb.JoinReply) -> m.JoinDecision:
    _require(msg.action in _ACTIONS_BACK, f"unknown action {msg.action}")
    return m.JoinDecision(action=_ACTIONS_BACK[msg.action], config=train_config_from_proto(msg.config),
                          round=msg.round, model_version=msg.model_version,
                          retry_after=max(0.0, msg.retry_after_seconds), message=msg.message,
                          heartbeat_seconds=max(0.0, msg.heartbeat_seconds), upload_admitted=msg.upload_admitted,
                          model_stream=tuple(msg.model_stream), inline_upload_bytes=msg.inline_upload_bytes)


# --- GetGlobalModel ----------------------------------------------------------------------------------

def model_request_to_proto(req: m.ModelRequest) -> pb.ModelRequest:
    return pb.ModelRequest(protocol_version=req.protocol_version, client_id=req.client_id,
                           model_version=req.model_version)


def model_request_from_raw(message: bytes) -> m.ModelRequest:
    return model_request_from_proto(_parse(message, pb.ModelRequest, "GetGlobalModel request"))


def model_request_from_proto(msg: pb.ModelRequest) -> m.ModelRequest:
    return m.ModelRequest(client_id=_client_id(msg.client_id), model_version=msg.model_version,
                          protocol_version=msg.protocol_version)


def model_stream(header: m.ModelHeader, payload: Payload, chunk_size: int) -> list[bytes]:
    """Every message of one GetGlobalModel stream, serialized; built once per model version and
    replayed to every client."""
    first = pb.ModelChunk(header=pb.ModelHeader(round=header.round, model_version=header.model_version,
                                                payload=payload_header_to_proto(header.payload)))
    return [first.SerializeToString(), *(encode_data_chunk(p) for p in payload.pieces(chunk_size))]


def model_header_from_raw(raw: bytes | None) -> m.ModelHeader:
    h = _header_of(raw, pb.ModelChunk, "model").header
    return m.ModelHeader(round=h.round, model_version=h.model_version,
                         payload=payload_header_from_proto(h.payload))


# --- SubmitUpdate ------------------------------------------------------------------------------------

def update_stream(header: m.UpdateHeader, payload: Payload, chunk_size: int, inline: bool = False) -> Iterator[bytes]:
    """The SubmitUpdate stream: the header, then the data chunks; with `inline`, one message, the header
    carrying all the data (UpdateHeader.data; the header should announce one chunk)."""
    data = payload.data if inline else b""
    yield pb.UpdateChunk(header=pb.UpdateHeader(
        protocol_version=header.protocol_version, client_id=header.client_id, round=header.round,
        model_version=header.model_version, num_samples=header.num_samples, metrics=header.metrics,
        payload=payload_header_to_proto(header.payload), data=data, join_after=header.join_after)).SerializeToString()
    if not inline:
        for pieces in payload.pieces(chunk_size):
            yield encode_data_chunk(pieces)


def _metrics(metrics: Any) -> dict[str, float]:
    """All of them or none: an update with too many metrics, or absurdly long names, is refused rather
    than cut (what is kept would depend on the map's order on the wire)."""
    _require(len(metrics) <= MAX_METRICS, f"an update may carry at most {MAX_METRICS} metrics, got {len(metrics)}")
    _require(all(0 < len(name) <= MAX_NAME_LENGTH for name in metrics),
             f"metric names must be 1 to {MAX_NAME_LENGTH} characters")
    return dict(metrics)


def update_opening_from_raw(raw: bytes | None) -> tuple[m.UpdateHeader, bytes]:
    """A SubmitUpdate stream's first message: its header, and the data it carries inline (b"": none)."""
    h = _header_of(raw, pb.UpdateChunk, "update").header
    return (m.UpdateHeader(client_id=_client_id(h.client_id), round=h.round, model_version=h.model_version,
                           num_samples=h.num_samples, payload=payload_header_from_proto(h.payload),
                           metrics=_metrics(h.metrics), protocol_version=h.protocol_version,
                           join_after=h.join_after), h.data)


# --- stream framing ----------------------------------------------------------------------------------
# The streaming RPCs move their messages as bytes that gRPC neither serializes nor parses (`raw` is
# their serializer and deserializer). A data chunk's payload is then a view into the received message,
# without the two copies protobuf's parse and attribute access would make; and the model's messages
# are serialized once per version rather than once per client.

SERVICE = pb.DESCRIPTOR.services_by_name["Federation"].full_name
JOIN_ROUND = f"/{SERVICE}/JoinRound"
GET_GLOBAL_MODEL = f"/{SERVICE}/GetGlobalModel"
SUBMIT_UPDATE = f"/{SERVICE}/SubmitUpdate"
SECURE_AGGREGATION = f"/{SERVICE}/SecureAggregation"
# SubmitUpdate's admission: the server sends its initial metadata once it has a receive buffer for the
# update, and the client holds its data chunks back until then, so that uploads waiting their turn sit
# in neither side's gRPC buffers. (Initial metadata is the one thing a server can send mid-way through a
# client-streaming call.) A client that does not wait is still served, only less thriftily.
UPLOAD_ADMITTED = (("fl-upload", "admitted"),)

# `data` is field 2, length-delimited (wire type 2), in both ModelChunk and UpdateChunk.
_DATA_TAG = (2 << 3) | 2
assert pb.ModelChunk.DESCRIPTOR.fields_by_name["data"].number == 2
assert pb.UpdateChunk.DESCRIPTOR.fields_by_name["data"].number == 2


def raw(message: bytes) -> bytes:
    """Identity (de)serializer for the streaming RPCs."""
    return message


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def encode_data_chunk(pieces: bytes | memoryview | list[memoryview]) -> bytes:
    """Exactly `ModelChunk(data=b"".join(pieces)).SerializeToString()` (and UpdateChunk's), made in
    one copy straight from the tensors' memory."""
    if not isinstance(pieces, list):
        pieces = [pieces]
    return b"".join((bytes((_DATA_TAG,)), _varint(sum(len(p) for p in pieces)), *pieces))


def _data_view(message: bytes) -> memoryview | None:
    """The payload of a serialized data chunk as a view into it, or None if it is not one."""
    if not message or message[0] != _DATA_TAG:
        return None
    length, shift, pos = 0, 0, 1
    while pos < len(message) and pos <= 10:
        byte = message[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return memoryview(message)[pos:] if pos + length == len(message) else None
        shift += 7
    return None


def _parse(message: bytes, message_type: type, what: str) -> Any:
    try:
        return message_type.FromString(message)
    except DecodeError:
        raise MalformedMessage(f"a message of the {what} is not valid protobuf") from None


def _header_of(message: bytes | None, message_type: type, what: str) -> Any:
    _require(message is not None, f"the {what} stream is empty")
    msg = _parse(message, message_type, f"{what} stream")
    _require(msg.WhichOneof("kind") == "header", f"the {what} stream must start with a header")
    return msg


def data_chunks(stream: Iterator[bytes], message_type: type, what: str) -> Iterator[memoryview | bytes]:
    """The payload bytes of the messages after a stream's header; a second header is malformed."""
    for message in stream:
        view = _data_view(message)
        if view is None:  # not in the canonical form we write; let protobuf decide what it is
            msg = _parse(message, message_type, f"{what} stream")
            _require(msg.WhichOneof("kind") == "data", f"the {what} stream carries a second header")
            view = memoryview(msg.data)
        yield view


def submit_result_to_proto(r: m.SubmitResult) -> pb.SubmitReply:
    return pb.SubmitReply(accepted=r.accepted, duplicate=r.duplicate, message=r.message,
                          next=join_decision_to_proto(r.next) if r.next is not None else None)


def submit_result_from_proto(msg: pb.SubmitReply) -> m.SubmitResult:
    return m.SubmitResult(accepted=msg.accepted, duplicate=msg.duplicate, message=msg.message,
                          next=join_decision_from_proto(msg.next) if msg.HasField("next") else None)


# --- SecureAggregation -------------------------------------------------------------------------------

MAX_SECAGG_ENTRIES = 100_000  # a roster of every client of a round, at most
MAX_SECAGG_ENTRY_BYTES = 4_096  # a client's keys, or its encrypted shares for one neighbour


def secagg_request_to_proto(req: m.SecAggRequest) -> pb.SecAggRequest:
    return pb.SecAggRequest(protocol_version=req.protocol_version, client_id=req.client_id, round=req.round,
                            stage=req.stage.value, entries=req.entries)


def secagg_request_from_raw(message: bytes) -> m.SecAggRequest:
    msg = _parse(message, pb.SecAggRequest, "SecureAggregation request")
    _require(msg.stage in {s.value for s in m.SecAggStage}, f"unknown secure-aggregation stage {msg.stage}")
    return m.SecAggRequest(client_id=_client_id(msg.client_id), round=msg.round, stage=m.SecAggStage(msg.stage),
                           entries=_entries(msg.entries), protocol_version=msg.protocol_version)


def secagg_reply_to_proto(r: m.SecAggReply) -> pb.SecAggReply:
    return pb.SecAggReply(ready=r.ready, entries=r.entries, survivors=r.survivors, dropped=r.dropped,
                          message=r.message)


def secagg_reply_from_proto(msg: pb.SecAggReply) -> m.SecAggReply:
    return m.SecAggReply(ready=msg.ready, entries=_entries(msg.entries), survivors=tuple(msg.survivors),
                         dropped=tuple(msg.dropped), message=msg.message)


def _entries(entries: Any) -> dict[str, bytes]:
    _require(len(entries) <= MAX_SECAGG_ENTRIES, f"more than {MAX_SECAGG_ENTRIES} secure-aggregation entries")
    out = {}
    for key, value in entries.items():
        _require(0 < len(key) <= MAX_CLIENT_ID_LENGTH and len(value) <= MAX_SECAGG_ENTRY_BYTES,
                 "a secure-aggregation entry has an empty or over-long key, or too many bytes")
        out[key] = bytes(value)
    return out
