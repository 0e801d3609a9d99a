"""`fl-demo` (what `make demo` runs): a server and three clients as separate processes on localhost.

It starts them itself, through the installed entry points, so that it works wherever the package is
installed; the tests and benchmarks start theirs through tests/harness.py.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

LISTENING = re.compile(r"^listening on (\S+):(\d+)$")
STARTUP_TIMEOUT = 120.0


def command(tool: str) -> list[str]:
    """The installed entry point beside this Python (`fl-server`, `fl-client`), else `python -m`."""
    script = Path(sys.executable).parent / tool
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", {"fl-server": "fl_server.cli", "fl-client": "fl_client.cli"}[tool]]


def start_server(args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """fl-server with `args` (plaintext: localhost only) and the address it listens on, once it does.
    The server's other output lines are echoed as they come; its log (stderr) only when it fails to start."""
    proc = subprocess.Popen([*command("fl-server"), *args, "--insecure"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    addresses: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    log_tail: collections.deque[str] = collections.deque(maxlen=20)

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = LISTENING.match(line.strip())
            if match:
                addresses.put(f"127.0.0.1:{match.group(2)}")
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        addresses.put(None)  # exited before listening: unblock the waiter

    def read_stderr() -> None:
        assert proc.stderr is not None
        log_tail.extend(proc.stderr)  # read to the end, or a full pipe would block the server

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        address = addresses.get(timeout=STARTUP_TIMEOUT)
    except queue.Empty:
        address = None
    if address is None:
        stop(proc)
        raise RuntimeError("fl-server did not start:\n" + "".join(log_tail))
    return proc, address


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def start_client(client_id: str, server: str, extra: list[str], log_file: Path,
                 env: dict[str, str]) -> subprocess.Popen:
    out = open(log_file, "w")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen([*command("fl-client"), "--id", client_id, "--server", server, *extra, "--insecure"],
                            stdout=out, stderr=subprocess.STDOUT, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", default="cnn", help="mlp or cnn")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)

    shutil.rmtree(args.out, ignore_errors=True)  # a demo starts afresh rather than resuming the last one
    args.out.mkdir(parents=True)
    # Each process trains with one thread: 2 cores shared by 4 processes go further without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    print(f"fl-demo: starting fl-server and {args.clients} fl-client processes on localhost (built-in digits, "
          f"{args.model}, {args.rounds} rounds); logs in {args.out}/", flush=True)
    server, address = start_server(["--port", "0", "--rounds", str(args.rounds), "--num-clients", str(args.clients),
                                    "--clients-per-round", str(args.clients), "--model-name", args.model,
                                    "--round-timeout", "120", "--out", str(args.out),
                                    "--log-file", str(args.out / "server.log")], env)
    print(f"fl-demo: server listening on {address}", flush=True)
    clients = [start_client(str(i), address, ["--device", "cpu", "--give-up-after", "60"],
                            args.out / f"client{i}.log", env) for i in range(args.clients)]
    codes = [c.wait() for c in clients]
    server_code = stop(server)
    metrics = [json.loads(line) for line in (args.out / "metrics.jsonl").read_text().splitlines()]
    if any(codes) or server_code or len(metrics) < args.rounds:
        print(f"fl-demo: something failed (client exit codes {codes}, server {server_code}); see {args.out}/*.log",
              file=sys.stderr)
        return 1
    print(f"fl-demo: final test accuracy {metrics[-1]['accuracy']:.2%} after {len(metrics)} rounds; "
          f"model in {args.out}/final_model.pt, metrics in {args.out}/metrics.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
