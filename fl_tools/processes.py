"""Starts real fl-server / fl-client processes on this machine: for `fl-demo`, the integration tests
and the benchmarks. The installed entry points beside this Python, or `python -m` where they are missing.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

LISTENING = re.compile(r"^listening on (\S+):(\d+)$")
METRICS = re.compile(r"^metrics on (\S+):(\d+)$")


def command(tool: str) -> list[str]:
    """The installed entry point beside this Python (`fl-server`, `fl-client`), else `python -m`."""
    script = Path(sys.executable).parent / tool
    if script.exists():
        return [str(script)]
    module = {"fl-server": "fl_server.cli", "fl-client": "fl_client.cli", "fl-partition": "common.partition"}[tool]
    return [sys.executable, "-m", module]


class ServerProcess:
    """A running fl-server; `port` is what it printed in its `listening on HOST:PORT` line."""

    def __init__(self, args: list[str], echo: IO[str] | None = None, env: dict[str, str] | None = None,
                 startup_timeout: float = 120.0, prefix: list[str] | None = None, cwd: Path | None = None):
        """`prefix` runs the server through another command, e.g. `ip netns exec NS`; `cwd` is the folder it
        runs in. Without TLS flags in `args`, the server runs with --insecure (plaintext: these helpers are
        for localhost)."""
        if "--tls-cert" not in args:
            args = [*args, "--insecure"]
        self.args = args
        self.lines: list[str] = []
        self.proc = subprocess.Popen([*(prefix or []), *command("fl-server"), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        self.stderr_lines: list[str] = []
        self._listening = threading.Event()
        self.port = 0
        self.metrics_port = 0  # when started with --metrics-port
        self._echo = echo
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if not self._listening.wait(startup_timeout) or not self.port:
            self.stop()
            raise RuntimeError("fl-server did not start:\n" + "".join(self.stderr_lines[-20:]))

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            match = LISTENING.match(line.strip())
            metrics = METRICS.match(line.strip())
            if match:
                self.port = int(match.group(2))
                if "--metrics-port" not in self.args:
                    self._listening.set()
            elif metrics:
                self.metrics_port = int(metrics.group(2))
                self._listening.set()
            elif self._echo:
                self._echo.write(line)
                self._echo.flush()
        self._listening.set()  # exited before listening: unblock the waiter

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_client(client_id: str, server: str, extra: list[str] | None = None, log_file: Path | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None,
                 cwd: Path | None = None) -> subprocess.Popen:
    out = open(log_file, "w") if log_file else subprocess.DEVNULL  # noqa: SIM115 - lives as long as the process
    extra = list(extra or [])
    if "--tls-ca" not in extra:
        extra.append("--insecure")  # plaintext on localhost, as the server helper
    return subprocess.Popen([*(prefix or []), *command("fl-client"), "--id", client_id, "--server", server, *extra],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
