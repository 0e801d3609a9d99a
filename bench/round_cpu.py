"""Where a small round's time goes: the small-model workload of `bench/peers.py` (digits, SmallMLP, 10
fl-client processes, all selected each round) run for many rounds, with the CPU that the server and the
clients spent per round in steady state.

    python -m bench.round_cpu [--rounds 400] [--window 10]

After the first 50 rounds (start-up, imports, warm-up), the server's and the clients' CPU seconds (from
/proc) and the rounds closed are read `--window` seconds apart. Printed: the round period, and the server's
and all clients' CPU per round in that window.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.peers import ENV, SMALL_MODEL
from bench.timing import process_cpu
from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess, start_client


def closed(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(read_jsonl(path)) if path.exists() else 0


def measure(rounds: int, window: float, out: Path) -> tuple[float, float, float]:
    """(seconds per round, server CPU seconds per round, clients' CPU seconds per round)."""
    srv = ServerProcess(["--port", "0", "--out", str(out), "--round-timeout", "600", "--dataset", "digits",
                         "--model-name", SMALL_MODEL, "--rounds", str(rounds), "--num-clients", "10",
                         "--clients-per-round", "10", "--local-epochs", "1", "--batch-size", "32", "--lr", "0.05",
                         "--momentum", "0.9", "--seed", "0"], env=ENV)
    clients = [start_client(str(i), srv.address, ["--device", "cpu", "--quiet", "--allow-model", SMALL_MODEL], env=ENV)
               for i in range(10)]
    try:
        deadline = time.monotonic() + 600
        while closed(out) < 50:
            if time.monotonic() > deadline or any(c.poll() is not None for c in clients):
                raise RuntimeError("the federation did not reach round 50")
            time.sleep(0.2)
        pids = [c.pid for c in clients]
        r0, s0, c0 = closed(out), process_cpu(srv.proc.pid), sum(map(process_cpu, pids))
        time.sleep(window)
        r1, s1, c1 = closed(out), process_cpu(srv.proc.pid), sum(map(process_cpu, pids))
        if r1 == r0 or r1 >= rounds:
            raise RuntimeError("no rounds, or the last round, in the window: ask for more --rounds")
        n = r1 - r0
        return window / n, (s1 - s0) / n, (c1 - c0) / n
    finally:
        for c in clients:
            c.kill()
        srv.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--window", type=float, default=10.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="round-cpu") as tmp:
        period, server, clients = measure(args.rounds, args.window, Path(tmp))
    print(f"small model, 10 clients: a round every {period * 1e3:.1f} ms; CPU per round: server "
          f"{server * 1e3:.1f} ms, the 10 clients {clients * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
