"""A study for fl-experiment: its runs, grouped into comparisons (one table and one plot each), and
where they run. Read from a TOML file (`fl-experiment --config FILE`), or built from the flags (the
seed's comparisons, `default_study`).

The file: top-level keys are settings every run starts from; `[ray]` says where the clients run;
each `[[comparison]]` has a `title` and its `[[comparison.run]]`s, each with a `name` and any setting
it changes. configs/cifar10_resnet18_study.toml is the seed's CIFAR-10 study; docs/simulation.md
lists every key. A key this module does not know is an error, never ignored: a misspelt `roundz` must
not silently run the default.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from common import codecs
from common.partition import parse_scheme
from fl_tools.ray_backend import RayOptions
from fl_tools.simulation import BACKENDS

KINDS = ("federated", "centralized", "single")
STRATEGIES = ("fedavg", "fedprox")


class StudyError(ValueError):
    """A study file that cannot be run; the message is one sentence naming the file and the key."""


@dataclass(frozen=True)
class RunSpec:
    """One run: its name in the tables and every setting it runs with."""

    name: str = ""
    # federated: the federation as set; centralized: all the data on one client; single: each client
    # alone on its own IID share for as many rounds, the mean over `single_clients` of them (0: all).
    kind: str = "federated"
    dataset: str = "digits"  # digits (built in), mnist, fashion-mnist, cifar10, cifar100, imagefolder:PATH
    data_root: str = "data"
    shards: str = ""  # a folder of fl-partition shards (shard0...), read by each client where it runs
    model: str = "cnn"
    rounds: int = 20
    clients: int = 10
    clients_per_round: int = 0  # k; 0: half of the clients
    local_epochs: int = 5
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    strategy: str = "fedavg"  # fedavg, or fedprox with mu > 0
    mu: float = 0.0
    aggregator: str = "fedavg"  # the server's rule (fl-server's aggregator setting)
    partition: str = "iid"  # iid, shards, dirichlet:ALPHA
    compression: str = "none"
    eval_fraction: float = 0.0
    seed: int = 0
    single_clients: int = 0
    round_timeout: float = 600.0  # seconds a round waits for its clients (Ray backend)
    min_fit: int = 1  # updates a round needs to be aggregated

    @property
    def k(self) -> int:
        return self.clients_per_round or max(1, self.clients // 2)

    def same_run(self) -> RunSpec:
        """The settings alone: two runs equal here give the same results, so a study runs them once."""
        return dataclasses.replace(self, name="")


@dataclass
class Comparison:
    key: str  # names its plot (comparison_KEY.png) and its entry in results.json
    title: str
    runs: list[RunSpec]


@dataclass
class Study:
    comparisons: list[Comparison]
    defaults: RunSpec  # what the runs start from, for the tables' header
    backend: str = "inprocess"
    ray: RayOptions = field(default_factory=RayOptions)


SETTINGS = {f.name: f for f in dataclasses.fields(RunSpec) if f.name != "name"}
TOP_LEVEL = {*SETTINGS, "backend"} - {"kind", "single_clients"}
RAY_KEYS = {f.name for f in dataclasses.fields(RayOptions)}
COMPARISON_KEYS = {"key", "title", "run"}
RUN_KEYS = {"name", *SETTINGS}

TITLES = {
    "a": "(a) federated vs centralized vs single-client training",
    "b": "(b) the effect of k, the clients per round",
    "c": "(c) IID vs non-IID shares, FedAvg vs FedProx",
}


def default_study(base: RunSpec) -> Study:
    """The seed's comparisons on `base`'s settings: (a) federated (k of n per round) against centralized
    and single-client training; (b) k = 30%, 50% and 60% of n; (c) IID, Dirichlet (alpha 0.5) and
    pathological label shards, each with FedAvg and FedProx (mu 0.1)."""
    n, k = base.clients, base.k
    run = dataclasses.replace
    a = [run(base, name=f"federated, {k} of {n} per round", clients_per_round=k),
         run(base, name="centralized (all data, one client)", kind="centralized"),
         run(base, name=f"single client (mean of {n})", kind="single")]
    b = [run(base, name=f"k = {kk} of {n}", clients_per_round=kk)
         for kk in (max(1, (3 * n) // 10), k, max(1, (6 * n) // 10))]
    c = [run(base, name=f"{partition}, {algorithm}", clients_per_round=k, partition=partition,
             strategy="fedprox" if mu else "fedavg", mu=mu)
         for partition in ("iid", "dirichlet:0.5", "shards") for algorithm, mu in (("FedAvg", 0.0),
                                                                                  ("FedProx mu=0.1", 0.1))]
    return Study([Comparison(key, TITLES[key], runs) for key, runs in zip("abc", (a, b, c))], base)


def load_study(path: Path, overrides: dict[str, Any] | None = None) -> Study:
    """The study in the TOML file `path`; `overrides` (fl-experiment's flags given on the command line)
    replace the file's top-level settings and [ray] keys. StudyError in one sentence."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as e:
        raise StudyError(f"cannot read the study file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise StudyError(f"{path} is not valid TOML ({e})") from None
    where = str(path)
    known(raw, TOP_LEVEL | {"ray", "comparison"}, f"{where}, at the top level")
    overrides = overrides or {}
    top = {k: v for k, v in raw.items() if k in TOP_LEVEL}
    top.update({k: v for k, v in overrides.items() if k in TOP_LEVEL})
    backend = top.pop("backend", "inprocess")
    if backend not in BACKENDS:
        raise StudyError(f"{where}: backend must be {' or '.join(BACKENDS)}, not {backend!r}")
    defaults = settings(RunSpec(), top, f"{where}, at the top level")
    ray_table = raw.get("ray", {})
    if not isinstance(ray_table, dict):
        raise StudyError(f"{where}: ray must be a table ([ray]) of {', '.join(sorted(RAY_KEYS))}")
    known(ray_table, RAY_KEYS, f"{where}, in [ray]")
    ray_values = {**ray_table, **{k: v for k, v in overrides.items() if k in RAY_KEYS}}
    ray = ray_options(ray_values, f"{where}, in [ray]")
    tables = raw.get("comparison")
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise StudyError(f"{where} has no [[comparison]]; give at least one, with a title and its "
                         "[[comparison.run]]s")
    comparisons = []
    for number, table in enumerate(tables, 1):
        place = f"{where}, in [[comparison]] {number}"
        known(table, COMPARISON_KEYS, place)
        title, key = table.get("title"), table.get("key", "abcdefghijklmnopqrstuvwxyz"[(number - 1) % 26])
        if not isinstance(title, str) or not title:
            raise StudyError(f"{place}: give it a title (a string)")
        if not isinstance(key, str) or not key.isidentifier():
            raise StudyError(f"{place}: key must be a short name of letters, digits and _, not {key!r}")
        runs = table.get("run")
        if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
            raise StudyError(f"{place}: give it at least one [[comparison.run]] with a name")
        specs = []
        for index, values in enumerate(runs, 1):
            at = f"{place}, run {index}"
            known(values, RUN_KEYS, at)
            name = values.get("name")
            if not isinstance(name, str) or not name:
                raise StudyError(f"{at}: give it a name (a string)")
            specs.append(settings(dataclasses.replace(defaults, name=name),
                                  {k: v for k, v in values.items() if k != "name"}, f"{at} ({name!r})"))
        comparisons.append(Comparison(key, title, specs))
    keys = [c.key for c in comparisons]
    if len(set(keys)) != len(keys):
        raise StudyError(f"{where}: two comparisons have the same key; give each its own")
    return Study(comparisons, defaults, backend, ray)


def known(table: dict[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise StudyError(f"{where}: unknown key {unknown[0]!r}; the keys there are {', '.join(sorted(keys))}")


def _typed(name: str, value: Any, kind: type, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        what = {int: "a whole number", float: "a number", str: "a string"}.get(kind, kind.__name__)
        raise StudyError(f"{where}: {name} must be {what}, not {value!r}")
    return value


def settings(base: RunSpec, values: dict[str, Any], where: str) -> RunSpec:
    """`base` with `values` (a run's or the top level's keys), checked."""
    types = {"str": str, "int": int, "float": float}
    changed = {name: _typed(name, v, types[str(SETTINGS[name].type)], where) for name, v in values.items()}
    spec = dataclasses.replace(base, **changed)
    check(spec, where)
    return spec


def check(spec: RunSpec, where: str) -> None:
    def bad(message: str) -> StudyError:
        return StudyError(f"{where}: {message}")

    if spec.kind not in KINDS:
        raise bad(f"kind must be one of {', '.join(KINDS)}, not {spec.kind!r}")
    if spec.rounds < 1 or spec.local_epochs < 1 or spec.batch_size < 1:
        raise bad("rounds, local_epochs and batch_size must be at least 1")
    if spec.clients < 2 and spec.kind != "centralized":
        raise bad(f"clients must be at least 2, not {spec.clients}")
    if not 0 <= spec.clients_per_round <= spec.clients:
        raise bad(f"clients_per_round must be 1..clients ({spec.clients}), or 0 for half of them")
    if not 0 <= spec.single_clients <= spec.clients:
        raise bad(f"single_clients must be 1..clients ({spec.clients}), or 0 for all of them")
    if spec.kind == "centralized" and spec.shards:
        raise bad("a centralized run needs the data set by name (dataset), not shards")
    if spec.strategy not in STRATEGIES:
        raise bad(f"strategy must be fedavg or fedprox, not {spec.strategy!r}")
    if (spec.strategy == "fedprox") != (spec.mu > 0):
        raise bad("fedprox needs mu > 0 (its proximal term), and fedavg has none (mu = 0)")
    if spec.lr <= 0 or spec.round_timeout <= 0 or not 0 <= spec.eval_fraction < 1 or spec.min_fit < 1:
        raise bad("lr and round_timeout must be above 0, eval_fraction in 0..1 and min_fit at least 1")
    try:
        parse_scheme(spec.partition)
        codecs.parse(spec.compression)
    except ValueError as e:
        raise bad(str(e)) from None


def ray_options(values: dict[str, Any], where: str) -> RayOptions:
    types = {"address": str, "cpus_per_client": float, "gpus_per_client": float, "num_cpus": int}
    options = RayOptions(**{k: _typed(k, v, types[k], where) for k, v in values.items()})
    if options.cpus_per_client <= 0 or options.gpus_per_client < 0:
        raise StudyError(f"{where}: cpus_per_client must be above 0 and gpus_per_client 0 or more")
    return options
