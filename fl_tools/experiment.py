"""`fl-experiment`: the seed's comparisons, or a study described in a file, in one command.

    fl-experiment [--dataset digits] [--rounds 20] [--out experiments] [--backend ray]
    fl-experiment --config configs/cifar10_resnet18_study.toml [--backend ray --ray-address auto]

Without --config, the seed's comparisons:
(a) federated training (5 of 10 clients per round) against centralized training (all the data on one
    client) and single-client training (each client alone on its own share, averaged over clients);
(b) the effect of k, the number of clients per round (3, 5 and 6 of 10);
(c) IID shares against Dirichlet (alpha 0.5) and pathological label shards, each with FedAvg and with
    FedProx.
With --config FILE, the comparisons and runs the file describes (fl_tools/study.py, docs/simulation.md).

Every run goes through the server's own round state and aggregation and the clients' own training loop
(fl_tools.simulation): in this process (the default), or each client's round as a Ray task on a local Ray
instance or a cluster (--backend ray). The test accuracy and loss of every round are evaluated on the
held-out test set, and one line per round tells the progress on stderr. Writes results.md (the tables),
results.json (every round of every run, with its settings) and one PNG per comparison (accuracy and loss
per round) into --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common import logs
from common.datasets import ArrayData, DataError
from common.partition import client_share
from common.training import EvalResult
from fl_server.round_types import RoundOutcome
from fl_tools import simulation
from fl_tools.clients import ClientData, cached_dataset
from fl_tools.ray_backend import RayOptions, SimulationError
from fl_tools.study import TITLES, RunSpec, Study, StudyError, check, default_study, load_study

TARGET = 0.95  # the accuracy whose first round the tables report

__all__ = ["TITLES", "Run", "Settings", "federated", "main", "run_study", "single_clients"]


@dataclass
class Run:
    name: str
    accuracy: list[float] = field(default_factory=list)  # per round
    loss: list[float] = field(default_factory=list)
    settings: RunSpec | None = None

    @property
    def final(self) -> float:
        return self.accuracy[-1]

    def first_round_reaching(self, target: float) -> int | None:
        return next((i + 1 for i, a in enumerate(self.accuracy) if a >= target), None)


@dataclass
class Settings:
    """The runs' shared settings, for the functions below (tests, scripts) that run on data in memory."""

    train: ArrayData
    test: ArrayData
    model: str
    rounds: int
    clients: int
    local_epochs: int
    seed: int
    dataset: str = "digits"  # its name: CIFAR's training augmentation depends on it


def federated(name: str, s: Settings, per_round: int, partition: str = "iid", mu: float = 0.0,
              train: ArrayData | None = None, clients: int | None = None) -> Run:
    """One federated run in this process on `s.train` (or `train`)."""
    run = Run(name)

    def record(_: int, result: EvalResult) -> None:
        run.accuracy.append(result.accuracy)
        run.loss.append(result.loss)

    simulation.run(train or s.train, s.test, model=s.model, clients=clients or s.clients, rounds=s.rounds,
                   local_epochs=s.local_epochs, seed=s.seed, clients_per_round=per_round, partition=partition,
                   mu=mu, on_round=record, dataset=s.dataset)
    return run


def single_clients(s: Settings) -> Run:
    """Each client trains alone on its own IID share, as many rounds; the per-round mean over clients."""
    runs = [federated(f"client {i}", s, 1, train=client_share(s.train, i, s.clients, s.seed), clients=1)
            for i in range(s.clients)]
    return mean_of(runs, f"single client (mean of {s.clients})", s.rounds)


def mean_of(runs: list[Run], name: str, rounds: int) -> Run:
    mean = Run(name)
    mean.accuracy = [sum(r.accuracy[i] for r in runs) / len(runs) for i in range(rounds)]
    mean.loss = [sum(r.loss[i] for r in runs) / len(runs) for i in range(rounds)]
    return mean


class Progress:
    """One line per round on stderr: which run, which round, the accuracy, and how fast clients went."""

    def __init__(self, name: str, rounds: int):
        self.name, self.rounds = name, rounds
        self.outcome: RoundOutcome | None = None

    def on_outcome(self, outcome: RoundOutcome) -> None:
        self.outcome = outcome
        if not outcome.aggregated:
            print(f"[{self.name}] round {outcome.round}/{self.rounds}: not aggregated ({len(outcome.contributors)} "
                  f"updates, {len(outcome.drop_reasons)} clients dropped); running it again", file=sys.stderr,
                  flush=True)

    def on_round(self, version: int, result: EvalResult) -> None:
        o = self.outcome
        done = len(o.contributors) if o is not None else 0
        seconds = o.seconds if o is not None else 0.0
        dropped = f", {len(o.drop_reasons)} dropped" if o is not None and o.drop_reasons else ""
        print(f"[{self.name}] round {version}/{self.rounds}: accuracy {result.accuracy:.2%}, loss {result.loss:.3f}; "
              f"{done} client-round{'s' if done != 1 else ''} in {seconds:.1f} s "
              f"({done / max(seconds, 1e-9):.1f}/s){dropped}",
              file=sys.stderr, flush=True)


