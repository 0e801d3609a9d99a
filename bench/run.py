"""`make bench`: the performance benchmark. Every figure is a ratio measured within this one run on
this machine (absolute times here are noisy), printed with its target and whether it is met, and
written to bench/results.json and bench/results.md.

    python -m bench.run [--quick] [--out bench]

--quick runs every benchmark on tiny sizes (a smoke test that the code paths work; `make test` runs
it); its figures mean nothing.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import bare_grpc, loadgen, ray_sim, secure
from bench import many_clients as bench_many_clients
from bench.timing import median_seconds, own_cpu, process_cpu, process_status
from common import allocator, convert, tensors
from common import messages as m
from common.datasets import BatchLoader, load_digits, load_mnist, model_spec_for
from common.models import build_model
from common.proto import federation_pb2 as pb
from common.training import train
from fl_client.connection import ServerConnection
from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess, start_client

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
# One thread per process: the server, the load generator and clients share 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@dataclass
class Figure:
    number: int
    name: str
    value: float
    unit: str
    target: str
    met: bool | None  # None: reported, no target
    details: str = ""


def median_of(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def raw_tcp_seconds(data: bytes, buffer: bytearray) -> float:
    """Seconds to move `data` over loopback TCP, sender to receiver, into `buffer`."""
    nbytes = len(data)
    listener = socket.create_server(("127.0.0.1", 0))

    def receive() -> None:
        conn, _ = listener.accept()
        view, got = memoryview(buffer), 0
        while got < nbytes:
            got += conn.recv_into(view[got:])
        conn.sendall(b"k")
        conn.close()

    thread = threading.Thread(target=receive)
    thread.start()
    sock = socket.create_connection(listener.getsockname())
    start = time.perf_counter()
    sock.sendall(data)
    sock.recv(1)
    elapsed = time.perf_counter() - start
    sock.close()
    thread.join()
    listener.close()
    return elapsed


def raw_tcp_median(data: bytes, repeats: int) -> float:
    """Median seconds for raw TCP to move a model's own bytes, after a warm-up. The receive buffer is
    reused, as fl-server and fl-client reuse theirs. `bytes(n)` would be the wrong data: untouched
    zero pages that fault in as they are sent (that made raw TCP 24 ms instead of 17 for 45 MB)."""
    buffer = bytearray(len(data))
    raw_tcp_seconds(data, buffer)
    return median_of(lambda: raw_tcp_seconds(data, buffer), repeats)


def next_update(conn: ServerConnection, payload: tensors.Payload) -> m.UpdateHeader:
    """Join (client "0"), so that a round is open for it, and the header of an upload of `payload` to it."""
    decision = conn.join(m.JoinRequest(client_id="0", num_samples=10))
    return m.UpdateHeader(client_id="0", round=decision.round, model_version=decision.model_version, num_samples=10,
                          payload=convert.payload_header_of(payload, m.Encoding.DIFF, tensors.CHUNK_SIZE))


def server(out: Path, *args: str) -> ServerProcess:
    return ServerProcess(["--port", "0", "--out", str(out), "--round-timeout", "600", *args], env=ENV)


@dataclass
class LoadRun:
    """A server's rounds with simulated clients (bench/loadgen.py), and what it used meanwhile."""
    stats: loadgen.LoadStats
    records: list[Any]  # its metrics.jsonl
    idle_rss: int  # the server's resident bytes before the clients came
    peak_rss: int  # ... its peak while they ran
    server_cpu: float  # CPU seconds the server used while they ran
    own_cpu: float  # ... and the load generator (this process)


