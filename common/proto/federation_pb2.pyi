from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECAGG_STAGE_UNSPECIFIED: _ClassVar[SecAggStage]
    ADVERTISE_KEYS: _ClassVar[SecAggStage]
    SHARE_KEYS: _ClassVar[SecAggStage]
    UNMASK: _ClassVar[SecAggStage]
    REVEAL: _ClassVar[SecAggStage]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    TRAIN: _ClassVar[Action]
    WAIT: _ClassVar[Action]
    FINISHED: _ClassVar[Action]

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    FULL_WEIGHTS: _ClassVar[Encoding]
    DIFF: _ClassVar[Encoding]
SECAGG_STAGE_UNSPECIFIED: SecAggStage
ADVERTISE_KEYS: SecAggStage
SHARE_KEYS: SecAggStage
UNMASK: SecAggStage
REVEAL: SecAggStage
ACTION_UNSPECIFIED: Action
TRAIN: Action
WAIT: Action
FINISHED: Action
ENCODING_UNSPECIFIED: Encoding
FULL_WEIGHTS: Encoding
DIFF: Encoding

class SecAggRequest(_message.Message):
    __slots__ = ("protocol_version", "client_id", "round", "stage", "entries")
    class EntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    round: int
    stage: SecAggStage
    entries: _containers.ScalarMap[str, bytes]
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., stage: _Optional[_Union[SecAggStage, str]] = ..., entries: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("ready", "entries", "survivors", "dropped", "message")
    class EntriesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    READY_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    entries: _containers.ScalarMap[str, bytes]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    message: str
    def __init__(self, ready: _Optional[bool] = ..., entries: _Optional[_Mapping[str, bytes]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., message: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("protocol_version", "client_id", "num_samples", "device", "training_round", "failure")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TRAINING_ROUND_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    num_samples: int
    device: str
    training_round: int
    failure: str
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., device: _Optional[str] = ..., training_round: _Optional[int] = ..., failure: _Optional[str] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "input_shape", "num_classes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    def __init__(self, name: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ...) -> None: ...

class TrainConfig(_message.Message):
    __slots__ = ("model", "hyperparameters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    hyperparameters: str
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., hyperparameters: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("action", "round", "model_version", "config", "retry_after_seconds", "message", "heartbeat_seconds", "upload_admitted", "model_stream", "inline_upload_bytes")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    MODEL_STREAM_FIELD_NUMBER: _ClassVar[int]
    INLINE_UPLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    action: Action
    round: int
    model_version: int
    config: TrainConfig
    retry_after_seconds: float
    message: str
    heartbeat_seconds: float
    upload_admitted: bool
    model_stream: _containers.RepeatedScalarFieldContainer[bytes]
    inline_upload_bytes: int
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., config: _Optional[_Union[TrainConfig, _Mapping]] = ..., retry_after_seconds: _Optional[float] = ..., message: _Optional[str] = ..., heartbeat_seconds: _Optional[float] = ..., upload_admitted: _Optional[bool] = ..., model_stream: _Optional[_Iterable[bytes]] = ..., inline_upload_bytes: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("protocol_version", "client_id", "model_version")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    model_version: int
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PayloadHeader(_message.Message):
    __slots__ = ("tensors", "total_bytes", "num_chunks", "checksum", "encoding", "codec")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    total_bytes: int
    num_chunks: int
    checksum: int
    encoding: Encoding
    codec: str
    def __init__(self, tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., checksum: _Optional[int] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., codec: _Optional[str] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "model_version", "payload")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    payload: PayloadHeader
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("protocol_version", "client_id", "round", "model_version", "num_samples", "metrics", "payload", "data", "join_after")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    JOIN_AFTER_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: str
    round: int
    model_version: int
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    payload: PayloadHeader
    data: bytes
    join_after: bool
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., payload: _Optional[_Union[PayloadHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., join_after: _Optional[bool] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "duplicate", "message", "next")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    duplicate: bool
    message: str
    next: JoinReply
    def __init__(self, accepted: _Optional[bool] = ..., duplicate: _Optional[bool] = ..., message: _Optional[str] = ..., next: _Optional[_Union[JoinReply, _Mapping]] = ...) -> None: ...