def execute(spec: RunSpec, study: Study) -> Run:
    """One run of a study, on the study's backend. Its clients load their data by name (ClientData), on
    either backend: the same code cuts the same shares, and on Ray it runs on the workers."""
    source = ClientData(spec.dataset, spec.data_root) if not spec.shards else ClientData(shards=spec.shards)
    test = cached_dataset(spec.dataset, spec.data_root)[1]
    if spec.kind == "single":
        runs = [_simulate(spec, dataclasses.replace(spec, name=f"{spec.name}: client {i}"), study,
                          dataclasses.replace(source, within=(i, spec.clients)), test, 1)
                for i in range(spec.single_clients or spec.clients)]
        return dataclasses.replace(mean_of(runs, spec.name, spec.rounds), settings=spec)
    if spec.kind == "centralized":
        return _simulate(spec, spec, study, source, test, 1)
    return _simulate(spec, spec, study, source, test, spec.clients)


def _simulate(spec: RunSpec, shown: RunSpec, study: Study, source: ClientData, test: ArrayData,
              clients: int) -> Run:
    run = Run(shown.name, settings=spec)
    progress = Progress(shown.name, spec.rounds)

    def record(version: int, result: EvalResult) -> None:
        run.accuracy.append(result.accuracy)
        run.loss.append(result.loss)
        progress.on_round(version, result)

    simulation.run(source, test, model=spec.model, clients=clients, rounds=spec.rounds,
                   local_epochs=spec.local_epochs, seed=spec.seed,
                   clients_per_round=spec.k if clients > 1 else 1, partition=spec.partition if clients > 1 else "iid",
                   mu=spec.mu, lr=spec.lr, optimizer=spec.optimizer, batch_size=spec.batch_size,
                   aggregator=spec.aggregator, compression=spec.compression, eval_fraction=spec.eval_fraction,
                   dataset=spec.dataset, on_round=record, on_outcome=progress.on_outcome, backend=study.backend,
                   ray=study.ray, round_timeout=spec.round_timeout, min_fit=spec.min_fit)
    return run


def run_study(study: Study) -> dict[str, list[Run]]:
    """Every comparison's runs; a run whose settings another already has is run once."""
    done: dict[RunSpec, Run] = {}
    out = {}
    for comparison in study.comparisons:
        runs = []
        for spec in comparison.runs:
            key = spec.same_run()
            if key not in done:
                done[key] = execute(spec, study)
            runs.append(dataclasses.replace(done[key], name=spec.name, settings=spec))
        out[comparison.key] = runs
    return out


def table(title: str, runs: list[Run]) -> str:
    reference = runs[0]
    lines = [f"### {title}", "",
             f"| run | round 1 | final accuracy | best | first round >= {TARGET:.0%} | final loss | "
             f"vs {reference.name} |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        reached = r.first_round_reaching(TARGET)
        lines.append(f"| {r.name} | {r.accuracy[0]:.2%} | {r.final:.2%} | {max(r.accuracy):.2%} | "
                     f"{reached or 'not reached'} | {r.loss[-1]:.3f} | "
                     f"{(r.final - reference.final) * 100:+.1f} points |")
    return "\n".join(lines) + "\n"


def plot(title: str, runs: list[Run], path: Path) -> None:
    import matplotlib  # noqa: PLC0415 - only when writing plots

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        rounds = range(1, len(r.accuracy) + 1)
        acc.plot(rounds, r.accuracy, marker=".", label=r.name)
        loss.plot(rounds, r.loss, marker=".", label=r.name)
    acc.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    loss.set(xlabel="round", ylabel="test loss", title="loss", yscale="log")
    acc.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def describe(study: Study) -> str:
    d = study.defaults
    train, test = cached_dataset(d.dataset, d.data_root)
    where = "in this process" if study.backend == "inprocess" else (
        f"on Ray ({study.ray.address or 'a local instance'}, {study.ray.cpus_per_client:g} CPUs"
        + (f" and {study.ray.gpus_per_client:g} GPUs" if study.ray.gpus_per_client else "") + " per client)")
    return (f"{d.dataset} ({len(train)} training, {len(test)} test samples), {d.model}, {d.clients} "
            f"{d.partition} clients unless said otherwise, {d.rounds} rounds of {d.local_epochs} local epochs, "
            f"seed {d.seed}, clients run {where}; test accuracy after each round.\n\n")


def write(study: Study, results: dict[str, list[Run]], out: Path) -> str:
    """results.md, results.json and comparison_KEY.png in `out`; returns the tables."""
    comparisons = {c.key: c for c in study.comparisons}
    out.mkdir(parents=True, exist_ok=True)
    text = describe(study) + "\n".join(table(comparisons[key].title, runs) for key, runs in results.items())
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {key: [{"name": r.name, "accuracy": r.accuracy, "loss": r.loss,
                "settings": dataclasses.asdict(r.settings) if r.settings else None} for r in runs]
         for key, runs in results.items()}, indent=1) + "\n")
    for key, runs in results.items():
        plot(comparisons[key].title, runs, out / f"comparison_{key}.png")
    return text


