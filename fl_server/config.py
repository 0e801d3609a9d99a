"""The federation's configuration: one dataclass, read from TOML or JSON, overridden by flags.

Each setting is declared once, as a field with its help, type, default, check and the seed's alias
(common.settings); the flags, the file reader, docs/config.md, the training config sent to clients and
the resume hash all come from these declarations. The settings clients receive are declared in
common/messages.py ClientHyperparameters, which Config includes.

The seed's `conf.json` is read as it is: its keys are aliases of the fields below (`no_models`,
`type`, `global_epochs`, `k`, `lambda`). The server is the one source of truth for the training
config; clients receive what they need of it with every `JoinRound` reply.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from common.datasets import NO_DATASET
from common.messages import ClientHyperparameters, ModelSpec, TrainConfig, class_names
from common.models import TORCHVISION, check_model_name
from common.secure_rounds import default_neighbours, default_threshold
from common.settings import (
    Declared,
    Parsed,
    Rule,
    SettingError,
    at_least,
    check_type,
    check_value,
    declared,
    one_of,
    parse_bool,
    positive,
    setting,
)
from fl_server import monitoring, servicer, transport, uploads
from fl_server.aggregation import parse_aggregator
from fl_server.membership import RegistryLimits
from fl_server.model_source import parse_shape
from fl_server.uploads import MetricLimits

# One error for a wrong setting, whether the file, a flag or a check found it; it names the key.
ConfigError = SettingError

_FRACTION = "must be at least 0 and below 1"
_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:function
# Image classifiers: they need a number of classes when no data set gives it (an mlp with none is a
# regression: one output).
_IMAGE_CLASSIFIERS = ("cnn", "resnet18")
# Settings added after checkpoints held the resume hash: they enter it only when set, so that a checkpoint
# of an older version resumes under the same settings.
_HASHED_WHEN_SET = frozenset({"input_shape", "num_classes", "initial_weights", "classes", "label_column",
                              "secure_aggregation", "secagg_threshold", "secagg_neighbours", "secagg_clip",
                              "secagg_scale_bits"})


def _model_name(name: str) -> None:
    if name:  # empty: no model class (the initial_weights file is the model)
        check_model_name(name)


def _function_name(name: str) -> None:
    if name and not _FUNCTION.match(name):
        raise ValueError(f"must be package.module:function (or empty for none), got {name!r}")


@dataclass(frozen=True, kw_only=True)
class Config(ClientHyperparameters):
    # What is trained.
    model_name: str = setting("cnn", (
        "model: mlp, cnn, resnet18, autoencoder (trained on reconstruction, MSE), torchvision:NAME (any "
        "torchvision classifier, random weights), or package.module:ClassName (your nn.Module, built as "
        "ClassName(input_shape, num_classes), importable by fl-server and each client; clients must allow it "
        "with --allow-model); empty = no model class: the initial_weights file is the model, federated as it "
        "is (needs dataset none)"),
        check=Parsed(_model_name), defines_run=True)
    input_shape: str = setting("", (
        "one sample's shape, comma-separated (3,32,32); empty = the data set's. Needed with dataset none; "
        "with a data set it must agree with the data set's"), check=Parsed(parse_shape), defines_run=True)
    num_classes: int = setting(0, (
        "the model's outputs (classes); 0 = the data set's, or the number of `classes`. With dataset none and "
        "neither, cnn, resnet18 and torchvision models refuse to start, and mlp is a regression (one output, "
        "trained on mean squared error), as your own class may be"), check=at_least(0, "must be 0 or more"),
        defines_run=True)
    initial_weights: str = setting("", (
        "a file of weights the global model starts from instead of random ones (pretrained weights, federated "
        "fine-tuning): a PyTorch state_dict (read with torch.load(weights_only=True); a dict holding it under "
        "'state_dict' or 'model' works too) or a .safetensors file; with a model class they must fit it "
        "exactly. Read at a fresh start only, not on resume; empty = random weights from the seed"),
        defines_run=True)
    server_evaluation: str = setting("", (
        "your evaluation, package.module:function, called after each aggregated round as function(model, "
        "device) -> {name: value}, the model loaded with the round's weights, in eval mode, under "
        "torch.no_grad(); its loss and accuracy become the round's, and all its values go into the round's "
        "server_metrics. Used instead of the data set's test split when both are given; empty = none"),
        check=Parsed(_function_name), defines_run=False)
    data_root: str = setting("data", (
        "folder holding torchvision data sets (MNIST/raw/..., cifar-10-batches-py/); unused for digits"),
        defines_run=False)
    # Rounds.
    rounds: int = setting(10, "rounds of federated training (seed: global_epochs)", alias="global_epochs",
                          check=at_least(1), defines_run=False)
    clients_per_round: int = setting(3, "clients sampled each round (seed: k)", alias="k", check=at_least(1),
                                     defines_run=True)
    min_clients: int = setting(0, (
        "clients that must have joined before the first round starts (0 = clients_per_round)"),
        check=at_least(0, "must be 0 or more"), defines_run=False)
    min_fit: int = setting(0, (
        "updates a round needs at its deadline to be aggregated rather than re-run (0 = clients_per_round)"),
        check=at_least(0, "must be 0 or more"), defines_run=True)
    round_timeout: float = setting(300.0, "seconds a round waits for its updates before closing with what arrived",
                                   check=positive("must be a positive number of seconds"), defines_run=False)
    heartbeat_seconds: float = setting(2.0, (
        "how often working clients report in; a selected client silent for 3 heartbeats + 2 s is dropped"),
        check=Rule(lambda v: 0.1 <= v <= 3600, "must be between 0.1 and 3600 seconds"), defines_run=False)
    server_lr: float = setting(1.0, (
        "server learning rate applied to the averaged diff (seed: lambda); 1.0 is plain FedAvg"),
        alias="lambda", check=positive("must be positive (seed: lambda)"), defines_run=True)
    aggregator: str = setting("fedavg", (
        "how updates are combined: fedavg (weighted mean), or robust to malicious clients: median, "
        "trimmed_mean:BETA, krum:F, multikrum:F:M"), check=Parsed(parse_aggregator), defines_run=True)
    server_optimizer: str = setting("fedavg", (
        "how the averaged diff moves the global model: fedavg, fedavgm (momentum), fedadam or fedyogi"),
        check=one_of("fedavg", "fedavgm", "fedadam", "fedyogi"), defines_run=True)
    server_momentum: float = setting(0.9, "fedavgm's momentum", check=Rule(lambda v: 0 <= v < 1, _FRACTION),
                                     defines_run=True)
    server_beta1: float = setting(0.9, "fedadam/fedyogi first-moment decay",
                                  check=Rule(lambda v: 0 <= v < 1, _FRACTION), defines_run=True)
    server_beta2: float = setting(0.99, "fedadam/fedyogi second-moment decay",
                                  check=Rule(lambda v: 0 <= v < 1, _FRACTION), defines_run=True)
    server_tau: float = setting(1e-3, "fedadam/fedyogi adaptivity (epsilon)", check=positive(), defines_run=True)
    dp_noise_multiplier: float = setting(0.0, (
        "client-level differential privacy (DP-FedAvg): Gaussian noise of this many times dp_clip is added to "
        "the sum of clipped updates; 0 = off. Epsilon is reported per round"),
        check=at_least(0, "must be 0 (off) or more"), defines_run=True)
    # Checked in validate(): only a DP run uses them.
    dp_clip: float = setting(1.0, "with DP: each update's L2 norm is clipped to this before it is summed",
                             defines_run=True)
    dp_delta: float = setting(1e-5, "with DP: the delta at which epsilon is reported", defines_run=True)
    secagg_stage_timeout: float = setting(30.0, (
        "secure aggregation: seconds each stage (key advertisement, share exchange, unmasking) waits for the "
        "round's clients; those missing then are dropped from the round"), check=positive(), defines_run=False)
    # The service.
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 or [::] for every interface)",
                        defines_run=False)
    port: int = setting(50051, "port to listen on; 0 picks a free one",
                        check=Rule(lambda v: 0 <= v <= 65535, "must be between 0 and 65535"), defines_run=False)
    max_uploads: int = setting(0, (
        "updates received at once (one model of memory each); more uploads wait their turn. 0 = as many "
        "as fit in 64 MiB, at least 1 (one for a 45 MB model). Raise it when clients upload large models "
        "over slow links, so that one slow client does not hold up the others"),
        check=at_least(0, "must be 0 (automatic) or more"), defines_run=False)
    max_downloads: int = setting(8, (
        "global-model streams served at once (about one 1 MiB chunk of memory each); more wait their turn"),
        check=at_least(1), defines_run=False)
    # Resource limits that hold before a request is authenticated (docs/security.md, "No client can stop,
    # starve or bloat the server").
    long_poll_seconds: float = setting(servicer.LONG_POLL_SECONDS, (
        "seconds a JoinRound call from an idle client is held open (less a random fifth) before it is answered "
        "WAIT and renewed; a round reaches a held client at once. Longer polls cost less with many clients; "
        "a client's own deadline (fl-client: 30 s) caps it"),
        check=Rule(lambda v: 1 <= v <= 3600, "must be between 1 and 3600 seconds"), defines_run=False)
    max_rpcs: int = setting(transport.MAX_RPCS, (
        "calls served at once (a JoinRound long-poll holds one for long_poll_seconds, an upload for its "
        "transfer), and the most threads their blocking work may use (a long-poll holds none); more calls get "
        "RESOURCE_EXHAUSTED at once. Size it above clients + the calls an attacker can open within "
        "first_message_timeout"),
        check=at_least(16), defines_run=False)
    rpc_thread_stack_kib: int = setting(transport.THREAD_STACK_KIB, (
        "stack of each call thread, in KiB (0 = the system's, usually 8 MiB): uploads, downloads and secure "
        "aggregation's stages hold threads, so their address space is kept small"),
        check=Rule(lambda v: v == 0 or 256 <= v <= 65536, "must be 0 (system default) or 256 to 65536 KiB"),
        defines_run=False)
    first_message_timeout: float = setting(servicer.FIRST_MESSAGE_TIMEOUT, (
        "seconds an update stream may take to send its header (fl-client sends it at once); then the call is "
        "ended with DEADLINE_EXCEEDED and its place among max_rpcs freed. Identity is checked on the header, so "
        "this bounds what an unauthenticated caller holds"), check=positive(), defines_run=False)
    upload_progress_timeout: float = setting(uploads.UPLOAD_PROGRESS_TIMEOUT, (
        "seconds an admitted upload may go without sending data (a 1 MiB chunk) before it is ended with "
        "DEADLINE_EXCEEDED, its receive buffer and thread freed, and its client given up on for the round"),
        check=positive(), defines_run=False)
    keepalive_seconds: float = setting(transport.KEEPALIVE_SECONDS, (
        "the server pings each connection this often (HTTP/2 keepalive) to find peers that vanished"),
        check=Rule(lambda v: v >= 1, "must be at least 1 second"), defines_run=False)
    keepalive_timeout: float = setting(transport.KEEPALIVE_TIMEOUT,
                                       "seconds without a ping's answer after which a connection is closed",
                                       check=Rule(lambda v: v >= 1, "must be at least 1 second"), defines_run=False)
    metrics_host: str = setting("127.0.0.1", (
        "address the monitoring endpoint (--metrics-port) listens on; loopback by default, since /status lists "
        "client ids"), defines_run=False)
    metrics_token_file: str = setting("", (
        "a file holding a secret that monitoring requests must present as `Authorization: Bearer SECRET` "
        "(empty = none). With --tls-cert the endpoint is HTTPS with the gRPC port's certificate"),
        defines_run=False)
    metrics_request_timeout: float = setting(monitoring.REQUEST_TIMEOUT, (
        "seconds the monitoring endpoint waits on a socket of one request (each is served on its own thread)"),
        check=positive(), defines_run=False)
    out: str = setting("runs/latest", "folder for metrics.jsonl, checkpoints and final_model.pt", defines_run=False)
    # What clients may send and make the server remember (docs/security.md).
    max_clients: int = setting(1000, (
        "open mode only (no --client-tokens, no --tls-client-ca): clients the server keeps track of at once. "
        "A new one beyond it takes the place of the one gone longest, or is refused (RESOURCE_EXHAUSTED) "
        "while all are active. 0 = no limit"), check=at_least(0, "must be 0 (no limit) or more"), defines_run=False)
    forget_clients_after: float = setting(RegistryLimits.forget_after, (
        "seconds after which a client not heard from is forgotten (it joins again as new); never one "
        "selected in the round in progress"), check=at_least(60, "must be at least 60 seconds"), defines_run=False)
    max_metrics: int = setting(MetricLimits.max_metrics,
                               "metrics a client may send with an update; an update with more is refused",
                               check=Rule(lambda v: 1 <= v <= 1000, "must be between 1 and 1000"),
                               defines_run=False)
    max_metric_name_length: int = setting(MetricLimits.max_name_length, (
        "characters in a metric's name (letters, digits and _ . : / - only); an update with a longer one is "
        "refused"), check=Rule(lambda v: 1 <= v <= 1000, "must be between 1 and 1000"), defines_run=False)
    max_metric_value: float = setting(MetricLimits.max_value, (
        "largest magnitude of a metric's value; an update with a larger one, NaN or infinity is refused"),
        check=positive(), defines_run=False)

    def __post_init__(self) -> None:
        validate(self)

    @property
    def effective_num_classes(self) -> int:
        """The model's outputs: num_classes, or the number of `classes` named."""
        return self.num_classes or len(class_names(self.classes))

    @property
    def effective_min_clients(self) -> int:
        return self.min_clients or self.clients_per_round

    @property
    def effective_min_fit(self) -> int:
        return self.min_fit or self.clients_per_round

    def train_config(self, spec: ModelSpec) -> TrainConfig:
        """What every client receives: the model and the settings ClientHyperparameters declares."""
        values = {}
        for d in declared(ClientHyperparameters):
            value = getattr(self, d.name)
            values[d.name] = value if d.setting.canonical is None else d.setting.canonical(value)
        if self.secure_aggregation:  # what 0 means is resolved here, once, so that every client agrees
            values["secagg_neighbours"] = self.secagg_neighbours or default_neighbours(self.clients_per_round)
            values["secagg_threshold"] = self.secagg_threshold or default_threshold(self.clients_per_round,
                                                                                    values["secagg_neighbours"])
        return TrainConfig(model=spec, **values)


