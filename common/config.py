"""The federation's configuration: one dataclass, read from TOML or JSON, overridden by flags.

The seed's `conf.json` is read as it is: its keys are aliases of the fields below (`no_models`,
`type`, `global_epochs`, `k`, `lambda`). The server is the one source of truth for the training
config; clients receive what they need of it with every `JoinRound` reply.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import codecs
from common.datasets import check_dataset_name
from common.models import check_model_name
from common.partition import parse_scheme


class ConfigError(ValueError):
    """A config file or flag value is wrong; the message names the key and says what is allowed."""


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class Config:
    # What is trained.
    model_name: str = field(default="cnn", metadata=_help(
        "model: mlp, cnn, resnet18, autoencoder (trained on reconstruction, MSE), torchvision:NAME (any "
        "torchvision classifier, random weights), or package.module:ClassName (your nn.Module, built as "
        "ClassName(input_shape, num_classes); clients must allow it with --allow-model)"))
    dataset: str = field(default="digits", metadata=_help(
        "data set: digits (built in, offline); mnist, fashion-mnist, cifar10 or cifar100 (read from "
        "--data-root); imagefolder:PATH (your images, PATH/CLASS_NAME/*.png|jpg, resized to 32x32)"))
    data_root: str = field(default="data", metadata=_help(
        "folder holding torchvision data sets (MNIST/raw/..., cifar-10-batches-py/); unused for digits"))
    num_clients: int = field(default=3, metadata=_help(
        "clients in the federation (seed: no_models); client i without --data trains on the i-th share"))
    partition: str = field(default="iid", metadata=_help(
        "how those shares are cut: iid, shards (2 label-sorted shards each), dirichlet:ALPHA (label skew)"))
    # Rounds.
    rounds: int = field(default=10, metadata=_help("rounds of federated training (seed: global_epochs)"))
    clients_per_round: int = field(default=3, metadata=_help("clients sampled each round (seed: k)"))
    min_clients: int = field(default=0, metadata=_help(
        "clients that must have joined before the first round starts (0 = clients_per_round)"))
    min_fit: int = field(default=0, metadata=_help(
        "updates a round needs at its deadline to be aggregated rather than re-run (0 = clients_per_round)"))
    round_timeout: float = field(default=300.0, metadata=_help(
        "seconds a round waits for its updates before closing with what arrived"))
    heartbeat_seconds: float = field(default=2.0, metadata=_help(
        "how often working clients report in; a selected client silent for 3 heartbeats + 2 s is dropped"))
    server_lr: float = field(default=1.0, metadata=_help(
        "server learning rate applied to the averaged diff (seed: lambda); 1.0 is plain FedAvg"))
    aggregator: str = field(default="fedavg", metadata=_help(
        "how updates are combined: fedavg (weighted mean), or robust to malicious clients: median, "
        "trimmed_mean:BETA, krum:F, multikrum:F:M"))
    server_optimizer: str = field(default="fedavg", metadata=_help(
        "how the averaged diff moves the global model: fedavg, fedavgm (momentum), fedadam or fedyogi"))
    server_momentum: float = field(default=0.9, metadata=_help("fedavgm's momentum"))
    server_beta1: float = field(default=0.9, metadata=_help("fedadam/fedyogi first-moment decay"))
    server_beta2: float = field(default=0.99, metadata=_help("fedadam/fedyogi second-moment decay"))
    server_tau: float = field(default=1e-3, metadata=_help("fedadam/fedyogi adaptivity (epsilon)"))
    dp_noise_multiplier: float = field(default=0.0, metadata=_help(
        "client-level differential privacy (DP-FedAvg): Gaussian noise of this many times dp_clip is added to "
        "the sum of clipped updates; 0 = off. Epsilon is reported per round"))
    dp_clip: float = field(default=1.0, metadata=_help(
        "with DP: each update's L2 norm is clipped to this before it is summed"))
    dp_delta: float = field(default=1e-5, metadata=_help("with DP: the delta at which epsilon is reported"))
    # Local training, sent to every client.
    local_epochs: int = field(default=2, metadata=_help("epochs each client trains per round"))
    batch_size: int = field(default=32, metadata=_help("local mini-batch size"))
    lr: float = field(default=0.05, metadata=_help("client learning rate"))
    momentum: float = field(default=0.9, metadata=_help("client SGD momentum"))
    weight_decay: float = field(default=0.0, metadata=_help("client L2 weight decay"))
    optimizer: str = field(default="sgd", metadata=_help("client optimizer: sgd or adam"))
    mu: float = field(default=0.0, metadata=_help(
        "FedProx proximal term: adds mu/2 * ||w - w_global||^2 to the client loss (0 = FedAvg)"))
    clip_norm: float = field(default=0.0, metadata=_help("clip each client step's gradient norm to this (0 = off)"))
    eval_fraction: float = field(default=0.0, metadata=_help(
        "federated evaluation: the part of each client's data it holds out (not trained on) to evaluate the "
        "global model it receives each round; the results go into metrics.jsonl (0 = off)"))
    compression: str = field(default="none", metadata=_help(
        "update compression: none, float16, bfloat16, int8, or topk:R (fraction R of entries, error feedback)"))
    seed: int = field(default=0, metadata=_help(
        "base seed: sampling, data split, initial model; client i uses seed + i"))
    # The service.
    host: str = field(default="127.0.0.1", metadata=_help(
        "address to listen on (0.0.0.0 or [::] for every interface)"))
    port: int = field(default=50051, metadata=_help("port to listen on; 0 picks a free one"))
    max_uploads: int = field(default=0, metadata=_help(
        "updates received at once (one model of memory each); more uploads wait their turn. 0 = as many "
        "as fit in 64 MiB, at least 1 (one for a 45 MB model). Raise it when clients upload large models "
        "over slow links, so that one slow client does not hold up the others"))
    max_downloads: int = field(default=8, metadata=_help(
        "global-model streams served at once (about one 1 MiB chunk of memory each); more wait their turn"))
    out: str = field(default="runs/latest", metadata=_help(
        "folder for metrics.jsonl, checkpoints and final_model.pt"))

    def __post_init__(self) -> None:
        validate(self)

    @property
    def effective_min_clients(self) -> int:
        return self.min_clients or self.clients_per_round

    @property
    def effective_min_fit(self) -> int:
        return self.min_fit or self.clients_per_round


# The seed's conf.json names, mapped onto ours.
ALIASES = {
    "no_models": "num_clients",
    "type": "dataset",
    "global_epochs": "rounds",
    "k": "clients_per_round",
    "lambda": "server_lr",
}
DATASET_ALIASES = {"cifar": "cifar10"}  # the seed calls CIFAR-10 "cifar"
OPTIMIZERS = ("sgd", "adam")
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _check_type(key: str, value: Any, kind: type) -> Any:
    # bool is an int in Python; a config saying `rounds = true` is a mistake, not 1.
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key {key!r}: expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def _field_type(name: str) -> type:
    return {"int": int, "float": float, "str": str}[str(FIELDS[name].type)]


def validate(cfg: Config) -> None:
    for name in FIELDS:
        _check_type(name, getattr(cfg, name), _field_type(name))

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {what}, got {getattr(cfg, key)!r}")

    from fl_server.aggregation import parse_aggregator  # noqa: PLC0415 - the server's, imported late

    # Keys whose own parser knows what is wrong with a value (each raises a ValueError saying it).
    for key, parse in (("model_name", check_model_name), ("dataset", check_dataset_name),
                       ("compression", codecs.parse), ("aggregator", parse_aggregator), ("partition", parse_scheme)):
        try:
            parse(getattr(cfg, key))
        except ValueError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    need(cfg.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    need(cfg.max_uploads >= 0, "max_uploads", "must be 0 (automatic) or more")
    for key in ("num_clients", "rounds", "clients_per_round", "local_epochs", "batch_size", "max_downloads"):
        need(getattr(cfg, key) >= 1, key, "must be at least 1")
    for key in ("min_clients", "min_fit", "seed"):
        need(getattr(cfg, key) >= 0, key, "must be 0 or more")
    need(cfg.lr > 0, "lr", "must be positive")
    need(cfg.server_lr > 0, "server_lr", "must be positive (seed: lambda)")
    need(cfg.server_optimizer in SERVER_OPTIMIZERS, "server_optimizer", f"must be one of {', '.join(SERVER_OPTIMIZERS)}")
    for key in ("server_momentum", "server_beta1", "server_beta2"):
        need(0 <= getattr(cfg, key) < 1, key, "must be at least 0 and below 1")
    need(cfg.server_tau > 0, "server_tau", "must be positive")
    need(cfg.dp_noise_multiplier >= 0, "dp_noise_multiplier", "must be 0 (off) or more")
    if cfg.dp_noise_multiplier > 0:
        need(cfg.dp_clip > 0, "dp_clip", "must be positive")
        need(0 < cfg.dp_delta < 1, "dp_delta", "must be between 0 and 1")
        need(cfg.aggregator == "fedavg", "aggregator", "must be fedavg with differential privacy "
             "(dp_noise_multiplier > 0): the robust rules' outputs have no bounded sensitivity to add noise to")
    need(cfg.mu >= 0, "mu", "must be 0 or more")
    need(cfg.clip_norm >= 0, "clip_norm", "must be 0 (off) or more")
    need(0 <= cfg.eval_fraction <= 0.5, "eval_fraction", "must be between 0 (off) and 0.5")
    need(cfg.momentum >= 0, "momentum", "must be 0 or more")
    need(cfg.weight_decay >= 0, "weight_decay", "must be 0 or more")
    need(cfg.round_timeout > 0, "round_timeout", "must be a positive number of seconds")
    need(0.1 <= cfg.heartbeat_seconds <= 3600, "heartbeat_seconds", "must be between 0.1 and 3600 seconds")
    need(0 <= cfg.port <= 65535, "port", "must be between 0 and 65535")
    need(cfg.effective_min_fit <= cfg.clients_per_round, "min_fit",
         f"cannot exceed clients_per_round ({cfg.clients_per_round})")
    need(cfg.effective_min_fit <= cfg.effective_min_clients, "min_fit",
         f"cannot exceed min_clients ({cfg.effective_min_clients}), or a round could never reach it")


def _normalize(raw: dict[str, Any], source: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS:
            raise ConfigError(f"{source}: unknown config key {key!r}; known keys are "
                              f"{', '.join(sorted(FIELDS))} (and the seed's {', '.join(ALIASES)})")
        if name in values:
            raise ConfigError(f"{source}: config key {key!r} is given twice (also as an alias)")
        value = _check_type(key, value, _field_type(name))
        if name == "dataset":
            value = DATASET_ALIASES.get(value, value)
        values[name] = value
    return values


def read_file(path: str | Path) -> dict[str, Any]:
    """The file's settings, normalized to field names; TOML or JSON, chosen by the extension."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .toml or .json")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a table/object of keys")
    return _normalize(raw, str(path))


def load(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the file, then overrides (flags); None overrides mean "not given"."""
    values = read_file(path) if path else {}
    values.update(_normalize({k: v for k, v in overrides.items() if v is not None}, "flags"))
    return Config(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field (`--clients-per-round`, ...), each defaulting to "not given"."""
    parser.add_argument("--config", metavar="FILE", help="TOML or JSON config file (the seed's conf.json works)")
    for f in dataclasses.fields(Config):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_field_type(f.name),
                            default=None, help=f"{f.metadata['help']} (default: {f.default})")


def from_arguments(args: argparse.Namespace) -> Config:
    return load(args.config, **{name: getattr(args, name) for name in FIELDS})