FLAGS = {"dataset": "digits", "data_root": "data", "model": "cnn", "rounds": 20, "clients": 10, "local_epochs": 5,
         "seed": 0, "backend": "inprocess", "round_timeout": 600.0}
RAY_FLAGS = {"address": "", "cpus_per_client": 1.0, "gpus_per_client": 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-experiment", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # No defaults here (None: not given), so that a flag given with --config overrides the file's key.
    parser.add_argument("--config", type=Path, help="a study file (TOML): its comparisons and runs")
    parser.add_argument("--dataset", help="digits (built in), mnist or cifar10 (default digits)")
    parser.add_argument("--data-root", help="where mnist / cifar10 are read from (default data)")
    parser.add_argument("--model", help="mlp, cnn or resnet18 (default cnn)")
    parser.add_argument("--rounds", type=int, help="default 20")
    parser.add_argument("--clients", type=int, help="default 10")
    parser.add_argument("--local-epochs", type=int, help="as in the FedAvg paper's E (default 5)")
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--backend", choices=simulation.BACKENDS,
                        help="where clients train: inprocess (default, the reference) or ray")
    parser.add_argument("--round-timeout", type=float, help="seconds a round waits for its clients on Ray "
                        "(default 600); the late ones are dropped")
    parser.add_argument("--ray-address", dest="address", help="join this Ray cluster (auto, or HOST:PORT of "
                        "`ray start --head`); default: start a local Ray instance")
    parser.add_argument("--ray-cpus-per-client", dest="cpus_per_client", type=float,
                        help="CPUs each client's task asks Ray for, and its torch threads (default 1)")
    parser.add_argument("--ray-gpus-per-client", dest="gpus_per_client", type=float,
                        help="GPUs each client's task asks for: 0.25 runs four clients on a GPU (default 0)")
    parser.add_argument("--out", type=Path, default=Path("experiments"))
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "out")}
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        if args.config is not None:
            study = load_study(args.config, given)
        else:
            values = {**FLAGS, **{k: v for k, v in given.items() if k in FLAGS}}
            if values["rounds"] < 1 or values["clients"] < 2 or values["local_epochs"] < 1:
                return logs.fail("fl-experiment",
                                 "--rounds and --local-epochs must be at least 1, --clients at least 2")
            backend = values.pop("backend")
            base = RunSpec(**values)
            check(base, "fl-experiment's flags")
            ray_values = {**RAY_FLAGS, **{k: v for k, v in given.items() if k in RAY_FLAGS}}
            if ray_values["cpus_per_client"] <= 0 or ray_values["gpus_per_client"] < 0:
                return logs.fail("fl-experiment", "--ray-cpus-per-client must be above 0 and "
                                 "--ray-gpus-per-client 0 or more")
            study = dataclasses.replace(default_study(base), backend=backend, ray=RayOptions(**ray_values))
        cached_dataset(study.defaults.dataset, study.defaults.data_root)  # a missing data set: said at once
        results = run_study(study)
        text = write(study, results, args.out)
    except (StudyError, DataError, SimulationError) as e:
        return logs.fail("fl-experiment", logs.brief(e))
    except OSError as e:
        return logs.fail("fl-experiment", f"cannot write the results into {args.out}: {e.strerror or e}")
    print(text)
    pngs = "/".join(results)
    print(f"written to {args.out}/ (results.md, results.json, comparison_{pngs}.png) in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
