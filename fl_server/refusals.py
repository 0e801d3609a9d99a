"""Refused calls, logged without letting a flood of them flood the log."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc


class RefusalLog:
    """Logs refusals, at most one line a second for each status: a flood of hostile calls (thousands of
    made-up ids a second against a full registry) must not become a flood of log lines, nor its writing
    take the server's time. A line after a quiet spell says how many were left out."""

    def __init__(self, log: logging.Logger, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.log, self.interval, self.clock = log, interval, clock
        self._lock = threading.Lock()
        self._last: dict[grpc.StatusCode, float] = {}
        self._left_out: dict[grpc.StatusCode, int] = {}

    def refused(self, peer: str, code: grpc.StatusCode, error: Exception) -> None:
        now = self.clock()
        with self._lock:
            if now - self._last.get(code, -float("inf")) < self.interval:
                self._left_out[code] = self._left_out.get(code, 0) + 1
                return
            self._last[code] = now
            left_out = self._left_out.pop(code, 0)
        more = f" (and {left_out} more {code.name} refusal(s) not logged)" if left_out else ""
        self.log.warning("%s refused (%s): %s%s", peer, code.name, error, more)
