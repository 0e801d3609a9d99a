"""Deadlines for calls that wait on a client: one thread for all of them, so that arming one costs no thread.

The servicer arms one for an update stream's first message, the upload receiver one for each admitted
upload's progress; when one passes, its callback ends the call (which unblocks the thread reading it).
A timer is re-armed by moving its deadline (an attribute write under the deadlines lock, once per chunk): the heap
entry is refreshed lazily when the old deadline comes up.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fl_server.deadlines")


class Timer:
    def __init__(self, owner: Deadlines, deadline: float, fire: Callable[[], None]):
        self._owner = owner
        self.deadline = deadline
        self._fire = fire
        self.done = False  # fired or cancelled
        self.fired = False

    def extend(self, seconds: float) -> None:
        """Move the deadline to `seconds` from now (no effect once fired or cancelled)."""
        with self._owner._cond:
            self.deadline = self._owner.clock() + seconds

    def cancel(self) -> bool:
        """Stop the timer; whether it had fired already (then its callback has run or is running)."""
        with self._owner._cond:
            self.done = True
            return self.fired


class Deadlines:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, fire: Callable[[], None]) -> Timer:
        """Call `fire()` (on the deadlines thread; it must be quick) in `seconds`, unless cancelled first."""
        with self._cond:
            timer = Timer(self, self.clock() + seconds, fire)
            heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self._thread.start()
            if self._heap[0][2] is timer:
                self._cond.notify()
            return timer

    def pending(self) -> int:
        with self._cond:
            return sum(not t.done for _, _, t in self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                due = self._next_due()
            try:
                due._fire()
            except Exception:  # noqa: BLE001 - one callback's failure must not stop the others' deadlines
                log.exception("a deadline's callback failed")

    def _next_due(self) -> Timer:
        """Wait (under the lock) for the next timer whose deadline has passed, mark it fired, return it."""
        while True:
            if not self._heap:
                self._cond.wait()
                continue
            deadline, _, timer = self._heap[0]
            if timer.done:
                heapq.heappop(self._heap)
                continue
            if timer.deadline > deadline:  # re-armed since it was pushed
                heapq.heapreplace(self._heap, (timer.deadline, next(self._seq), timer))
                continue
            remaining = deadline - self.clock()
            if remaining > 0:
                self._cond.wait(remaining)
                continue
            heapq.heappop(self._heap)
            timer.done = timer.fired = True
            return timer


DEADLINES = Deadlines()  # the process's one deadlines thread, started on first use