SETTINGS: dict[str, Declared] = {d.name: d for d in declared(Config)}
ALIASES = {d.setting.alias: d.name for d in SETTINGS.values() if d.setting.alias}  # the seed's conf.json names


def sent_to_clients(name: str) -> bool:
    return any(d.name == name for d in declared(ClientHyperparameters))


def config_hash(cfg: Config) -> str:
    """The settings that define what a run computes, hashed: a checkpoint made under other values is not
    resumed (mixing two experiments), while rounds, timeouts and addresses may change freely."""
    defining = {d.name: getattr(cfg, d.name) for d in SETTINGS.values() if d.setting.defines_run
                and not (d.name in _HASHED_WHEN_SET and getattr(cfg, d.name) == d.default)}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


def validate(cfg: Config) -> None:
    # Every type before any value, so that a check never meets a value of the wrong type.
    for d in SETTINGS.values():
        check_type(d.name, getattr(cfg, d.name), d.type)
    for d in SETTINGS.values():
        check_value(d.name, getattr(cfg, d.name), d.setting.check)

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config key {key!r}: {what}, got {getattr(cfg, key)!r}")

    if cfg.dp_noise_multiplier > 0:
        need(cfg.dp_clip > 0, "dp_clip", "must be positive")
        need(0 < cfg.dp_delta < 1, "dp_delta", "must be between 0 and 1")
        need(cfg.aggregator == "fedavg", "aggregator", "must be fedavg with differential privacy "
             "(dp_noise_multiplier > 0): the robust rules' and your own rules' outputs have no bounded "
             "sensitivity to add noise to")
    if not cfg.model_name:  # no model class: nothing to build, so nothing to evaluate on the server
        need(cfg.initial_weights != "", "initial_weights", "must name the model's weights file when model_name "
             "is empty (no model class)")
        need(cfg.dataset == NO_DATASET, "dataset", f"must be {NO_DATASET} when model_name is empty: the server "
             "evaluates on a data set with a model it builds, and there is no model class to build")
        need(not cfg.server_evaluation, "server_evaluation", "must be empty when model_name is empty: the "
             "evaluation is given a model, and there is no model class to build")
    elif cfg.dataset == NO_DATASET:
        need(cfg.input_shape != "", "input_shape", f"must give one sample's shape (such as 3,32,32) with dataset "
             f"{NO_DATASET}, which has none to take it from")
        need(cfg.effective_num_classes > 0 or not (cfg.model_name in _IMAGE_CLASSIFIERS
                                                   or cfg.model_name.startswith(TORCHVISION)),
             "num_classes", f"must be positive (or `classes` given) for the classifier {cfg.model_name} with dataset "
             f"{NO_DATASET}, which has no classes to count")
    if cfg.classes and cfg.num_classes:
        need(len(class_names(cfg.classes)) == cfg.num_classes, "num_classes",
             f"must be the number of names in `classes` ({len(class_names(cfg.classes))}), or 0 to take it from them")
    if cfg.secure_aggregation:
        need(cfg.aggregator == "fedavg", "aggregator", "must be fedavg with secure_aggregation: the server sees "
             "only the sum of the updates, and the robust rules (and your own) need each update")
        need(cfg.compression == "none", "compression", "must be none with secure_aggregation: updates are "
             "encoded in fixed point and summed masked, which int8, float16 or top-k encodings cannot be")
        need(cfg.dp_noise_multiplier == 0, "dp_noise_multiplier", "must be 0 with secure_aggregation: the "
             "server cannot clip updates it never sees")
    need(cfg.effective_min_fit <= cfg.clients_per_round, "min_fit",
         f"cannot exceed clients_per_round ({cfg.clients_per_round})")
    need(cfg.effective_min_fit <= cfg.effective_min_clients, "min_fit",
         f"cannot exceed min_clients ({cfg.effective_min_clients}), or a round could never reach it")


