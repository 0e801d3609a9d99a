"""Where a small round's time goes: the small-model workload of `bench/peers.py` (digits, SmallMLP, 10
client processes, all selected each round) run for many rounds, with the CPU that the server and the
clients spent per round in steady state.

    python -m bench.round_cpu [--rounds 400] [--window 10] [--flower]

After the first 50 rounds (start-up, imports, warm-up), the server's and the clients' CPU seconds (from
/proc) and the rounds closed are read `--window` seconds apart. Printed: the round period, and the server's
and all clients' CPU per round in that window. `--flower` measures Flower's legacy gRPC runtime on the
same workload instead (bench/peers_flower.py, in the virtualenv `make bench-peers` makes), counting its
rounds by the server's "fit progress" log lines.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.peers import ENV, FLOWER_PYTHON, ROOT, SEED, SMALL_MODEL, Peers, free_port, wait_listening
from bench.timing import process_cpu
from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess, start_client

WARM_UP_ROUNDS = 50


def closed(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(read_jsonl(path)) if path.exists() else 0


def sample(rounds_closed: Callable[[], int], server: int, clients: list[subprocess.Popen], rounds: int,
           window: float, warm_up: int = WARM_UP_ROUNDS) -> tuple[float, float, float]:
    """(seconds per round, server CPU seconds per round, clients' CPU seconds per round) over `window`
    seconds once `warm_up` rounds have closed."""
    deadline = time.monotonic() + 600
    while rounds_closed() < warm_up:
        if time.monotonic() > deadline or any(c.poll() is not None for c in clients):
            raise RuntimeError(f"the federation did not reach round {warm_up}")
        time.sleep(0.2)
    pids = [c.pid for c in clients]
    r0, s0, c0 = rounds_closed(), process_cpu(server), sum(map(process_cpu, pids))
    time.sleep(window)
    r1, s1, c1 = rounds_closed(), process_cpu(server), sum(map(process_cpu, pids))
    if r1 == r0 or r1 >= rounds:
        raise RuntimeError("no rounds, or the last round, in the window: ask for more --rounds")
    n = r1 - r0
    return window / n, (s1 - s0) / n, (c1 - c0) / n


def measure(rounds: int, window: float, out: Path, clients: int = 10,
            warm_up: int = WARM_UP_ROUNDS) -> tuple[float, float, float]:
    """fedgrpc's figures (see `sample`), with `clients` fl-client processes (10 in the workload)."""
    srv = ServerProcess(["--port", "0", "--out", str(out), "--round-timeout", "600", "--dataset", "digits",
                         "--model-name", SMALL_MODEL, "--rounds", str(rounds), "--num-clients", str(clients),
                         "--clients-per-round", str(clients), "--local-epochs", "1", "--batch-size", "32",
                         "--lr", "0.05", "--momentum", "0.9", "--seed", str(SEED)], env=ENV)
    procs = [start_client(str(i), srv.address, ["--device", "cpu", "--quiet", "--allow-model", SMALL_MODEL], env=ENV)
             for i in range(clients)]
    try:
        return sample(lambda: closed(out), srv.proc.pid, procs, rounds, window, warm_up)
    finally:
        for c in procs:
            c.kill()
        srv.stop()


def measure_flower(rounds: int, window: float, out: Path, flower_python: Path) -> tuple[float, float, float]:
    files = Peers(out, flower_python, quick=True).files  # shards, test split and initial weights, as bench.peers
    port, log_path = free_port(), out / "flower-server.log"
    module = [str(flower_python), "-m", "bench.peers_flower"]
    with open(log_path, "w") as log:
        srv = subprocess.Popen([*module, "server", "--port", str(port), "--clients", "10", "--rounds", str(rounds),
                                "--out", str(out / "result.json"), "--weights", str(files / "small_init.pt"),
                                "--test", str(files / "test.npz")], stdout=log, stderr=subprocess.STDOUT, env=ENV,
                               cwd=ROOT)
    clients: list[subprocess.Popen] = []
    try:
        wait_listening(port, srv)
        clients = [subprocess.Popen([*module, "client", "--server", f"127.0.0.1:{port}", "--shard",
                                     str(files / f"shard{i}.npz"), "--index", str(i), "--seed", str(SEED), "--epochs",
                                     "1", "--batch-size", "32", "--lr", "0.05", "--momentum", "0.9"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT)
                   for i in range(10)]
        return sample(lambda: log_path.read_text().count("fit progress"), srv.pid, clients, rounds, window)
    finally:
        for p in [srv, *clients]:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--flower", action="store_true", help="Flower's legacy gRPC runtime instead of fedgrpc")
    parser.add_argument("--flower-python", type=Path, default=FLOWER_PYTHON)
    args = parser.parse_args(argv)
    if args.flower and not args.flower_python.exists():
        parser.error(f"{args.flower_python} does not exist: `make bench-peers` makes Flower's virtualenv")
    with tempfile.TemporaryDirectory(prefix="round-cpu") as tmp:
        if args.flower:
            period, server, clients = measure_flower(args.rounds, args.window, Path(tmp), args.flower_python)
        else:
            period, server, clients = measure(args.rounds, args.window, Path(tmp))
    print(f"small model, 10 clients, {'Flower' if args.flower else 'fedgrpc'}: a round every {period * 1e3:.1f} ms; "
          f"CPU per round: server {server * 1e3:.1f} ms, the 10 clients {clients * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