def rss(pid: int) -> tuple[int, int]:
    """(current, peak) resident set size of a process, in bytes (bench/peers.py's reading)."""
    status = process_status(pid)
    return status.rss, status.peak_rss


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class Bench:
    def __init__(self, quick: bool, workdir: Path):
        self.quick = quick
        self.workdir = workdir
        self.figures: list[Figure] = []
        # ResNet-18-sized state (11.2 M float32 parameters, 44.7 MB): the CIFAR ResNet-18 with one input
        # channel, on the built-in digits. --quick uses the MLP (0.2 MB).
        self.big_model = "mlp" if quick else "resnet18"
        self.repeats = 2 if quick else 5
        self.load_runs: dict[tuple[str, int, int], LoadRun] = {}

    def add(self, *args: Any, **kwargs: Any) -> None:
        figure = Figure(*args, **kwargs)
        self.figures.append(figure)
        verdict = {True: "met", False: "NOT met", None: "-"}[figure.met]
        print(f"[{figure.number}] {figure.name}: {figure.value:.3g} {figure.unit} (target {figure.target}: "
              f"{verdict}) {figure.details}", flush=True)

    def run_dir(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def load_run(self, model: str, clients: int, rounds: int) -> LoadRun:
        """`rounds` rounds of a server of `model` with `clients` simulated clients, all of them in every
        round. Figures 3 to 6 ask for theirs here: in --quick they ask for the same tiny run, which runs once."""
        key = (model, clients, rounds)
        if key not in self.load_runs:
            out = self.run_dir(f"load-{model}-{clients}x{rounds}")
            srv = server(out, "--model-name", model, "--rounds", str(rounds), "--clients-per-round", str(clients),
                         "--num-clients", str(clients))
            try:
                time.sleep(0.2 if self.quick else 1.0)  # the server's own start-up memory settles
                idle = process_status(srv.proc.pid).rss
                reset_peak_rss(srv.proc.pid)
                server_cpu, own = process_cpu(srv.proc.pid), own_cpu()
                stats = loadgen.run(srv.address, clients)
                peak = process_status(srv.proc.pid).peak_rss
                server_cpu, own = process_cpu(srv.proc.pid) - server_cpu, own_cpu() - own
            finally:
                srv.stop()
            assert not stats.errors, stats.errors[:3]
            self.load_runs[key] = LoadRun(stats, read_jsonl(out / "metrics.jsonl"), idle, peak, server_cpu, own)
        return self.load_runs[key]

    # 1 -------------------------------------------------------------------------------------------------
    def transfer(self) -> None:
        srv = server(self.run_dir("transfer"), "--model-name", self.big_model, "--rounds", "1000",
                     "--clients-per-round", "1", "--num-clients", "1")
        try:
            with ServerConnection(srv.address) as conn:
                decision = conn.join(m.JoinRequest(client_id="0", num_samples=10))
                request = m.ModelRequest(client_id="0", model_version=decision.model_version)
                header, state = conn.fetch_model(request)
                nbytes = header.payload.total_bytes
                # Each transfer follows a pause, as in a round: after an idle spell, Linux restarts TCP's
                # slow start, which a back-to-back loop would not pay.
                idle = 0.1 if self.quick else 2.0
                down = median_seconds(lambda: conn.fetch_model(request), self.repeats, idle)
                payload = loadgen.tiny_change(header.payload.specs)
                updates: list[m.UpdateHeader] = []  # one per upload, for the round opened before it

                def submit() -> None:
                    reply = conn.submit(updates[-1], payload)
                    assert reply.accepted and not reply.duplicate, reply

                # The server evaluates the last round during each pause.
                up = median_seconds(submit, self.repeats, idle, warmups=1,
                                    before=lambda: updates.append(next_update(conn, payload)))
        finally:
            srv.stop()
        raw = raw_tcp_median(tensors.encode(state).data, self.repeats)
        with bare_grpc.serving() as (address, _):
            bare_down = bare_grpc.download_seconds(address, nbytes, self.repeats, idle)
            bare = bare_grpc.upload_seconds(address, nbytes, self.repeats, idle)
        mb = nbytes / 1e6
        for direction, seconds in (("GetGlobalModel", down), ("SubmitUpdate", up)):
            ratio = raw / seconds
            self.add(1, f"model transfer through {direction} / raw TCP", ratio, "x", ">= 0.6", ratio >= 0.6,
                     f"({mb:.1f} MB: {nbytes / seconds / 1e9:.2f} GB/s vs raw TCP {nbytes / raw / 1e9:.2f} GB/s)")
        # Context for both figures: the same bytes through gRPC Python alone (bench/bare_grpc.py).
        self.add(1, "reference: bare gRPC Python server stream of the same bytes / raw TCP", raw / bare_down, "x",
                 "reported", None,
                 f"({nbytes / bare_down / 1e9:.2f} GB/s; GetGlobalModel reaches {bare_down / down:.2f} of it)")
        self.add(1, "reference: bare gRPC Python client stream of the same bytes / raw TCP", raw / bare, "x",
                 "reported", None, f"({nbytes / bare / 1e9:.2f} GB/s; SubmitUpdate reaches {bare / up:.2f} of it)")

    # 2 -------------------------------------------------------------------------------------------------
    def serialization(self) -> None:
        spec = model_spec_for(self.big_model, load_digits()[0])
        state = build_model(spec, seed=0).state_dict()
        payload = tensors.encode(state)
        nbytes = payload.total_bytes
        buffer = bytearray(nbytes)

        def round_trip() -> float:
            start = time.perf_counter()
            sent = tensors.encode(state)
            header = convert.model_header_of(1, 0, sent, tensors.CHUNK_SIZE)
            messages = convert.model_stream(header, sent, tensors.CHUNK_SIZE)
            received = convert.model_header_from_raw(messages[0])
            back = tensors.assemble(received.payload.specs,
                                    convert.data_chunks(iter(messages[1:]), pb.ModelChunk, "model"),
                                    received.payload.checksum, buffer)
            elapsed = time.perf_counter() - start
            assert back.keys() == state.keys()
            return elapsed

        source = np.frombuffer(payload.data, dtype=np.uint8)
        target = np.empty_like(source)

        def memcpy() -> float:
            start = time.perf_counter()
            np.copyto(target, source)
            return time.perf_counter() - start

        def copies_only() -> float:
            # The two copies the path cannot avoid: into the bytes objects gRPC's Python API sends, and
            # out of the ones it hands over into the receive buffer. No headers, checksum or tensors.
            start = time.perf_counter()
            messages = [convert.encode_data_chunk(p) for p in payload.pieces(tensors.CHUNK_SIZE)]
            view, offset = memoryview(buffer), 0
            for data in convert.data_chunks(iter(messages), pb.ModelChunk, "model"):
                view[offset:offset + len(data)] = data
                offset += len(data)
            return time.perf_counter() - start

        round_trip()
        memcpy()
        copies_only()
        ours, copy = median_of(round_trip, self.repeats), median_of(memcpy, self.repeats)
        floor = median_of(copies_only, self.repeats)
        ratio = ours / copy
        self.add(2, "serialization: state_dict to chunks and back / one memory copy", ratio, "x", "<= 2",
                 ratio <= 2, f"({nbytes / 1e6:.1f} MB: {ours * 1e3:.1f} ms vs memcpy {copy * 1e3:.1f} ms)")
        self.add(2, "reference: the path's two unavoidable copies alone / one memory copy", floor / copy, "x",
                 "reported", None, f"({floor * 1e3:.1f} ms: framing into gRPC's messages, and out of them)")

    # 3 and 4 -------------------------------------------------------------------------------------------
    def rounds_and_memory(self) -> None:
        peaks = {}
        model = tensors.encode(build_model(model_spec_for(self.big_model, load_digits()[0])).state_dict()).data
        model_bytes = len(model)
        raw_one = raw_tcp_median(model, self.repeats)  # one model over raw TCP: both figures' baseline
        # The figure is the median of the periods after the first round: 4 of them in a full run.
        rounds = 3 if self.quick else 6
        for clients in ((3, 5) if self.quick else (10, 50)):
            run = self.load_run(self.big_model, clients, rounds)
            records, idle, peak = run.records, run.idle_rss, run.peak_rss
            # What the round time is bound by: the CPU the server and the load generator (this process)
            # used, per round on average.
            server_cpu, own = run.server_cpu, run.own_cpu
            # A round's period, from one aggregation to the next, once clients are connected and warm.
            periods = [b.closed_at - a.closed_at for a, b in itertools.pairwise(records[1:])]
            period = statistics.median(periods)
            raw = raw_one * 2 * clients
            ratio = period / raw
            self.add(3, f"round time with {clients} clients / raw TCP moving {2 * clients} models", ratio, "x",
                     "<= 2", ratio <= 2, f"({period:.2f} s per round, median of {len(periods)}, vs {raw:.2f} s; CPU "
                     f"per round: server {server_cpu / rounds:.2f} s, load generator {own / rounds:.2f} s, "
                     f"{(server_cpu + own) / rounds / period:.2f} of the {os.cpu_count()} cores over a period)")
            peaks[clients] = (peak - idle) / model_bytes
        small, large = sorted(peaks)
        growth = peaks[large] - peaks[small]
        self.add(4, f"server peak RSS above idle, {large} clients uploading, in model sizes", peaks[large],
                 "models", "< 4, and growth from "
                 f"{small} to {large} clients < 0.5 (noise, not a trend)", peaks[large] < 4 and growth < 0.5,
                 f"({small} clients: {peaks[small]:.2f}; growth {growth:+.2f})")

    # 5 -------------------------------------------------------------------------------------------------
    def scale(self) -> None:
        clients = 5 if self.quick else 500  # --quick: figure 3's run (figure 11 has 200 clients)
        run = self.load_run("mlp", clients, 3)
        stats, records = run.stats, run.records
        assert len(records) == 3 and all(len(r.clients) == clients for r in records)
        elapsed = records[-1].closed_at - records[0].opened_at
        p99 = float(np.percentile(stats.join_latencies, 99))
        starts = [t - r.opened_at for r in records for t in stats.train_received[r.round]]
        self.add(5, f"{clients} concurrent clients, 3 rounds: rounds per second", 3 / elapsed, "rounds/s",
                 "completes", True, f"(p99 JoinRound call {p99 * 1e3:.0f} ms, long-polls included; p99 from round "
                 f"open to a client's TRAIN {np.percentile(starts, 99) * 1e3:.0f} ms)")

    # 6 -------------------------------------------------------------------------------------------------
    def round_start(self) -> None:
        clients, rounds = (5, 3) if self.quick else (10, 8)  # --quick: figure 3's run
        run = self.load_run("mlp", clients, rounds)
        stats, records = run.stats, run.records
        delays = [max(stats.train_received[b.round]) - a.closed_at for a, b in itertools.pairwise(records)]
        delay = statistics.median(delays)
        self.add(6, f"round start: end of aggregation to every selected client holding TRAIN ({clients} clients)",
                 delay * 1e3, "ms", "< 50 ms", delay < 0.05, f"(median of {len(delays)} rounds, worst "
                 f"{max(delays) * 1e3:.1f} ms)")

    # 7 -------------------------------------------------------------------------------------------------
    def compression(self) -> None:
        rounds = "3" if self.quick else "10"
        clients = 1 if self.quick else 3
        model = "mlp" if self.quick else "cnn"
        # --quick: the smoke test of this path, with the codec that has error feedback and two federations
        # rather than five (each codec has tests of its own: tests/unit/test_codecs.py), side by side.
        codecs = ("none", "topk:0.1") if self.quick else ("none", "float16", "bfloat16", "int8", "topk:0.1")

        def federation(codec: str) -> tuple[int, float | None, float | None]:
            out = self.run_dir("compression-" + codec.replace(":", ""))
            srv = server(out, "--model-name", model, "--rounds", rounds, "--clients-per-round", str(clients),
                         "--num-clients", str(clients), "--compression", codec)
            try:
                procs = [start_client(str(i), srv.address, ["--device", "cpu"], out / f"client{i}.log", env=ENV)
                         for i in range(clients)]
                codes = [p.wait(600) for p in procs]
            finally:
                srv.stop()
            assert codes == [0] * clients, f"{codec}: clients exited {codes}"
            records = [r for r in read_jsonl(out / "metrics.jsonl") if r.aggregated]
            return sum(r.bytes_in for r in records), records[2].accuracy, records[-1].accuracy

        with ThreadPoolExecutor(2 if self.quick else 1) as pool:
            results = dict(zip(codecs, pool.map(federation, codecs)))
        base_bytes, base_early, base_final = results["none"]
        for codec, (nbytes, early, final) in results.items():
            if codec == "none":
                continue
            self.add(7, f"compression {codec}: upload bytes / float32", nbytes / base_bytes, "x", "reported",
                     None, f"(accuracy after 3 rounds {early:.2%} vs {base_early:.2%} uncompressed, after {rounds} "
                     f"{final:.2%} vs {base_final:.2%}; digits, {model}, {clients} clients)")

    # 8 -------------------------------------------------------------------------------------------------
    def client_training(self) -> None:
        if SHARED_MNIST.is_dir() and not self.quick:
            data, _ = load_mnist(SHARED_MNIST)
            what = "MNIST 5,000 images, cnn"
        else:
            data, _ = load_digits()
            what = "digits, cnn"
        spec = model_spec_for("cnn", data)
        cfg = m.TrainConfig(model=spec, dataset="mnist", num_clients=1, seed=0, local_epochs=1, batch_size=32,
                            lr=0.01, momentum=0.9, weight_decay=0.0, optimizer="sgd")
        device = torch.device("cpu")
        model = build_model(spec, seed=0)
        loader = BatchLoader(data, cfg.batch_size, shuffle=True, seed=0)

        def ours() -> float:
            start = time.perf_counter()
            train(model, loader, cfg, device, should_stop=lambda: False)
            return time.perf_counter() - start

        bare_model = build_model(spec, seed=0)
        optimizer = torch.optim.SGD(bare_model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        x, y = data.x, data.y

        def bare() -> float:
            start = time.perf_counter()
            bare_model.train()
            order = torch.randperm(len(y))
            for i in range(0, len(y), cfg.batch_size):
                idx = order[i:i + cfg.batch_size]
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(bare_model(x[idx]), y[idx]).backward()
                optimizer.step()
            return time.perf_counter() - start

        ours(), bare()
        times_ours, times_bare = [], []
        for _ in range(self.repeats):  # interleaved, so that a noisy moment hurts both alike
            times_ours.append(ours())
            times_bare.append(bare())
        ratio = statistics.median(times_ours) / statistics.median(times_bare)
        self.add(8, "client training: one local epoch / bare PyTorch loop", ratio, "x", "<= 1.15", ratio <= 1.15,
                 f"({what}: {statistics.median(times_ours):.2f} s vs {statistics.median(times_bare):.2f} s)")

    # 11 ------------------------------------------------------------------------------------------------
    def many_clients(self) -> None:
        """10,000 connected clients of a tiny model (the MLP on digits), 1,000 a round, 3 rounds, on one
        server (bench/many_clients.py); --quick 200 clients, 20 a round."""
        clients, per_round = (200, 20) if self.quick else (10_000, 1_000)
        result = bench_many_clients.measure(clients, per_round, 3, self.workdir, env=ENV,
                                            budget=120.0 if self.quick else 600.0, settle=0.2 if self.quick else 1.0)
        self.add(11, f"{clients} connected clients, {per_round} a round: server memory per connected client",
                 result.bytes_per_client / 1024, "KiB", "reported", None, f"({result.summary()})")
        self.add(11, f"{clients} connected clients, {per_round} a round: rounds aggregated (of 3) within its "
                 "time budget", result.rounds, "rounds", "3", result.rounds == 3,
                 f"(round open-to-close median {statistics.median(result.round_seconds or [float('nan')]):.2f} s"
                 f" over {result.rounds_run} rounds run)")
        self.add(11, f"{clients} connected clients, {per_round} a round: round start (open to a client's TRAIN), "
                 "p99", result.start_p99 * 1e3, "ms", "reported", None, "")

    # 12 ------------------------------------------------------------------------------------------------
    def small_rounds(self) -> None:
        """The small-model round (bench/round_cpu.py): the built-in digits, an MLP 64-128-10, 10 fl-client
        processes all selected each round, E = 1, B = 32; steady state, over 10 s after round 50. Flower's
        round on the same workload is make bench-peers' (bench/peers.py); --quick 3 clients, 0.5 s."""
        from bench import round_cpu  # noqa: PLC0415 - it imports bench.peers, which imports this module
        rounds, window, clients, warm_up = (200, 0.5, 3, 4) if self.quick else (400, 10.0, 10, 50)
        period, server_cpu, clients_cpu = round_cpu.measure(rounds, window, self.run_dir("small-rounds"),
                                                            clients, warm_up)
        self.add(12, f"small model, {clients} clients (digits, MLP 64-128-10, all selected): time per round",
                 period * 1e3, "ms", "reported", None,
                 f"(steady state after round {warm_up}; CPU per round: server {server_cpu * 1e3:.1f} ms, the "
                 f"clients {clients_cpu * 1e3:.1f} ms; against Flower: make bench-peers)")

    # 10 ------------------------------------------------------------------------------------------------
    def ray_simulation(self) -> None:
        """The simulation's Ray backend against in-process on the same work (bench/ray_sim.py): 1,000
        digits clients, 100 a round, 5 rounds; --quick 20 clients, 5 a round, 2 rounds."""
        clients, per_round, rounds = (20, 5, 2) if self.quick else (1000, 100, 5)
        local = ray_sim.measure("inprocess", clients, per_round, rounds)
        ray = ray_sim.measure("ray", clients, per_round, rounds)
        assert local.rounds == ray.rounds == rounds, (local, ray)
        self.add(10, "simulation on Ray (local instance, 2 CPUs): client-rounds per second / in-process",
                 ray.rate / local.rate, "x", "reported", None, f"({ray_sim.summary(local, ray)})")
        self.add(10, f"simulation on Ray, {clients} clients: the driver's peak RSS", ray.peak_rss / 2**20, "MB",
                 "reported", None, f"(in-process: {local.peak_rss / 2**20:.0f} MB)")


    # 9 -------------------------------------------------------------------------------------------------
    def secure_aggregation(self) -> None:
        """Secure aggregation's cost against plain FedAvg, over the wire (bench/secure.py): a round's period
        and the bytes each client sends per round, with fl_client's own Federation as the clients."""
        for clients in ((3,) if self.quick else (10, 50)):
            plain = secure.measure(clients, False, self.workdir, rounds=2 if self.quick else 4)
            masked = secure.measure(clients, True, self.workdir, rounds=2 if self.quick else 4)
            self.add(9, f"secure aggregation, {clients} clients: round time / plain FedAvg's", masked[0] / plain[0],
                     "x", "reported", None, f"({masked[0]:.2f} s against {plain[0]:.2f} s per round, mlp)")
            self.add(9, f"secure aggregation, {clients} clients: bytes each client sends / plain FedAvg's",
                     masked[1] / plain[1], "x", "reported", None,
                     f"({masked[1] / 1e3:.0f} kB against {plain[1] / 1e3:.0f} kB per round: the update in int64 "
                     "fixed point, plus keys and shares)")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return (f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def markdown(figures: list[Figure], where: str) -> str:
    lines = [f"Measured on {where}.", "", "| # | figure | value | target | met |", "|---|---|---|---|---|"]
    for f in figures:
        verdict = {True: "yes", False: "**no**", None: "-"}[f.met]
        lines.append(f"| {f.number} | {f.name} {f.details} | {f.value:.3g} {f.unit} | {f.target} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that every benchmark runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench", help="where results.json and results.md go")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (method names)")
    parser.add_argument("--skip", nargs="*", default=[], help="leave out these benchmarks (method names)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    allocator.keep_freed_memory()  # as fl-server and fl-client do
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        bench = Bench(args.quick, Path(tmp))
        for name in ("transfer", "serialization", "rounds_and_memory", "scale", "round_start", "compression",
                     "client_training", "secure_aggregation", "ray_simulation", "many_clients", "small_rounds"):
            if (not args.only or name in args.only) and name not in args.skip:
                getattr(bench, name)()
    where = machine()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"machine": where, "quick": args.quick, "seconds": round(time.perf_counter() - started, 1),
               "figures": [asdict(f) for f in bench.figures]}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(bench.figures, where))
    print(f"\nbench: {len(bench.figures)} figures in {results['seconds']} s; written to {args.out}/results.json "
          f"and results.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
