"""A client's heartbeats while it works on a round: one thread for all of them (Heartbeats), one
Heartbeat per round, which notices when the server says the round is over."""
from __future__ import annotations

import logging
import threading
import time

from common import messages as m
from fl_client.connection import ServerConnection

log = logging.getLogger("fl_client")


class Heartbeat:
    """Tells the server, every few seconds while this client works on a round, that it is alive; and
    notices when the server says the round is over, so the work can stop early.

    One per round (`round_over` is the round's), beating on the Federation's one heartbeat thread
    (Heartbeats): a round that lasts less than a heartbeat costs no thread of its own."""

    def __init__(self, connection: ServerConnection, request: m.JoinRequest, interval: float,
                 beats: Heartbeats | None = None):
        self.connection = connection
        self.request = request
        self.interval = interval
        self.round_over = threading.Event()
        self._beats = beats or Heartbeats()
        self._owned = beats is None  # a thread of its own, stopped with it

    def beat(self) -> bool:
        """One heartbeat; False once the server says the round is over."""
        reply = self.connection.heartbeat(self.request, timeout=max(self.interval, 1.0))
        if reply is None:
            log.warning("round %d: heartbeat not delivered; carrying on", self.request.training_round)
        elif reply.action is not m.Action.TRAIN or reply.round != self.request.training_round:
            log.info("round %d: %s", self.request.training_round, reply.message or "round is over")
            self.round_over.set()
            return False
        return True

    def start(self) -> None:
        if self.interval > 0:
            self._beats.begin(self)

    def stop(self) -> None:
        """No heartbeat of this round is sent or under way once this returns."""
        self._beats.end(self)
        if self._owned:
            self._beats.close()


class Heartbeats:
    """The thread that beats the current round's Heartbeat every `interval` seconds; started with the
    first round, and reused for every round after it.

    A round's beginning and end do not wake the thread when it needs no waking: sleeping until the
    previous round's first heartbeat was due, it wakes then, sees the new round (due later) or none, and
    sleeps on. Rounds far shorter than a heartbeat (a small model's) then cost it about one wake-up per
    interval instead of two per round, each of which took the GIL from the training thread."""

    def __init__(self) -> None:
        self.current: Heartbeat | None = None
        self._due = 0.0  # when the current round's next heartbeat is due (time.monotonic)
        self._beating: Heartbeat | None = None  # the one whose heartbeat is on its way
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._sleeping_until: float | None = None  # the thread's timed wait's end; None: it waits for a round

    def begin(self, heartbeat: Heartbeat) -> None:
        with self._changed:
            self.current = heartbeat
            # The first heartbeat an interval after the round began, the next an interval later.
            self._due = time.monotonic() + heartbeat.interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
                self._thread.start()
            if self._sleeping_until is None or self._sleeping_until > self._due:
                self._changed.notify_all()

    def end(self, heartbeat: Heartbeat) -> None:
        with self._changed:
            if self.current is heartbeat:
                self.current = None  # the thread sees it when it next wakes; nothing of this round is sent
            if threading.current_thread() is not self._thread:
                self._changed.wait_for(lambda: self._beating is not heartbeat)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self.current = None
            self._changed.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if self._closed:
                        return
                    heartbeat, now = self.current, time.monotonic()
                    if heartbeat is not None and now >= self._due:
                        break
                    self._sleeping_until = None if heartbeat is None else self._due
                    self._changed.wait(None if heartbeat is None else self._due - now)
                self._sleeping_until = None
                self._beating = heartbeat
                self._due = now + heartbeat.interval
            try:
                going_on = heartbeat.beat()  # outside the lock: the round may end meanwhile
            except Exception:  # noqa: BLE001 - this thread beats every later round too: it must not end
                log.warning("round %d: heartbeat failed; carrying on", heartbeat.request.training_round,
                            exc_info=True)
                going_on = True
            finally:
                with self._changed:
                    self._beating = None
                    self._changed.notify_all()
            if not going_on:
                self.end(heartbeat)
