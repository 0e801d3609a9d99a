"""The protocol's messages as plain dataclasses: what the server and client logic work on.

Only `common.convert` knows protobuf; everything else speaks these.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from common import codecs
from common.settings import Parsed, Rule, at_least, one_of, positive, setting
from common.tensors import TensorSpec

# 2: TrainConfig carries the hyperparameters as one JSON object.
# 3: an update's integer and bool tensors are the client's new values, not local - global.
PROTOCOL_VERSION = 3
# The words a RESOURCE_EXHAUSTED refusal starts with when the server's client registry is full (open
# mode): a client may try again later, as places free up, unlike other RESOURCE_EXHAUSTED refusals.
REGISTRY_FULL = "the client registry is full"


class Action(enum.Enum):
    TRAIN = 1
    WAIT = 2
    FINISHED = 3


class Encoding(enum.Enum):
    FULL_WEIGHTS = 1  # the tensors themselves
    DIFF = 2  # floating-point tensors as local - global; integer and bool ones as the local values


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8)
    num_classes: int


def _dataset_name(name: str) -> None:
    from common.datasets import check_dataset_name  # here: common.datasets imports this module

    check_dataset_name(name)


def class_names(text: str) -> tuple[str, ...]:
    """The `classes` setting as names in label order: comma-separated, each stripped of spaces; empty
    text is no names (labels are numbers). ValueError for an empty or repeated name, since either
    would leave a label without one meaning."""
    if not text.strip():
        return ()
    names = tuple(name.strip() for name in text.split(","))
    if "" in names:
        raise ValueError(f"class names {text!r} include an empty one; give names separated by single commas")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"class names {text!r} repeat {', '.join(repeated)}; give each class once")
    return names


def _partition(text: str) -> None:
    from common.partition import parse_scheme  # here: common.partition imports this module

    parse_scheme(text)


@dataclass(frozen=True, kw_only=True)
class ClientHyperparameters:
    """The settings every client receives with every JoinRound reply, declared once: the server's
    Config includes them (its flags, file keys and docs come from here), and they travel as one JSON
    object (common.convert). A new one is a field here, with a default that does what a client did
    before it existed (an older server does not send it), and the code that uses it."""

    dataset: str = setting("digits", (
        "data set: digits (built in, offline); mnist, fashion-mnist, cifar10 or cifar100 (read from "
        "--data-root); imagefolder:PATH (your images, PATH/CLASS_NAME/*.png|jpg, resized to 32x32 RGB, "
        "labelled in the order of `classes`, else of the folders' sorted names); none (the server holds no data "
        "and evaluates only with server_evaluation; every client trains on its own --data)"),
        alias="type", value_aliases={"cifar": "cifar10"}, check=Parsed(_dataset_name), defines_run=True)
    num_clients: int = setting(3, (
        "clients in the federation (seed: no_models); client i without --data trains on the i-th share"),
        alias="no_models", check=at_least(1), defines_run=True)
    partition: str = setting("iid", (
        "how those shares are cut: iid, shards (2 label-sorted shards each), dirichlet:ALPHA (label skew)"),
        check=Parsed(_partition), defines_run=True)
    local_epochs: int = setting(2, "epochs each client trains per round", check=at_least(1), defines_run=True)
    batch_size: int = setting(32, "local mini-batch size", check=at_least(1), defines_run=True)
    lr: float = setting(0.05, "client learning rate", check=positive(), defines_run=True)
    momentum: float = setting(0.9, "client SGD momentum", check=at_least(0, "must be 0 or more"), defines_run=True)
    weight_decay: float = setting(0.0, "client L2 weight decay", check=at_least(0, "must be 0 or more"),
                                  defines_run=True)
    optimizer: str = setting("sgd", "client optimizer: sgd or adam", check=one_of("sgd", "adam"), defines_run=True)
    mu: float = setting(0.0, (
        "FedProx proximal term: adds mu/2 * ||w - w_global||^2 to the client loss (0 = FedAvg)"),
        check=at_least(0, "must be 0 or more"), defines_run=True)
    clip_norm: float = setting(0.0, "clip each client step's gradient norm to this (0 = off)",
                               check=at_least(0, "must be 0 (off) or more"), defines_run=True)
    eval_fraction: float = setting(0.0, (
        "federated evaluation: the part of each client's data it holds out (not trained on) to evaluate the "
        "global model it receives each round; the results go into metrics.jsonl (0 = off)"),
        check=Rule(lambda v: 0 <= v <= 0.5, "must be between 0 (off) and 0.5"), defines_run=True)
    compression: str = setting("none", (
        "update compression: none, float16, bfloat16, int8, or topk:R (fraction R of entries, error feedback)"),
        check=Parsed(codecs.parse), canonical=lambda text: str(codecs.parse(text)), defines_run=True)
    classes: str = setting("", (
        "the federation's class names in label order, comma-separated (label i is the i-th name), e.g. "
        "cat,dog,bird; a TOML or JSON config may give a list. Clients' image-folder subfolders and CSV labels "
        "are these names, so every client labels alike whatever classes it lacks. Empty = unnamed: folders "
        "and labels are the numbers 0..N-1"),
        check=Parsed(class_names), canonical=lambda text: ",".join(class_names(text)), defines_run=True)
    label_column: str = setting("label", (
        "the column of a client's CSV table (fl-client --data) that holds the label, or the target when the "
        "model has no classes; every other column is a numeric feature"),
        check=Rule(lambda v: v.strip() != "", "must name a column"), defines_run=True)
    seed: int = setting(0, "base seed: sampling, data split, initial model; client i uses seed + i",
                        check=at_least(0, "must be 0 or more"), defines_run=True)
    secure_aggregation: bool = setting(False, (
        "secure aggregation (SecAgg+, docs/security.md): clients mask their updates with pairwise masks that "
        "cancel in the sum, so the server learns each round's weighted mean and never one client's update. "
        "Needs aggregator fedavg, compression none and no dp_noise_multiplier"), defines_run=True)
    secagg_threshold: int = setting(0, (
        "secure aggregation: shares that reconstruct a client's secret, and the fewest clients whose updates "
        "a round unmasks (below it the round is re-run); 0 = a majority of each client's neighbourhood"),
        check=at_least(0, "must be 0 (automatic) or more"), defines_run=True)
    secagg_neighbours: int = setting(0, (
        "secure aggregation: each client's neighbours in SecAgg+'s sparse graph, with whom it shares masks "
        "and secrets (a round costs n * neighbours); 0 = about 2 log2(clients_per_round) + 1 (every other "
        "client in rounds of up to 10); clients_per_round - 1 or more = every other client (plain SecAgg)"),
        check=at_least(0, "must be 0 (automatic) or more"), defines_run=True)
    secagg_clip: float = setting(8.0, (
        "secure aggregation: each value of an update (local - global) is clipped to [-clip, clip] before it "
        "is encoded in fixed point"), check=positive(), defines_run=True)
    secagg_scale_bits: int = setting(16, (
        "secure aggregation: fixed point with 2**bits steps per unit; the mean's error is at most "
        "2**-(bits+1) per value"), check=Rule(lambda v: 8 <= v <= 24, "must be between 8 and 24"),
        defines_run=True)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(ClientHyperparameters):
    """What a client needs to know to train one round; sent with every JoinRound reply."""

    model: ModelSpec


@dataclass(frozen=True)
class JoinRequest:
    client_id: str
    num_samples: int  # 0 = not known yet
    device: str = ""
    training_round: int = 0  # non-zero: a heartbeat while working on this round
    failure: str = ""  # with training_round: why this client cannot deliver that round
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
    upload_admitted: bool = False  # TRAIN only: the upload needs no admission (a receive buffer is held for it)
    model_stream: tuple[bytes, ...] = ()  # TRAIN only, small models: the GetGlobalModel stream, or () to fetch it
    inline_upload_bytes: int = 0  # TRAIN only: an update payload up to this size may travel inside its header


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
    join_after: bool = False  # once taken, hold the call for the client's next join (SubmitResult.next)


class SecAggStage(enum.Enum):
    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    UNMASK = 3
    REVEAL = 4


@dataclass(frozen=True)
class SecAggRequest:
    client_id: str
    round: int
    stage: SecAggStage
    entries: dict[str, bytes] = field(default_factory=dict)
    protocol_version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class SecAggReply:
    ready: bool
    entries: dict[str, bytes] = field(default_factory=dict)
    survivors: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    message: str = ""


@dataclass(frozen=True)
class SubmitResult:
    accepted: bool
    duplicate: bool = False
    message: str = ""
    next: JoinDecision | None = None  # the client's next join's answer, when its header asked (join_after)
