"""`make bench-peers`: fedgrpc against Flower's legacy gRPC runtime (`flwr.server.start_server`,
`flwr.client.start_client`, Flower 1.42 in its own virtualenv, bench/.peers-venv), the same workloads in
the same run, each framework as a server process and client processes on loopback.

    python -m bench.peers [--quick] [--flower-python bench/.peers-venv/bin/python] [--out bench]

- small: the built-in digits, SmallMLP (64-128-10, bench/small_mlp.py), 10 clients all selected every round,
  1 local epoch, batch 32, SGD lr 0.05 momentum 0.9, 20 rounds. Both frameworks start from the same
  initial weights file, train on the same client shards (fedgrpc's own iid shares, written to files for
  Flower) with the same batch order, and evaluate on the same 360-image test split on the server after
  every round. Figures: seconds per round and the test accuracy after the last round.
- large: CIFAR-10's ResNet-18 (44.7 MB, fedgrpc's `resnet18`, 3x32x32 inputs), no-op clients that send
  the model back with one small tensor nudged, N = 2, 10, 20 clients, 6 rounds, no evaluation on either
  side. Figures: seconds per round and the server's peak resident set.

Seconds per round, for both frameworks alike: the server records the wall-clock time at which each round's
new global model is ready (fedgrpc: `closed_at` in metrics.jsonl; Flower: the end of the strategy's
`aggregate_fit`); a round's period is the time from the previous round's end to its own, and the figure
is the median of the periods of rounds 2..R (round 1 also pays for clients connecting and warming up).
The small workload runs twice per framework in the order fedgrpc, Flower, Flower, fedgrpc, and its figure
is the mean of the runs' medians. Results: bench/peers.json and bench/peers.md.

--quick: 3 rounds, one run, the large workload with N = 2 and the small MLP (a smoke test; the figures
mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.run import machine, rss
from common.datasets import load_digits
from common.messages import ModelSpec
from common.models import build_model
from common.partition import client_share
from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess, start_client

ROOT = Path(__file__).resolve().parent.parent
FLOWER_PYTHON = ROOT / "bench" / ".peers-venv" / "bin" / "python"
SMALL_MODEL = "bench.small_mlp:SmallMLP"
# One thread per process, for both frameworks: the server and the clients share 2 cores. PYTHONPATH
# makes bench.small_mlp and bench.peers_noop importable by fl-server and fl-client, and bench.peers_flower
# by the Flower processes (which import nothing else from this tree).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
SEED = 0
TARGET_RATIO = 0.9  # small model: fedgrpc's time per round at most 0.9x Flower's
TARGET_ACCURACY_POINTS = 1.0  # and the same accuracy after 20 rounds within 1 point


@dataclass
class Run:
    framework: str  # "fedgrpc" or "flower"
    workload: str  # "small" or "large"
    clients: int
    rounds: int
    periods: list[float]  # seconds, rounds 2..R
    accuracy: float | None  # after the last round (small workload)
    start_rss_mib: float
    peak_rss_mib: float
    seconds_per_round: float = field(init=False)
    mean_seconds_per_round: float = field(init=False)

    def __post_init__(self) -> None:
        self.seconds_per_round = statistics.median(self.periods)
        self.mean_seconds_per_round = sum(self.periods) / len(self.periods)


def periods_of(closed_at: list[float]) -> list[float]:
    """Periods of rounds 2..R from the rounds' end times (round 1 first)."""
    return [b - a for a, b in zip(closed_at, closed_at[1:])]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Flower server exited with status {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the Flower server did not listen on port {port} within {timeout:.0f} s")


def wait_all(procs: list[subprocess.Popen], what: str, timeout: float = 1800.0) -> None:
    codes = [p.wait(timeout) for p in procs]
    if any(codes):
        raise RuntimeError(f"{what}: clients exited with {codes}")


class Peers:
    def __init__(self, work: Path, flower_python: Path, quick: bool):
        self.work = work
        self.flower_python = flower_python
        self.quick = quick
        self.small_rounds = 3 if quick else 20
        self.large_rounds = 3 if quick else 6
        self.runs: list[Run] = []
        self.failures: list[dict] = []
        self.files = work / "files"
        self.files.mkdir(parents=True)
        self._write_inputs()

    def _write_inputs(self) -> None:
        """The inputs both frameworks read: client shards, test split, initial weights."""
        train, test = load_digits()
        self.small_clients = 10
        for i in range(self.small_clients):
            share = client_share(train, i, self.small_clients, SEED, "iid")  # what fl-client --id i trains on
            np.savez(self.files / f"shard{i}.npz", x=share.x.numpy(), y=share.y.numpy())
        np.savez(self.files / "test.npz", x=test.x.numpy(), y=test.y.numpy())
        small = build_model(ModelSpec(SMALL_MODEL, test.input_shape, 10), seed=SEED)
        torch.save(small.state_dict(), self.files / "small_init.pt")
        large_name = SMALL_MODEL if self.quick else "resnet18"
        self.large_shape = (1, 8, 8) if self.quick else (3, 32, 32)
        large = build_model(ModelSpec(large_name, self.large_shape, 10), seed=SEED).state_dict()
        torch.save(large, self.files / "large_init.pt")
        self.large_name = large_name
        self.large_bytes = sum(t.numel() * t.element_size() for t in large.values())
        # The no-op clients nudge the last floating-point tensor (bench/peers_noop.py does the same).
        self.nudge = [i for i, t in enumerate(large.values()) if t.is_floating_point()][-1]

    def log(self, run: Run) -> None:
        self.runs.append(run)
        accuracy = "" if run.accuracy is None else f", accuracy {run.accuracy:.2%}"
        print(f"{run.workload:5} {run.framework:7} N={run.clients:<2}: {run.seconds_per_round:.3f} s/round "
              f"(median of {len(run.periods)}; mean {run.mean_seconds_per_round:.3f}){accuracy}, server peak RSS "
              f"{run.peak_rss_mib:.0f} MiB", flush=True)

    # fedgrpc ------------------------------------------------------------------------------------------
    def ours(self, workload: str, clients: int, tag: str) -> Run:
        out = self.work / f"fedgrpc-{workload}-{clients}-{tag}"
        out.mkdir()
        common = ["--port", "0", "--out", str(out), "--round-timeout", "600", "--seed", str(SEED),
                  "--num-clients", str(clients), "--clients-per-round", str(clients)]
        if workload == "small":
            rounds = self.small_rounds
            args = [*common, "--rounds", str(rounds), "--dataset", "digits", "--model-name", SMALL_MODEL,
                    "--initial-weights", str(self.files / "small_init.pt"), "--local-epochs", "1",
                    "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9"]
            client_args = ["--device", "cpu", "--quiet", "--allow-model", SMALL_MODEL]
        else:
            rounds = self.large_rounds
            args = [*common, "--rounds", str(rounds), "--dataset", "none", "--model-name", self.large_name,
                    "--input-shape", ",".join(map(str, self.large_shape)), "--num-classes", "10",
                    "--initial-weights", str(self.files / "large_init.pt")]
            client_args = ["--device", "cpu", "--quiet", "--app", "bench.peers_noop:train"]
            if self.quick:
                client_args += ["--allow-model", SMALL_MODEL]
        srv = ServerProcess(args, env=ENV, cwd=ROOT)
        try:
            start_rss, _ = rss(srv.proc.pid)
            procs = [start_client(str(i), srv.address, client_args, out / f"client{i}.log", env=ENV, cwd=ROOT)
                     for i in range(clients)]
            wait_all(procs, f"fedgrpc {workload} N={clients}")
            # The last round's evaluation runs beside the end of training: wait for its line.
            deadline = time.monotonic() + 120
            while True:
                records = [r for r in read_jsonl(out / "metrics.jsonl") if r.aggregated]
                if len(records) >= rounds and (workload == "large" or records[-1].accuracy is not None):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fedgrpc {workload}: {len(records)} of {rounds} rounds recorded")
                time.sleep(0.2)
            _, peak = rss(srv.proc.pid)
        finally:
            srv.stop()
        assert all(len(r.clients) == clients for r in records), [r.clients for r in records]
        run = Run("fedgrpc", workload, clients, rounds, periods_of([r.closed_at for r in records]),
                  records[-1].accuracy if workload == "small" else None, start_rss / 2**20, peak / 2**20)
        self.log(run)
        return run

    # Flower -------------------------------------------------------------------------------------------
    def flower(self, workload: str, clients: int, tag: str) -> Run:
        out = self.work / f"flower-{workload}-{clients}-{tag}"
        out.mkdir()
        port = free_port()
        rounds = self.small_rounds if workload == "small" else self.large_rounds
        module = [str(self.flower_python), "-m", "bench.peers_flower"]
        server_args = [*module, "server", "--port", str(port), "--clients", str(clients), "--rounds", str(rounds),
                       "--out", str(out / "result.json")]
        if workload == "small":
            server_args += ["--weights", str(self.files / "small_init.pt"), "--test", str(self.files / "test.npz")]
        else:
            server_args += ["--weights", str(self.files / "large_init.pt")]
        with open(out / "server.log", "w") as log:
            srv = subprocess.Popen(server_args, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        procs: list[subprocess.Popen] = []
        try:
            wait_listening(port, srv)
            for i in range(clients):
                if workload == "small":
                    extra = ["--shard", str(self.files / f"shard{i}.npz"), "--index", str(i), "--seed", str(SEED),
                             "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9"]
                else:
                    extra = ["--noop", "--nudge", str(self.nudge)]
                with open(out / f"client{i}.log", "w") as log:
                    procs.append(subprocess.Popen([*module, "client", "--server", f"127.0.0.1:{port}", *extra],
                                                  stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT))
            if srv.wait(1800):
                killed = " (SIGKILL: out of memory?)" if srv.returncode == -9 else ""
                raise RuntimeError(f"the Flower server exited with {srv.returncode}{killed}; see "
                                   f"{out / 'server.log'}:\n"
                                   + (out / "server.log").read_text()[-3000:])
            wait_all(procs, f"flower {workload} N={clients}", timeout=120)
        finally:
            for p in [srv, *procs]:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        result = json.loads((out / "result.json").read_text())
        closed = [result["closed_at"][str(r)] for r in range(1, rounds + 1)]
        accuracy = result["evaluations"][str(rounds)][1] if workload == "small" else None
        run = Run("flower", workload, clients, rounds, periods_of(closed), accuracy,
                  result["start_rss_kib"] / 1024, result["peak_rss_kib"] / 1024)
        self.log(run)
        return run

    def run(self, workloads: tuple[str, ...]) -> None:
        if "small" in workloads:
            order = ["fedgrpc", "flower"] if self.quick else ["fedgrpc", "flower", "flower", "fedgrpc"]
            for k, framework in enumerate(order):
                (self.ours if framework == "fedgrpc" else self.flower)("small", self.small_clients, str(k))
        if "large" in workloads:
            for clients in ((2,) if self.quick else (2, 10, 20)):
                for measure in (self.ours, self.flower):
                    try:
                        measure("large", clients, "0")
                    except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                        # A framework that cannot run a size here (Flower's server killed for memory at
                        # N = 20 under load, for one) is reported as such; the other sizes go on.
                        name = "fedgrpc" if measure == self.ours else "flower"
                        self.failures.append({"framework": name, "workload": "large", "clients": clients,
                                              "error": str(e).splitlines()[0]})
                        print(f"large {name} N={clients}: FAILED: {str(e).splitlines()[0]}", flush=True)


def summary(runs: list[Run]) -> dict:
    def pick(framework: str, workload: str, clients: int) -> list[Run]:
        return [r for r in runs if r.framework == framework and r.workload == workload and r.clients == clients]

    small_ours, small_flower = pick("fedgrpc", "small", 10), pick("flower", "small", 10)
    if not small_ours:
        return {"small": None, "large": large_summary(runs, pick)}
    ours_s = statistics.mean(r.seconds_per_round for r in small_ours)
    flower_s = statistics.mean(r.seconds_per_round for r in small_flower)
    acc_ours, acc_flower = small_ours[0].accuracy, small_flower[0].accuracy
    assert acc_ours is not None and acc_flower is not None
    ratio, points = ours_s / flower_s, 100 * (acc_ours - acc_flower)
    small: dict[str, Any] = {"fedgrpc_seconds_per_round": ours_s, "flower_seconds_per_round": flower_s, "ratio": ratio,
             "fedgrpc_accuracy": acc_ours, "flower_accuracy": acc_flower,
             "accuracy_points": points,
             "fedgrpc_runs": [r.seconds_per_round for r in small_ours],
             "flower_runs": [r.seconds_per_round for r in small_flower],
             "fedgrpc_accuracies": [r.accuracy for r in small_ours],
             "flower_accuracies": [r.accuracy for r in small_flower]}
    small["time_target_met"] = ratio <= TARGET_RATIO
    small["accuracy_target_met"] = abs(points) <= TARGET_ACCURACY_POINTS
    return {"small": small, "large": large_summary(runs, pick)}


def large_summary(runs: list[Run], pick) -> list[dict]:
    large = []
    for clients in sorted({r.clients for r in runs if r.workload == "large"}):
        ours = next(iter(pick("fedgrpc", "large", clients)), None)
        flower = next(iter(pick("flower", "large", clients)), None)
        large.append({"clients": clients,
                      "fedgrpc_seconds_per_round": ours.seconds_per_round if ours else None,
                      "flower_seconds_per_round": flower.seconds_per_round if flower else None,
                      "ratio": ours.seconds_per_round / flower.seconds_per_round if ours and flower else None,
                      "fedgrpc_peak_rss_mib": ours.peak_rss_mib if ours else None,
                      "flower_peak_rss_mib": flower.peak_rss_mib if flower else None,
                      "fedgrpc_start_rss_mib": ours.start_rss_mib if ours else None,
                      "flower_start_rss_mib": flower.start_rss_mib if flower else None,
                      "memory_ratio": ours.peak_rss_mib / flower.peak_rss_mib if ours and flower else None})
    return large


def markdown(result: dict) -> str:
    s = result["small"]
    verdict = {True: "met", False: "**NOT met**"}
    head = [f"Measured on {result['machine']}; Flower {result['flower_version']} (legacy gRPC runtime), "
             f"`{result['command']}`, {result['seconds']:.0f} s in all; load average (1, 5, 15 min) "
             f"{' / '.join(f'{x:.1f}' for x in result['load_average']['before'])} before, "
             f"{' / '.join(f'{x:.1f}' for x in result['load_average']['after'])} after (the machine is shared).", ""]
    lines = [] if s is None else [
             f"Small model (digits, MLP 64-128-10, 10 clients, E=1, B=32, {result['small_rounds']} rounds; seconds per "
             "round: median of the periods of rounds 2..R, mean of the runs):", "",
             "| | fedgrpc | Flower legacy gRPC | fedgrpc / Flower | target |", "|---|---|---|---|---|",
             f"| seconds per round | {s['fedgrpc_seconds_per_round']:.3f} "
             f"({', '.join(f'{x:.3f}' for x in s['fedgrpc_runs'])}) | {s['flower_seconds_per_round']:.3f} "
             f"({', '.join(f'{x:.3f}' for x in s['flower_runs'])}) | {s['ratio']:.2f}x | <= {TARGET_RATIO}x: "
             f"{verdict[s['time_target_met']]} |",
             f"| test accuracy after {result['small_rounds']} rounds | {s['fedgrpc_accuracy']:.2%} | "
             f"{s['flower_accuracy']:.2%} | {s['accuracy_points']:+.2f} points | within "
             f"{TARGET_ACCURACY_POINTS:g}: {verdict[s['accuracy_target_met']]} |", ""]
    if not result["large"]:
        return "\n".join(head + lines) + "\n"
    lines += [f"Large model ({result['large_model']}, {result['large_mb']:.1f} MB, no-op clients, "
             f"{result['large_rounds']} rounds, no evaluation):", "",
             "| clients | fedgrpc s/round | Flower s/round | ratio | fedgrpc server peak RSS | Flower server peak RSS "
             "| ratio |", "|---|---|---|---|---|---|---|"]
    def cell(value: float | None, form: str, unit: str = "") -> str:
        return "failed" if value is None else format(value, form) + unit

    for row in result["large"]:
        lines.append(f"| {row['clients']} | {cell(row['fedgrpc_seconds_per_round'], '.2f')} | "
                     f"{cell(row['flower_seconds_per_round'], '.2f')} | {cell(row['ratio'], '.2f', 'x')} | "
                     f"{cell(row['fedgrpc_peak_rss_mib'], '.0f', ' MiB')} | "
                     f"{cell(row['flower_peak_rss_mib'], '.0f', ' MiB')} | {cell(row['memory_ratio'], '.2f', 'x')} |")
    for failure in result["failures"]:
        lines += ["", f"Failed: {failure['framework']} {failure['workload']} N={failure['clients']}: "
                      f"{failure['error']}"]
    return "\n".join(head + lines) + "\n"


def flower_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import flwr; print(flwr.__version__)"], capture_output=True,
                          text=True, check=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that every path runs")
    parser.add_argument("--flower-python", type=Path, default=FLOWER_PYTHON,
                        help="the Python of the virtualenv with flwr (make bench-peers creates it)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="where peers.json and peers.md go")
    parser.add_argument("--only", choices=("small", "large"), help="run only this workload")
    parser.add_argument("--keep", type=Path, help="keep the runs' folders (logs, metrics) here")
    args = parser.parse_args(argv)
    if not args.flower_python.exists():
        print(f"bench.peers: no {args.flower_python}; `make bench-peers` creates the Flower virtualenv",
              file=sys.stderr)
        return 2
    started, load_before = time.perf_counter(), os.getloadavg()
    version = flower_version(args.flower_python)
    with tempfile.TemporaryDirectory(prefix="fl-peers-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        peers = Peers(work, args.flower_python, args.quick)
        peers.run((args.only,) if args.only else ("small", "large"))
    result = {"machine": machine(), "flower_version": version, "quick": args.quick,
              "command": " ".join(["python -m bench.peers", *(argv if argv is not None else sys.argv[1:])]),
              "seconds": round(time.perf_counter() - started, 1),
              "load_average": {"before": load_before, "after": os.getloadavg()}, "small_rounds": peers.small_rounds,
              "large_rounds": peers.large_rounds, "large_model": peers.large_name,
              "large_mb": peers.large_bytes / 1e6, **summary(peers.runs), "failures": peers.failures,
              "runs": [asdict(r) for r in peers.runs]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "peers.md").write_text(markdown(result))
    print("\n" + markdown(result), flush=True)
    print(f"bench.peers: written to {args.out}/peers.json and peers.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
