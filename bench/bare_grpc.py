"""References for SubmitUpdate and GetGlobalModel: plain gRPC Python moving the same bytes with the same
channel arguments.

    python -m bench.bare_grpc     # serves on a free loopback port and prints it; bench.run uses it

Upload: a client-streaming call whose handler only copies each message into a preallocated buffer (the
one copy a receiver cannot avoid), fed by a client that sends 1 MiB messages built beforehand: no header,
admission, checksum, value checks or fold. Download: a server-streaming call that replays 1 MiB messages
built once, which the client copies into a buffer it reuses: no header, checksum or tensors. They show
what a straightforward gRPC Python transfer achieves on this machine, as against raw TCP and fedgrpc, in
the same run.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from bench.timing import median_seconds
from common import allocator
from common.tensors import CHUNK_SIZE
from fl_client.connection import CHANNEL_OPTIONS
from fl_server.transport import SERVER_OPTIONS

METHOD = "/bench.Bare/Upload"
DOWNLOAD = "/bench.Bare/Download"


# Reused by every call, as fl-server reuses its receive buffers (the warm-up calls fault its pages in):
# fresh memory would add a page fault per 4 KiB to each upload.
_BUFFER = memoryview(bytearray(64 << 20))


def _drain(messages: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    buffer = _BUFFER  # calls come one at a time (upload_seconds)
    received = 0
    for message in messages:
        buffer[received:received + len(message)] = message
        received += len(message)
    return received.to_bytes(8, "little")


_MESSAGES: dict[int, list[bytes]] = {}


def messages_of(data: bytes) -> list[bytes]:
    """`data` cut into 1 MiB messages (bytes, which gRPC's Python API sends)."""
    return [data[start:start + CHUNK_SIZE] for start in range(0, len(data), CHUNK_SIZE)]


def _written(nbytes: int) -> list[bytes]:
    """`nbytes` of written (not zero-page) data in 1 MiB messages."""
    return messages_of(np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8).tobytes())


def _replay(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    nbytes = int.from_bytes(request, "little")
    if nbytes not in _MESSAGES:  # built once, as fl-server serializes a model version once
        _MESSAGES[nbytes] = _written(nbytes)
    yield from _MESSAGES[nbytes]


def serve() -> None:
    allocator.keep_freed_memory(arenas=1)  # as fl-server
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Bare", {
        "Upload": grpc.stream_unary_rpc_method_handler(_drain),
        "Download": grpc.unary_stream_rpc_method_handler(_replay)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


@contextlib.contextmanager
def serving() -> Iterator[tuple[str, int]]:
    """A `serve()`ing process, for as long as the block runs: its address and process id."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare_grpc"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        yield f"127.0.0.1:{int(proc.stdout.readline())}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def upload_seconds(address: str, nbytes: int, repeats: int, idle: float) -> float:
    """Median seconds to stream `nbytes` (at most 64 MiB) to a `serve()`ing process (see
    timing.median_seconds)."""
    # Written, distinct messages: bytes(n) would be untouched zero pages, which fault in as they are read.
    messages = _written(nbytes)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        upload = channel.stream_unary(METHOD)

        def send() -> None:
            received = int.from_bytes(upload(iter(messages), timeout=60), "little")
            assert received == nbytes, (received, nbytes)

        return median_seconds(send, repeats, idle)


def download_seconds(address: str, nbytes: int, repeats: int, idle: float) -> float:
    """Median seconds to receive `nbytes` from a `serve()`ing process into a reused buffer (see
    timing.median_seconds)."""
    buffer = memoryview(bytearray(nbytes))
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        download = channel.unary_stream(DOWNLOAD)

        def receive() -> None:
            received = 0
            for message in download(nbytes.to_bytes(8, "little"), timeout=60):
                buffer[received:received + len(message)] = message
                received += len(message)
            assert received == nbytes, (received, nbytes)

        return median_seconds(receive, repeats, idle)


if __name__ == "__main__":
    serve()
