"""`fl-demo` (what `make demo` runs): a server and three clients as separate processes on localhost."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from fl_server.records import read_jsonl
from fl_tools.processes import ServerProcess, start_client


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
    server = ServerProcess(["--port", "0", "--rounds", str(args.rounds), "--num-clients", str(args.clients),
                            "--clients-per-round", str(args.clients), "--model-name", args.model,
                            "--round-timeout", "120", "--out", str(args.out),
                            "--log-file", str(args.out / "server.log")], echo=sys.stdout, env=env)
    print(f"fl-demo: server listening on {server.address}", flush=True)
    clients = [start_client(str(i), server.address, ["--device", "cpu", "--give-up-after", "60"],
                            args.out / f"client{i}.log", env=env) for i in range(args.clients)]
    codes = [c.wait() for c in clients]
    server_code = server.stop()
    metrics = read_jsonl(args.out / "metrics.jsonl")
    if any(codes) or server_code or len(metrics) < args.rounds or metrics[-1].accuracy is None:
        print(f"fl-demo: something failed (client exit codes {codes}, server {server_code}); see {args.out}/*.log",
              file=sys.stderr)
        return 1
    print(f"fl-demo: final test accuracy {metrics[-1].accuracy:.2%} after {len(metrics)} rounds; "
          f"model in {args.out}/final_model.pt, metrics in {args.out}/metrics.jsonl", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
