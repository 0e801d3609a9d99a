"""`fl-experiment`: the comparisons of the seed, in one command.

    fl-experiment [--dataset digits] [--rounds 20] [--out experiments]

(a) federated training (5 of 10 clients per round) against centralized training (all the data on one
    client) and single-client training (each client alone on its own share, averaged over clients);
(b) the effect of k, the number of clients per round (3, 5 and 6 of 10);
(c) IID shares against Dirichlet (alpha 0.5) and pathological label shards, each with FedAvg and with
    FedProx.

Every run goes through the server's own round state and aggregation and the clients' own training loop,
in one process (fl_tools.simulation); the test accuracy and loss of every round are evaluated on the
held-out test set. Writes results.md (the tables), results.json (every round of every run) and one PNG
per comparison (accuracy and loss per round) into --out.
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
from common.datasets import ArrayData, DataError, load_dataset
from common.partition import client_share
from common.training import EvalResult
from fl_tools import simulation

TARGET = 0.95  # the accuracy whose first round the tables report


@dataclass
class Run:
    name: str
    accuracy: list[float] = field(default_factory=list)  # per round
    loss: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        return self.accuracy[-1]

    def first_round_reaching(self, target: float) -> int | None:
        return next((i + 1 for i, a in enumerate(self.accuracy) if a >= target), None)


@dataclass
class Settings:
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
    mean = Run(f"single client (mean of {s.clients})")
    mean.accuracy = [sum(r.accuracy[i] for r in runs) / len(runs) for i in range(s.rounds)]
    mean.loss = [sum(r.loss[i] for r in runs) / len(runs) for i in range(s.rounds)]
    return mean


def comparisons(s: Settings) -> dict[str, list[Run]]:
    k = s.clients // 2
    fedavg_iid = federated(f"federated, {k} of {s.clients} per round", s, k)
    out = {"a": [fedavg_iid, federated("centralized (all data, one client)", s, 1, clients=1),
                 single_clients(s)]}
    out["b"] = [federated(f"k = {kk} of {s.clients}", s, kk) if kk != k
                else dataclasses.replace(fedavg_iid, name=f"k = {k} of {s.clients}")
                for kk in (max(1, (3 * s.clients) // 10), k, max(1, (6 * s.clients) // 10))]
    out["c"] = []
    for partition in ("iid", "dirichlet:0.5", "shards"):
        for algorithm, mu in (("FedAvg", 0.0), ("FedProx mu=0.1", 0.1)):
            name = f"{partition}, {algorithm}"
            out["c"].append(dataclasses.replace(fedavg_iid, name=name) if (partition, mu) == ("iid", 0.0)
                            else federated(name, s, k, partition=partition, mu=mu))
    return out


TITLES = {
    "a": "(a) federated vs centralized vs single-client training",
    "b": "(b) the effect of k, the clients per round",
    "c": "(c) IID vs non-IID shares, FedAvg vs FedProx",
}


def table(key: str, runs: list[Run]) -> str:
    reference = runs[0]
    lines = [f"### {TITLES[key]}", "",
             f"| run | round 1 | final accuracy | best | first round >= {TARGET:.0%} | final loss | "
             f"vs {reference.name} |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        reached = r.first_round_reaching(TARGET)
        lines.append(f"| {r.name} | {r.accuracy[0]:.2%} | {r.final:.2%} | {max(r.accuracy):.2%} | "
                     f"{reached or 'not reached'} | {r.loss[-1]:.3f} | "
                     f"{(r.final - reference.final) * 100:+.1f} points |")
    return "\n".join(lines) + "\n"


def plot(key: str, runs: list[Run], path: Path) -> None:
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
    fig.suptitle(TITLES[key])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-experiment", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", help="digits (built in), mnist or cifar10")
    parser.add_argument("--data-root", default="data", help="where mnist / cifar10 are read from")
    parser.add_argument("--model", default="cnn", help="mlp, cnn or resnet18")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5, help="as in the FedAvg paper's E")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("experiments"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.clients < 2 or args.local_epochs < 1:
        return logs.fail("fl-experiment", "--rounds and --local-epochs must be at least 1, --clients at least 2")
    try:
        train, test = load_dataset(args.dataset, args.data_root)
    except DataError as e:
        return logs.fail("fl-experiment", str(e))
    torch.set_num_threads(1)
    started = time.perf_counter()
    s = Settings(train, test, args.model, args.rounds, args.clients, args.local_epochs, args.seed, args.dataset)
    results = comparisons(s)
    args.out.mkdir(parents=True, exist_ok=True)
    header = (f"{args.dataset} ({len(train)} training, {len(test)} test samples), {args.model}, {args.clients} "
              f"IID clients unless said otherwise, {args.rounds} rounds of {args.local_epochs} local epochs, "
              f"seed {args.seed}; test accuracy after each round.\n\n")
    text = header + "\n".join(table(key, runs) for key, runs in results.items())
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps(
        {key: [{"name": r.name, "accuracy": r.accuracy, "loss": r.loss} for r in runs]
         for key, runs in results.items()}, indent=1) + "\n")
    for key, runs in results.items():
        plot(key, runs, args.out / f"comparison_{key}.png")
    print(text)
    print(f"written to {args.out}/ (results.md, results.json, comparison_a/b/c.png) in "
          f"{time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
