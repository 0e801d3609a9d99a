"""Moments of a round, marked by fl-server and fl-client, for a timeline of rounds across processes
(`python -m bench.round_timeline`). Off unless the environment variable FL_TIMELINE names a folder: each
process then appends its marks to a file of its own there, one JSON line each,

    {"t": 12345.678901, "who": "server", "event": "open", "round": 7}
    {"t": 12345.679304, "who": "client 3", "event": "task", "round": 7}

with `t` from CLOCK_MONOTONIC, which every process on a machine shares, so that marks of different
processes line up. Off, a mark costs one test of a module global.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import IO

ENV = "FL_TIMELINE"

_lock = threading.Lock()
_file: IO[str] | None = None
_who = ""


def start(who: str) -> None:
    """Mark this process's moments as `who` ("server", "client 3") from now on, if FL_TIMELINE is set."""
    global _file, _who
    folder = os.environ.get(ENV)
    if not folder:
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        # Line-buffered: a killed process (the benchmark kills its clients) leaves whole lines behind.
        _file = open(Path(folder) / f"{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115 - for the process's life
    except OSError as e:
        raise ValueError(f"{ENV}={folder}: cannot write the round timeline there ({e.strerror}); name a writable "
                         f"folder or unset {ENV}") from None
    _who = who


def mark(event: str, round_: int, client: str | None = None) -> None:
    """Record that `event` happened now in round `round_` (for `client`, on the server)."""
    if _file is None:
        return
    line = {"t": time.monotonic(), "who": _who, "event": event, "round": round_}
    if client is not None:
        line["client"] = client
    with _lock:
        _file.write(json.dumps(line) + "\n")


def read(folder: str | Path) -> list[dict]:
    """Every mark in `folder`, in time order."""
    marks = []
    for path in Path(folder).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            if line.strip():
                marks.append(json.loads(line))
    return sorted(marks, key=lambda m: m["t"])
