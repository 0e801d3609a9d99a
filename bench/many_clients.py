"""Ten thousand connected clients on one server, a thousand a round (`make bench`'s figure 11).

    python -m bench.many_clients [--clients 10000] [--per-round 1000] [--rounds 3]

One fl-server process (the built-in MLP on digits, a tiny model) waits until every client is there
(min_clients = all of them), then runs the rounds. The clients are simulated in this process
(bench/loadgen.py: the real protocol, each client on a connection of its own, no training). While they
run, the server's resident memory and threads are sampled every 0.05 s. Reported:

- memory per connected client: the server's resident set with every client long-polling, just before the
  first round opens, less its resident set before any client came, divided by the number of clients;
- round time: the server's open-to-close seconds of each round (median, and the longest);
- round start: from the round's opening to a selected client holding its TRAIN answer, 99th percentile
  over the selected clients of every round.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import loadgen
from bench.timing import process_status
from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess


@dataclass
class ManyClients:
    clients: int
    per_round: int
    rounds: int  # aggregated within the time budget
    rounds_run: int  # rounds closed, aggregated or not (one without min_fit updates is re-run)
    rss_before: int  # the server's resident set before any client came, bytes
    rss_connected: int  # ... with every client long-polling, just before the first round
    rss_peak: int  # ... highest sample of the run
    threads_connected: int  # the server's threads just before the first round
    round_seconds: list[float]  # each round's open-to-close seconds
    start_p99: float  # seconds from a round's opening to a selected client's TRAIN, 99th percentile
    start_median: float
    connect_seconds: float  # from the first client's start to the first round's opening
    errors: int  # errors the simulated clients saw
    error_kinds: dict[str, int]  # the most frequent errors, client id left out, with their counts

    @property
    def bytes_per_client(self) -> float:
        return (self.rss_connected - self.rss_before) / self.clients

    def summary(self) -> str:
        if not self.round_seconds:
            return (f"{self.clients} clients, {self.per_round} a round: no round closed within the time budget "
                    f"({self.threads_connected} server threads, {self.errors} client errors)")
        return (f"{self.clients} clients, {self.per_round} a round, {self.rounds} rounds aggregated of "
                f"{self.rounds_run} run: "
                f"{self.bytes_per_client / 1024:.0f} KiB of server memory per connected client "
                f"({self.rss_before / 2**20:.0f} MB before, {self.rss_connected / 2**20:.0f} MB with all polling, "
                f"peak {self.rss_peak / 2**20:.0f} MB; {self.threads_connected} threads); round open-to-close "
                f"median {statistics.median(self.round_seconds):.2f} s (longest {max(self.round_seconds):.2f} s); "
                f"round start p99 {self.start_p99 * 1e3:.0f} ms (median {self.start_median * 1e3:.0f} ms); all "
                f"{self.clients} there {self.connect_seconds:.1f} s after the first started; {self.errors} errors"
                + (f" ({'; '.join(f'{n}x {kind}' for kind, n in self.error_kinds.items())})" if self.errors else ""))


class Sampler(threading.Thread):
    """The server's (time.time(), resident bytes, threads) every `period` seconds, until stopped."""

    def __init__(self, pid: int, period: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                status = process_status(self.pid)
                self.samples.append((time.time(), status.rss, status.threads))
            except (FileNotFoundError, ProcessLookupError):
                return
            self.done.wait(self.period)

    def before(self, when: float) -> tuple[float, int, int]:
        earlier = [s for s in self.samples if s[0] < when]
        return earlier[-1] if earlier else self.samples[0]


def _more_open_files(needed: int) -> None:
    """Each simulated client has a connection of its own: raise this process's open-file limit to fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def _within(seconds: float, clients: int, address: str, stats: loadgen.LoadStats) -> None:
    with contextlib.suppress(asyncio.TimeoutError):  # what happened until then is the result
        await asyncio.wait_for(loadgen.run_clients(address, clients, prefix="c", own_connections=True, stats=stats),
                               seconds)


def measure(clients: int, per_round: int, rounds: int, workdir: Path, env: dict[str, str] | None = None,
            budget: float = 600.0, settle: float = 1.0) -> ManyClients:
    """The run, stopped after `budget` seconds if the rounds have not all been aggregated by then. The server's
    memory before the clients come is sampled after it has run `settle` seconds, and half that again."""
    _more_open_files(clients + 1024)
    out = workdir / f"many-{clients}"
    # In open mode the registry keeps at most max_clients (1,000 by default), and each long-poll holds one
    # of max_rpcs calls (8,192 by default): both are raised to fit, as an operator of such a federation would.
    srv = ServerProcess(["--port", "0", "--out", str(out), "--model-name", "mlp", "--rounds", str(rounds),
                         "--num-clients", str(clients), "--clients-per-round", str(per_round),
                         "--min-clients", str(clients), "--max-clients", str(2 * clients),
                         "--max-rpcs", str(max(8192, 2 * clients)), "--round-timeout", "600",
                         "--log-level", "WARNING"], env=env)
    sampler = Sampler(srv.proc.pid)
    try:
        time.sleep(settle)  # the server's own start-up memory settles
        sampler.start()
        time.sleep(settle / 2)
        while not sampler.samples and sampler.is_alive():
            time.sleep(0.01)
        rss_before = sampler.samples[-1][1]
        started = time.time()
        stats = loadgen.LoadStats()
        asyncio.run(_within(budget, clients, srv.address, stats))
    finally:
        sampler.done.set()
        srv.stop()
    sampler.join()
    run = read_jsonl(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    records = [r for r in run if r.aggregated]
    first_open = run[0].opened_at if run else time.time()
    _, rss_connected, threads_connected = sampler.before(first_open)
    starts = [t - r.opened_at for r in run for t in stats.train_received.get(r.round, [])] or [float("nan")]
    return ManyClients(clients=clients, per_round=per_round, rounds=len(records), rounds_run=len(run),
                       rss_before=rss_before,
                       rss_connected=rss_connected, rss_peak=max(s[1] for s in sampler.samples),
                       threads_connected=threads_connected, round_seconds=[r.seconds for r in records],
                       start_p99=float(np.percentile(starts, 99)), start_median=float(np.median(starts)),
                       connect_seconds=first_open - started, errors=len(stats.errors),
                       error_kinds=dict(Counter(e.split(": ", 1)[-1][:100] for e in stats.errors).most_common(3)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.many_clients", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--per-round", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="many-clients") as tmp:
        result = measure(args.clients, args.per_round, args.rounds, Path(tmp))
    print(result.summary())
    print(json.dumps(asdict(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
