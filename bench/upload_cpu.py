"""Where a large upload's time goes: wall time, and the CPU that the sending and the receiving process use
meanwhile, for SubmitUpdate, for plain gRPC Python (bench/bare_grpc.py) and for raw TCP.

    python -m bench.upload_cpu [--repeats 8] [--idle 1.0] [--model-name resnet18]

Each upload of the model (by default the ResNet-18-sized state of figure 1, 44.7 MB) follows `--idle`
seconds without traffic, as in a round. CPU is in cores: CPU seconds over wall seconds, summed over the
uploads. With client and server on one 2-core machine, a sum near 2 means the transfer is bound by CPU,
not by the wire.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench import bare_grpc, loadgen
from bench.run import next_update, raw_tcp_seconds, server
from bench.timing import own_cpu, process_cpu
from common import allocator, tensors
from common import messages as m
from fl_client.connection import CHANNEL_OPTIONS, ServerConnection


def measure(name: str, upload: Callable[[], object], receiver_pid: int | None, repeats: int, idle: float,
            before: Callable[[], object] = lambda: None) -> None:
    """Time `upload` `repeats` times after one warm-up, each after `before()` and `idle` seconds."""
    walls, sent, received = [], 0.0, 0.0
    for i in range(repeats + 1):
        before()
        time.sleep(idle)
        c0, r0, t0 = own_cpu(), process_cpu(receiver_pid) if receiver_pid else 0.0, time.perf_counter()
        upload()
        t1, c1, r1 = time.perf_counter(), own_cpu(), process_cpu(receiver_pid) if receiver_pid else 0.0
        if i:
            walls.append(t1 - t0)
            sent, received = sent + c1 - c0, received + r1 - r0
    total = sum(walls)
    cpu = (f"sender {sent / total:.2f} + receiver {received / total:.2f} cores" if receiver_pid
           else f"{sent / total:.2f} cores, sender and receiver together")
    print(f"{name:13s} {statistics.median(walls) * 1e3:6.1f} ms   CPU: {cpu}", flush=True)


def submit_update(workdir: Path, model_name: str, repeats: int, idle: float) -> bytes:
    """SubmitUpdate through a real fl-server; returns the model's bytes for the other two."""
    srv = server(workdir, "--model-name", model_name, "--rounds", "1000", "--clients-per-round", "1",
                 "--num-clients", "1")
    try:
        with ServerConnection(srv.address) as conn:
            decision = conn.join(m.JoinRequest(client_id="0", num_samples=10))
            header, state = conn.fetch_model(m.ModelRequest(client_id="0", model_version=decision.model_version))
            model = tensors.encode(state).data
            payload = loadgen.tiny_change(header.payload.specs)
            updates: list[m.UpdateHeader] = []  # one per upload, for the round opened before it
            measure("SubmitUpdate", lambda: conn.submit(updates[-1], payload), srv.proc.pid, repeats, idle,
                    before=lambda: updates.append(next_update(conn, payload)))
            return model
    finally:
        srv.stop()


def bare(model: bytes, repeats: int, idle: float) -> None:
    messages = bare_grpc.messages_of(model)
    with bare_grpc.serving() as (address, pid), grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        upload = channel.stream_unary(bare_grpc.METHOD)
        measure("bare gRPC", lambda: upload(iter(messages), timeout=60), pid, repeats, idle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--idle", type=float, default=1.0, help="seconds without traffic before each upload")
    parser.add_argument("--model-name", default="resnet18", help="a built-in model (fl-server --model-name)")
    args = parser.parse_args(argv)
    allocator.keep_freed_memory()  # as fl-client
    with tempfile.TemporaryDirectory(prefix="fl-upload-cpu-") as workdir:
        model = submit_update(Path(workdir), args.model_name, args.repeats, args.idle)
    bare(model, args.repeats, args.idle)
    buffer = bytearray(len(model))
    measure("raw TCP", lambda: raw_tcp_seconds(model, buffer), None, args.repeats, args.idle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
