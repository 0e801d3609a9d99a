"""Helpers that start real fl-server / fl-client processes on free localhost ports."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from fl_tools.processes import ServerProcess, start_client

# One thread per process: the tests run several training processes on 2 cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A port that was free a moment ago (for a client that must start before its server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Federation:
    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.out = tmp_path / "run"
        self.server: ServerProcess | None = None
        self.clients: dict[str, object] = {}

    def start_server(self, *args: str, port: int = 0, prefix: list[str] | None = None) -> ServerProcess:
        self.server = ServerProcess(["--port", str(port), "--out", str(self.out), *args], env=ENV, prefix=prefix)
        return self.server

    def start_client(self, client_id: str, *args: str, server: str | None = None, prefix: list[str] | None = None):
        log = self.tmp_path / f"client{client_id}.log"
        proc = start_client(client_id, server or self.server.address, ["--device", "cpu", *args], log, env=ENV,
                            prefix=prefix)
        self.clients[client_id] = proc
        return proc

    def client_log(self, client_id: str) -> str:
        return (self.tmp_path / f"client{client_id}.log").read_text()

    def wait_clients(self, timeout: float = 240) -> dict[str, int]:
        return {cid: proc.wait(timeout) for cid, proc in self.clients.items()}

    def stop(self) -> None:
        for proc in self.clients.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.server and self.server.proc.poll() is None:
            self.server.proc.kill()
            self.server.proc.wait()


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    yield fed
    fed.stop()
