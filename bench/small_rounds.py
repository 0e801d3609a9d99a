"""Small model, many clients: the per-round time of a real fl-server and 10 fl-client processes.

    python -m bench.small_rounds [--rounds 40] [--clients 10] [--repeats 3] [--trees DIR,DIR...]

The built-in digits, bench.small_mlp:SmallMLP (64-128-10), all clients selected every round, E = 1,
B = 32, SGD lr 0.05 momentum 0.9. Per run: the median period between two rounds' closes (closed_at),
the median open-to-close time (`seconds`), and the CPU time per round of the server and of the clients
together, over the rounds after the first two. `--trees` runs the same federation from other source
trees (each a checkout of this repository), interleaved, so that their times are compared within one
run on a shared machine.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess, start_client

ROOT = Path(__file__).resolve().parent.parent
MODEL = "bench.small_mlp:SmallMLP"
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process so far; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def run(tree: Path, rounds: int, clients: int, out: Path, skip: int = 2) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)}
    srv = ServerProcess(["--port", "0", "--out", str(out), "--round-timeout", "600", "--dataset", "digits",
                         "--model-name", MODEL, "--rounds", str(rounds), "--clients-per-round", str(clients),
                         "--num-clients", str(clients), "--local-epochs", "1", "--batch-size", "32", "--lr", "0.05",
                         "--momentum", "0.9"], env=env)
    cpu: list[tuple[float, float]] = []  # (server, clients) CPU when round skip and round rounds - 1 closed

    try:
        procs = [start_client(str(i), srv.address, ["--device", "cpu", "--allow-model", MODEL, "--quiet"],
                              out / f"client{i}.log", env=env) for i in range(clients)]

        def sample() -> None:  # CPU used between two rounds' closes, read while every process still runs
            metrics = out / "metrics.jsonl"
            for target in (skip, rounds - 1):
                while srv.proc.poll() is None:
                    try:
                        lines = metrics.read_bytes().count(b"\n")
                    except OSError:
                        lines = 0
                    if lines >= target:
                        cpu.append((cpu_seconds(srv.proc.pid), sum(cpu_seconds(p.pid) for p in procs)))
                        break
                    time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        codes = [p.wait(600) for p in procs]
        sampler.join(5)
    finally:
        srv.stop()
    assert codes == [0] * clients, f"clients exited {codes}"
    records = read_jsonl(out / "metrics.jsonl")
    assert all(r.aggregated for r in records), "a round was re-run"
    measured = records[skip:]
    periods = [b.closed_at - a.closed_at for a, b in itertools.pairwise(measured)]
    result = {"period": statistics.median(periods), "seconds": statistics.median(r.seconds for r in measured)}
    if len(cpu) == 2:
        n = rounds - 1 - skip
        result["server_cpu"] = (cpu[1][0] - cpu[0][0]) / n
        result["clients_cpu"] = (cpu[1][1] - cpu[0][1]) / n
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--trees", default=str(ROOT), help="comma-separated source trees, run in turn")
    parser.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    results: dict[Path, list[dict[str, float]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        for i in range(args.repeats):
            for j, tree in enumerate(trees):
                r = run(tree, args.rounds, args.clients, base / f"run{i}-{j}")
                results[tree].append(r)
                print(f"{tree} run {i}: period {r['period'] * 1e3:.1f} ms, open to close {r['seconds'] * 1e3:.1f} ms, "
                      f"CPU per round: server {r.get('server_cpu', 0) * 1e3:.0f} ms, clients "
                      f"{r.get('clients_cpu', 0) * 1e3:.0f} ms", flush=True)
    first = statistics.median(r["period"] for r in results[trees[0]])
    for tree in trees:
        period = statistics.median(r["period"] for r in results[tree])
        seconds = statistics.median(r["seconds"] for r in results[tree])
        print(f"{tree}: median period {period * 1e3:.1f} ms ({period / first:.2f}x the first tree), open to close "
              f"{seconds * 1e3:.1f} ms, over {len(results[tree])} run(s) of {args.rounds} rounds")


if __name__ == "__main__":
    main()
