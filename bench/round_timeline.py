"""A timeline of the small model's rounds across processes: where a round's time goes, and on whose side.

    python -m bench.round_timeline [--rounds 80] [--skip 30]

Runs the small-model workload of `bench/peers.py` (digits, SmallMLP, 10 fl-client processes, all
selected each round) with FL_TIMELINE set, so that fl-server and every fl-client mark the moments of each
round on the machine's shared monotonic clock (common/timeline.py):

    server: open (the round is sampled), train (a client's TRAIN answer is ready), update (an update's
            header is in), counted (it is taken), closed (aggregated: the new model is published)
    client: task (it holds the round's task: model received and decoded), submit (its training code
            handed back the result), send (the update is encoded, the call starts), answer (the answer is
            back, bringing the next round)

Printed: for the rounds after the first `--skip` (start-up and warm-up), the median time from a round's
opening to each phase, and one round of median length drawn as a timeline, process by process. A round
run twice (re-run after too few updates, under the same number) is left out.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.peers import ENV, SEED, SMALL_MODEL
from bench.round_cpu import closed
from common import timeline
from fl_tools.processes import ServerProcess, start_client

CLIENTS = 10


def run(rounds: int, work: Path) -> list[dict]:
    """The marks of a run of `rounds` rounds."""
    marks_dir, out = work / "marks", work / "out"
    env = {**ENV, timeline.ENV: str(marks_dir)}
    srv = ServerProcess(["--port", "0", "--out", str(out), "--round-timeout", "600", "--dataset", "digits",
                         "--model-name", SMALL_MODEL, "--rounds", str(rounds), "--num-clients", str(CLIENTS),
                         "--clients-per-round", str(CLIENTS), "--local-epochs", "1", "--batch-size", "32",
                         "--lr", "0.05", "--momentum", "0.9", "--seed", str(SEED)], env=env)
    clients = [start_client(str(i), srv.address, ["--device", "cpu", "--quiet", "--allow-model", SMALL_MODEL],
                            env=env) for i in range(CLIENTS)]
    try:
        deadline = time.monotonic() + 600
        while closed(out) < rounds:
            if time.monotonic() > deadline or any(c.poll() not in (None, 0) for c in clients):
                raise RuntimeError(f"the federation did not finish its {rounds} rounds")
            time.sleep(0.2)
    finally:
        for c in clients:
            c.kill()
        srv.stop()
    return timeline.read(marks_dir)


def by_round(marks: list[dict]) -> dict[int, dict[tuple[str, str], list[float]]]:
    """{round: {(who, event): [times]}}."""
    rounds: dict[int, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in marks:
        rounds[m["round"]][(m["who"], m["event"])].append(m["t"])
    return rounds


def events_of(r: dict[tuple[str, str], list[float]], event: str, side: str) -> list[float]:
    return sorted(t for (who, e), ts in r.items() if e == event and who.startswith(side) for t in ts)


PHASES = [  # (label, the time after the round's opening it is measured at)
    ("last TRAIN answer ready (server)", lambda r, o: max(events_of(r, "train", "server")) - o),
    ("last client holding its task", lambda r, o: max(events_of(r, "task", "client")) - o),
    ("first client done training", lambda r, o: min(events_of(r, "submit", "client")) - o),
    ("last client done training", lambda r, o: max(events_of(r, "submit", "client")) - o),
    ("last update's header in (server)", lambda r, o: max(events_of(r, "update", "server")) - o),
    ("last update taken (server)", lambda r, o: max(events_of(r, "counted", "server")) - o),
    ("round closed: new model published", lambda r, o: r[("server", "closed")][0] - o),
]


def complete(rounds: dict[int, dict[tuple[str, str], list[float]]], n: int) -> bool:
    """Round `n` ran once (a round re-run after too few updates keeps its number: its two runs' marks
    would mix), every phase was marked, and the round after it opened (its first opening ends this one)."""
    r, after = rounds.get(n, {}), rounds.get(n + 1, {})
    once = len(r.get(("server", "open"), ())) == 1 and len(r.get(("server", "closed"), ())) == 1
    marked = all(events_of(r, event, side) for event, side in
                 (("train", "server"), ("task", "client"), ("submit", "client"), ("send", "client"),
                  ("update", "server"), ("counted", "server")))
    return once and marked and bool(after.get(("server", "open")))


def analyse(marks: list[dict], skip: int) -> str:
    rounds = by_round(marks)
    numbers = sorted(n for n in list(rounds) if n > skip and complete(rounds, n))
    if not numbers:
        raise RuntimeError("no complete round after the skipped ones: ask for more --rounds")
    opened = {n: rounds[n][("server", "open")][0] for n in numbers}
    period = {n: rounds[n + 1][("server", "open")][0] - opened[n] for n in numbers}
    lines = [f"rounds {numbers[0]}-{numbers[-1]} ({len(numbers)}): median ms after a round opens"]
    for label, at in [*PHASES, ("next round opens", lambda r, o: 0.0)]:
        values = [period[n] if label == "next round opens" else at(rounds[n], opened[n]) for n in numbers]
        lines.append(f"  {label:<38} {statistics.median(values) * 1e3:7.1f}")
    training = [b - a for n in numbers for who in {w for w, _ in rounds[n] if w.startswith("client")}
                for a, b in zip(rounds[n][(who, "task")], rounds[n][(who, "submit")], strict=False)]
    encoding = [b - a for n in numbers for who in {w for w, _ in rounds[n] if w.startswith("client")}
                for a, b in zip(rounds[n][(who, "submit")], rounds[n][(who, "send")], strict=False)]
    lines.append(f"  a client's training (task to result): median {statistics.median(training) * 1e3:.1f} ms; "
                 f"its update's encoding (result to send): {statistics.median(encoding) * 1e3:.2f} ms")
    typical = sorted(numbers, key=lambda n: period[n])[len(numbers) // 2]
    lines += ["", f"round {typical} (period {period[typical] * 1e3:.1f} ms, the median), ms after it opened:"]
    lines += timeline_of(rounds[typical], opened[typical], rounds[typical + 1][("server", "open")][0])
    return "\n".join(lines)


def timeline_of(r: dict[tuple[str, str], list[float]], opened: float, next_open: float) -> list[str]:
    def span(ts: list[float]) -> str:
        if not ts:
            return "-"
        first, last = (ts[0] - opened) * 1e3, (ts[-1] - opened) * 1e3
        return f"{first:.1f}" if len(ts) == 1 else f"{first:.1f}-{last:.1f}"

    server = [f"  {'server':<9} open 0.0 | TRAIN answers {span(events_of(r, 'train', 'server'))} | updates in "
              f"{span(events_of(r, 'update', 'server'))} | taken {span(events_of(r, 'counted', 'server'))} | "
              f"closed {span(r[('server', 'closed')])} | next open {(next_open - opened) * 1e3:.1f}"]
    clients = sorted({who for who, _ in r if who.startswith("client")}, key=lambda w: int(w.split()[1]))
    for who in clients:
        server.append(f"  {who:<9} task {span(r[(who, 'task')])} | trained until {span(r[(who, 'submit')])} | "
                      f"sent {span(r[(who, 'send')])} | answered {span(r[(who, 'answer')])}")
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_timeline", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--skip", type=int, default=30, help="leave out the first rounds (start-up, warm-up)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="round-timeline") as tmp:
        marks = run(args.rounds, Path(tmp))
    print(analyse(marks, args.skip))
    return 0


if __name__ == "__main__":
    sys.exit(main())
