"""The simulation on Ray against in-process, on the same work: a thousand simulated clients of the
built-in digits (MLP), a hundred a round, five rounds. Reports client-rounds per second on each backend
and the driver's peak memory (figure 10 of bench/run.py; docs/simulation.md).

    python -m bench.ray_sim [--clients 1000] [--per-round 100] [--rounds 5] [--cpus 2]

Each backend runs in a process of its own, so that each driver's peak resident set (ru_maxrss) is its
own. The rate is over the rounds after the first: the first also starts Ray's worker processes (each
imports torch), which a study pays once, not per round; its time is reported beside the rate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measurement:
    backend: str
    clients: int
    per_round: int
    rounds: int  # aggregated
    client_rounds: int  # updates aggregated, over all rounds
    rate: float  # client-rounds per second over the rounds after the first
    first_round_seconds: float
    wall_seconds: float  # the whole run, Ray's start-up included
    baseline_rss: int  # the driver's resident set before the run (its imports), bytes
    peak_rss: int  # the driver's peak resident set, bytes


def child(backend: str, clients: int, per_round: int, rounds: int, cpus: int) -> Measurement:
    """One backend's run, in this process."""
    import torch  # noqa: PLC0415 - the parent only starts children

    from fl_server.round_types import RoundOutcome  # noqa: PLC0415
    from fl_tools import simulation  # noqa: PLC0415
    from fl_tools.clients import ClientData, cached_dataset  # noqa: PLC0415

    torch.set_num_threads(1)
    test = cached_dataset("digits", "data")[1]
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes: list[RoundOutcome] = []
    started = time.perf_counter()
    simulation.run(ClientData("digits"), test, model="mlp", clients=clients, rounds=rounds, local_epochs=1,
                   clients_per_round=per_round, backend=backend, ray=simulation.RayOptions(num_cpus=cpus),
                   on_outcome=outcomes.append)
    wall = time.perf_counter() - started
    aggregated = [o for o in outcomes if o.aggregated]
    later = aggregated[1:] or aggregated
    return Measurement(backend, clients, per_round, len(aggregated), sum(len(o.contributors) for o in aggregated),
                       sum(len(o.contributors) for o in later) / sum(o.seconds for o in later),
                       aggregated[0].seconds, wall, baseline,
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def measure(backend: str, clients: int, per_round: int, rounds: int, cpus: int = 2) -> Measurement:
    """One backend's run in a process of its own."""
    done = subprocess.run([sys.executable, "-m", "bench.ray_sim", "--child", backend, "--clients", str(clients),
                           "--per-round", str(per_round), "--rounds", str(rounds), "--cpus", str(cpus)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"bench.ray_sim --child {backend} exited {done.returncode}: {done.stderr[-2000:]}")
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


def summary(local: Measurement, ray: Measurement) -> str:
    mb = 2**20
    return (f"{ray.clients} clients, {ray.per_round} a round, {ray.rounds} rounds (digits, mlp): "
            f"Ray {ray.rate:.0f} client-rounds/s, in-process {local.rate:.0f}/s "
            f"(first round {ray.first_round_seconds:.1f} s on Ray, {local.first_round_seconds:.1f} s in-process); "
            f"driver peak RSS Ray {ray.peak_rss / mb:.0f} MB (+{(ray.peak_rss - ray.baseline_rss) / mb:.0f} MB "
            f"over its imports), in-process {local.peak_rss / mb:.0f} MB "
            f"(+{(local.peak_rss - local.baseline_rss) / mb:.0f} MB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.ray_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray instance's CPUs")
    parser.add_argument("--child", choices=("inprocess", "ray"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(asdict(child(args.child, args.clients, args.per_round, args.rounds, args.cpus))))
        return 0
    local = measure("inprocess", args.clients, args.per_round, args.rounds, args.cpus)
    ray = measure("ray", args.clients, args.per_round, args.rounds, args.cpus)
    assert local.rounds == ray.rounds == args.rounds, (local, ray)
    print(summary(local, ray))
    print(f"Ray / in-process: {ray.rate / local.rate:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
