"""Hostile load against a live fl-server on loopback: what each attack costs the server and its honest clients.

    python -m bench.hostile [--phase-seconds 15] [--count 2000] [--out bench/hostile.md]

For each attack a fresh fl-server (default settings but for the listed flags) is started with a small
honest federation (simulated clients from bench/loadgen.py, in another process), then three phases of
`--phase-seconds`: undisturbed, under attack, after the attack. Measured: the status codes the attacker
gets, the server's threads and RSS before, at the attack's peak and after, and the honest rounds' times
(the server's own open-to-close seconds from metrics.jsonl, the median of the rounds that closed in each
phase). Every attack is bounded in count and time and goes to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc

from bench import loadgen
from bench.timing import process_status
from common import convert
from common import messages as m
from common.proto import federation_pb2 as pb
from fl_tools.processes import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
LEGIT = 3  # honest simulated clients, all selected each round


def proc_stats(pid: int) -> tuple[int, float]:
    """(threads, RSS in MB) of a process."""
    status = process_status(pid)
    return status.threads, status.rss / 2**20


def _channel(address: str, i: int) -> grpc.aio.Channel:
    # A channel id of its own, so that channels do not share one connection.
    return grpc.aio.insecure_channel(address, options=[("grpc.channel_id", i), ("grpc.use_local_subchannel_pool", 1)])


def code_of(e: BaseException) -> str:
    return e.code().name if isinstance(e, grpc.aio.AioRpcError) else type(e).__name__


async def idle_streams(address: str, count: int, seconds: float, codes: Counter) -> None:
    """`count` SubmitUpdate streams that never send a header, each reopened as soon as the server ends it."""
    channels = [_channel(address, i) for i in range(max(1, count // 100))]
    stop = time.monotonic() + seconds

    async def never():
        await asyncio.sleep(seconds + 60)
        yield b""  # never reached

    async def one(i: int) -> None:
        submit = channels[i % len(channels)].stream_unary(convert.SUBMIT_UPDATE, request_serializer=convert.raw,
                                                          response_deserializer=pb.SubmitReply.FromString)
        while time.monotonic() < stop:
            try:
                await asyncio.wait_for(submit(never()), timeout=max(0.1, stop - time.monotonic()))
                codes["OK"] += 1
            except (grpc.aio.AioRpcError, asyncio.TimeoutError) as e:
                if not isinstance(e, asyncio.TimeoutError) and time.monotonic() < stop:  # not our own cancel
                    codes[code_of(e)] += 1
                    if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.5)

    await asyncio.gather(*(one(i) for i in range(count)))
    await asyncio.gather(*(c.close() for c in channels))


async def fake_ids(address: str, count: int, seconds: float, codes: Counter, persistent: bool = True) -> None:
    """`count` made-up client ids. `persistent`: each long-polls JoinRound as fl-client does, and one that
    is selected (TRAIN) goes quiet, as a client that never trains (a Sybil attack: in open mode these are
    clients like any other). Otherwise each id makes one JoinRound call, whatever the answer, and leaves."""
    channels = [_channel(address, 10_000 + i) for i in range(max(1, count // 100))]
    stop = time.monotonic() + seconds

    async def one(i: int) -> None:
        join = channels[i % len(channels)].unary_unary(convert.JOIN_ROUND,
                                                       request_serializer=pb.JoinRequest.SerializeToString,
                                                       response_deserializer=pb.JoinReply.FromString)
        request = convert.join_request_to_proto(m.JoinRequest(client_id=f"fake{i}", num_samples=100))
        while time.monotonic() < stop:
            try:
                reply = convert.join_decision_from_proto(await join(request, timeout=30 if persistent else 1))
                codes[f"OK {reply.action.name}"] += 1
                if reply.action is not m.Action.WAIT or not persistent:
                    return
            except grpc.aio.AioRpcError as e:
                codes[code_of(e)] += 1
                if not persistent:
                    return  # one attempt per id, whatever the answer
                await asyncio.sleep(1.0)

    await asyncio.gather(*(one(i) for i in range(count)))
    await asyncio.gather(*(c.close() for c in channels))


class Mallory(loadgen.SimulatedClient):
    """A client that joins as "mallory" and, each time it is selected, has a well-formed update ready: the
    hostile part is what the attack then does with it."""

    def __init__(self, address: str, channel_id: int):
        super().__init__("mallory", address, loadgen.LoadStats(),
                         options=[("grpc.channel_id", channel_id), ("grpc.use_local_subchannel_pool", 1)])
        self.request = convert.join_request_to_proto(m.JoinRequest(client_id="mallory", num_samples=100))

    async def selected_update(self, metrics: dict[str, float] | None = None) -> list[bytes] | None:
        """Join once; when selected, the messages of an update for the round (header first), else None."""
        decision = convert.join_decision_from_proto(await self.join(self.request, timeout=30))
        return await self.prepare_update(decision, metrics) if decision.action is m.Action.TRAIN else None


async def stalled_uploads(address: str, seconds: float, codes: Counter) -> None:
    """A client ("mallory") that, each time it is selected, sends a valid header, is admitted, and then
    sends no data."""
    mallory = Mallory(address, 20_000)
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            messages = await mallory.selected_update()
            if messages is None:
                continue

            async def header_then_nothing(first: bytes = messages[0]):
                yield first
                await asyncio.sleep(3600)

            await mallory.submit(header_then_nothing(), timeout=120)  # the server's progress deadline ends it first
            codes["OK"] += 1
        except grpc.aio.AioRpcError as e:
            codes[code_of(e)] += 1
    await mallory.channel.close()


async def bad_metrics(address: str, seconds: float, codes: Counter) -> None:
    """A client ("mallory") that, each time it is selected, sends a valid model update whose metrics are
    hostile, in turn: eval_samples without eval_loss, an infinite eval_samples, and 5 MB of metric names."""
    mallory = Mallory(address, 30_000)
    variants = [{"eval_samples": 10.0}, {"eval_samples": float("inf"), "eval_loss": 1.0},
                {f"name{i:06d}" + "x" * 90: 1.0 for i in range(50_000)}]
    stop, attempt = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        try:
            messages = await mallory.selected_update(variants[attempt % len(variants)])
            if messages is None:
                continue
            attempt += 1

            async def send(messages: list[bytes] = messages):
                for message in messages:
                    yield message

            await mallory.submit(send(), timeout=60)
            codes["OK (accepted)"] += 1
        except grpc.aio.AioRpcError as e:
            codes[code_of(e)] += 1
            await asyncio.sleep(0.5)
    await mallory.channel.close()


def half_sent_http(port: int, count: int, seconds: float, codes: Counter) -> None:
    """`count` connections to /metrics that send half a request and wait; meanwhile, an honest scrape
    every second (its latency kept as `scrape_ms`)."""
    stop = time.monotonic() + seconds
    held: list[tuple[socket.socket, float]] = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.05)
        held.append((s, time.monotonic()))
    latencies = []
    while time.monotonic() < stop:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
                codes[f"honest scrape HTTP {reply.status}"] += 1
            latencies.append((time.monotonic() - started) * 1000)
        except OSError as e:
            codes[f"honest scrape failed ({type(e).__name__})"] += 1
        for s, opened in list(held):
            try:
                if s.recv(1) == b"":
                    codes[f"half-sent closed by the server after ~{time.monotonic() - opened:.0f} s"] += 1
                    held.remove((s, opened))
                    s.close()
            except (TimeoutError, OSError):
                pass
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    for s, _ in held:
        codes["half-sent still open at the end"] += 1
        s.close()
    if latencies:
        codes[f"honest scrape median {statistics.median(latencies):.1f} ms"] += 0


def newline_device(address: str, codes: Counter) -> None:
    """A JoinRound whose device string holds a newline and a forged status line."""
    with grpc.insecure_channel(address) as channel:
        join = channel.unary_unary(convert.JOIN_ROUND, request_serializer=pb.JoinRequest.SerializeToString,
                                   response_deserializer=pb.JoinReply.FromString)
        request = convert.join_request_to_proto(m.JoinRequest(client_id="nl", num_samples=1, training_round=1,
                                                              device="cpu\nforged  submitted 1 samples"))
        try:
            join(request, timeout=10)
            codes["OK (accepted)"] += 1
        except grpc.RpcError as e:
            codes[e.code().name] += 1


def run_attack(name: str, address: str, metrics_port: int, count: int, seconds: float, codes: Counter) -> None:
    """One attack, in this process (`python -m bench.hostile --attack ...` runs it in a process of its own:
    grpc.aio serves one event loop per process)."""
    if name == "idle":
        asyncio.run(idle_streams(address, count, seconds, codes))
    elif name == "fakes":
        asyncio.run(fake_ids(address, count, seconds, codes))
    elif name == "joins":
        asyncio.run(fake_ids(address, count, seconds, codes, persistent=False))
    elif name == "both":
        async def together() -> None:
            await asyncio.gather(idle_streams(address, count, seconds, codes),
                                 fake_ids(address, count, seconds, codes, persistent=False))
        asyncio.run(together())
    elif name == "metrics":
        asyncio.run(bad_metrics(address, seconds, codes))
    elif name == "stall":
        # Long enough for two stalls of the default upload_progress_timeout (30 s).
        asyncio.run(stalled_uploads(address, max(seconds, 70.0), codes))
    elif name == "http":
        half_sent_http(metrics_port, 50, seconds, codes)
    elif name == "newline":
        newline_device(address, codes)
    else:
        raise ValueError(name)


def measure(name: str, attack: str, count: int, phase: float, server_args: list[str], workdir: Path) -> dict:
    out = workdir / name.replace(" ", "_")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    server = ServerProcess(["--port", "0", "--metrics-port", "0", "--out", str(out), "--rounds", "100000",
                            "--model-name", "mlp", "--num-clients", str(LEGIT), "--clients-per-round", str(LEGIT),
                            "--log-level", "WARNING", *server_args], env=env)
    legit = subprocess.Popen([sys.executable, "-m", "bench.hostile", "--honest", server.address], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    codes: Counter = Counter()
    try:
        time.sleep(3)  # first rounds, warm-up
        t0 = time.time()
        time.sleep(phase)
        before = proc_stats(server.proc.pid)
        t1 = time.time()
        # The attacker runs at a lower priority (nice 10), standing in for another machine: on loopback its
        # own CPU (thousands of calls made in one Python process) would otherwise come out of the 2 cores
        # the server and the honest clients share, and measure the attacker's cost, not the server's.
        attacker = subprocess.Popen([sys.executable, "-m", "bench.hostile", "--attack", attack, server.address,
                                     str(server.metrics_port), str(count), str(phase)], env=env, cwd=ROOT,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                    preexec_fn=lambda: os.nice(10))
        peak_threads, peak_rss = before
        while attacker.poll() is None and time.time() < t1 + phase + 120:
            threads, rss = proc_stats(server.proc.pid)
            peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)
            time.sleep(0.5)
        if attacker.poll() is None:
            attacker.kill()
        lines = attacker.communicate()[0].strip().splitlines()
        codes.update(json.loads(lines[-1]) if lines else {"attacker failed": 1})
        t2 = time.time()
        time.sleep(phase)
        after = proc_stats(server.proc.pid)
        t3 = time.time()
        alive = server.proc.poll() is None
    finally:
        legit.kill()
        legit_out = legit.communicate()[0]
        server.stop()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []

    def phase_median(a: float, b: float) -> float | None:
        done = [r["seconds"] for r in records if a <= r["closed_at"] < b and r["aggregated"]]
        return statistics.median(done) if done else None

    base = phase_median(t0, t1)

    def phase_rounds(a: float, b: float) -> str:
        rounds = [r for r in records if a <= r["closed_at"] < b]
        median = phase_median(a, b)
        if median is None:
            return f"none closed ({len(rounds)} re-run)" if rounds else "none closed"
        done = sum(r["aggregated"] for r in rounds)
        rerun = len(rounds) - done
        longest = max(r["seconds"] for r in rounds)
        ratio = f"**{median / base:.1f}x**; " if base and a > t0 else ""
        return (f"{median * 1e3:.0f} ms ({ratio}{done} rounds{f', {rerun} re-run' if rerun else ''}; "
                f"longest {longest:.1f} s)")

    return {"attack": name, "codes": dict(codes), "alive": alive,
            "threads": (before[0], peak_threads, after[0]), "rss": (before[1], peak_rss, after[1]),
            "undisturbed": phase_rounds(t0, t1), "during": phase_rounds(t1, t2), "after": phase_rounds(t2, t3),
            "legit_errors": legit_out.strip()[-600:]}


def attacks(count: int) -> dict[str, tuple[list[str], str]]:
    return {
        f"{count} idle update streams": ([], "idle"),
        f"{count} fake client ids, each joining once": ([], "joins"),
        f"{count} fake client ids long-polling (Sybil)": ([], "fakes"),
        f"{count} idle streams + {count} fake ids joining once": ([], "both"),
        # A selected client whose updates are all refused keeps its round open: it is not silent. The
        # round closes at its deadline and, short of min_fit, is re-run: both set low enough to see it.
        "updates with hostile metrics (round_timeout 10, min_fit 2)": (["--round-timeout", "10", "--min-fit", "2"],
                                                                       "metrics"),
        # One receive buffer, as the automatic max_uploads gives models of 32 MB and more.
        "stalled upload (max_uploads 1)": (["--max-uploads", "1"], "stall"),
        "50 half-sent HTTP requests to /metrics": ([], "http"),
        "newline in the device string": ([], "newline"),
    }


def table(results: list[dict], command: str) -> str:
    lines = [f"Measured with `{command}`; honest federation: {LEGIT} simulated clients (bench/loadgen.py), "
             "all selected each round, MLP on digits; round time = the server's open-to-close time, median "
             "of the rounds that closed in each phase, and in bold its ratio to the undisturbed phase's; the "
             "attacker at nice 10.", "",
             "| attack | attacker gets | server threads before / peak / after | server RSS MB before / peak / after "
             "| honest round: undisturbed | during | after |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        codes = ", ".join(f"{k}: {v}" if v else k for k, v in sorted(r["codes"].items())) or "-"
        if not r["alive"]:
            codes += " **(server died)**"
        threads = " / ".join(str(t) for t in r["threads"])
        rss = " / ".join(f"{x:.0f}" for x in r["rss"])
        lines.append(f"| {r['attack']} | {codes} | {threads} | {rss} | {r['undisturbed']} | {r['during']} "
                     f"| {r['after']} |")
    return "\n".join(lines) + "\n"


async def honest(address: str) -> None:
    """The honest federation: LEGIT simulated clients, which try again after the errors fl-client tries
    again after; each error is printed as it happens."""
    stats = loadgen.LoadStats()
    clients = [loadgen.SimulatedClient(f"legit{i}", address, stats) for i in range(LEGIT)]
    tasks = [asyncio.ensure_future(c.run(retry=True)) for c in clients]  # as fl-client, it tries again
    printed = 0
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.5)
        for error in stats.errors[printed:]:
            print(f"{time.time():.1f} {error}", flush=True)
        printed = len(stats.errors)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--honest"]:
        asyncio.run(honest(argv[1]))
        return 0
    if argv[:1] == ["--attack"]:
        codes: Counter = Counter()
        run_attack(argv[1], argv[2], int(argv[3]), int(argv[4]), float(argv[5]), codes)
        print(json.dumps(codes))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="idle streams and fake ids (at most 5000)")
    parser.add_argument("--phase-seconds", type=float, default=15.0, help="length of each phase (at most 120)")
    parser.add_argument("--only", nargs="*", help="run only the attacks whose name contains one of these words")
    parser.add_argument("--out", default=str(ROOT / "bench" / "hostile.md"), help="markdown table written here")
    args = parser.parse_args(argv)
    count, phase = min(args.count, 5000), min(args.phase_seconds, 120.0)
    results = []
    with tempfile.TemporaryDirectory(prefix="hostile") as tmp:
        for name, (server_args, attack) in attacks(count).items():
            if args.only and not any(word in name for word in args.only):
                continue
            print(f"{name}...", flush=True)
            results.append(measure(name, attack, count, phase, server_args, Path(tmp)))
            print(json.dumps(results[-1]), flush=True)
    command = " ".join(["python -m bench.hostile", *argv])
    text = table(results, command)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