def _normalize(raw: dict[str, Any], source: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(key, key)
        if name not in SETTINGS:
            raise ConfigError(f"{source}: unknown config key {key!r}; known keys are "
                              f"{', '.join(sorted(SETTINGS))} (and the seed's {', '.join(ALIASES)})")
        if name in values:
            raise ConfigError(f"{source}: config key {key!r} is given twice (also as an alias)")
        d = SETTINGS[name]
        if name == "classes" and isinstance(value, list):
            value = _joined_names(key, value, source)
        value = check_type(key, value, d.type)
        values[name] = d.setting.value_aliases.get(value, value)
    return values


def _joined_names(key: str, names: list[Any], source: str) -> str:
    """A file's list of class names as the setting's comma-separated text."""
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{source}: config key {key!r}: expected class names (strings), got {name!r}")
        if "," in name:
            raise ConfigError(f"{source}: config key {key!r}: class name {name!r} holds a comma, which separates "
                              "names; rename the class")
    return ",".join(names)


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
    for d in SETTINGS.values():
        parser.add_argument("--" + d.name.replace("_", "-"), dest=d.name, default=None,
                            type=parse_bool if d.type is bool else d.type,
                            help=f"{d.setting.help} (default: {d.default})")


def from_arguments(args: argparse.Namespace) -> Config:
    return load(args.config, **{name: getattr(args, name) for name in SETTINGS})
