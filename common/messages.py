"""The protocol's messages as plain dataclasses: what the server and client logic work on.

Only `common.convert` knows protobuf; everything else speaks these.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common.tensors import TensorSpec

PROTOCOL_VERSION = 1


class Action(enum.Enum):
    TRAIN = 1
    WAIT = 2
    FINISHED = 3


class Encoding(enum.Enum):
    FULL_WEIGHTS = 1  # the tensors themselves
    DIFF = 2  # local - global, in each tensor's own dtype


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8)
    num_classes: int


@dataclass(frozen=True)
class TrainConfig:
    """What a client needs to know to train one round; sent with every JoinRound reply."""

    model: ModelSpec
    dataset: str
    num_clients: int
    seed: int
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    optimizer: str
    compression: str = "none"
    partition: str = "iid"  # how the built-in data is split among clients without --data
    mu: float = 0.0  # FedProx proximal coefficient
    clip_norm: float = 0.0  # gradient-norm clipping, 0 = off
    eval_fraction: float = 0.0  # part of each client's data held out to evaluate the model it receives


@dataclass(frozen=True)
class JoinRequest:
    client_id: str
    num_samples: int  # 0 = not known yet
    device: str = ""
    training_round: int = 0  # non-zero: a heartbeat while working on this round
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class JoinDecision:
    action: Action
    config: TrainConfig
    round: int = 0
    model_version: int = 0
    retry_after: float = 0.0
    message: str = ""
    heartbeat_seconds: float = 0.0  # TRAIN only: how often to send heartbeats while working


@dataclass(frozen=True)
class ModelRequest:
    client_id: str
    model_version: int = 0  # 0 = current
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class PayloadHeader:
    specs: list[TensorSpec]
    total_bytes: int
    num_chunks: int
    checksum: int  # XXH3-64 of the payload bytes
    encoding: Encoding
    codec: str = "none"  # update compression (common.codecs); FULL_WEIGHTS are never compressed


@dataclass(frozen=True)
class ModelHeader:
    round: int
    model_version: int
    payload: PayloadHeader


@dataclass(frozen=True)
class UpdateHeader:
    client_id: str
    round: int
    model_version: int
    num_samples: int
    payload: PayloadHeader
    metrics: dict[str, float] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class SubmitResult:
    accepted: bool
    duplicate: bool = False
    message: str = ""
