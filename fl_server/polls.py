"""The JoinRound long-polls being held, each waiting on a condition of its own (RoundState's)."""
from __future__ import annotations

import threading
from collections.abc import Iterable


class Pollers:
    """Each long-poll's condition, by client, on the round state's lock: a round start wakes only the
    clients it selected (10,000 polling, 1,000 selected: 1,000 wake-ups), the end of training all of them.
    Every method runs under that lock."""

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._waiting: dict[str, list[threading.Condition]] = {}

    def add(self, client_id: str) -> threading.Condition:
        waiter = threading.Condition(self._lock)
        self._waiting.setdefault(client_id, []).append(waiter)
        return waiter

    def remove(self, client_id: str, waiter: threading.Condition) -> None:
        waiters = self._waiting[client_id]
        waiters.remove(waiter)
        if not waiters:
            del self._waiting[client_id]

    def wake(self, clients: Iterable[str] | None = None) -> None:
        """Wake the long-polls of `clients` (all when None): their answer has changed."""
        for client in self._waiting if clients is None else clients:
            for waiter in self._waiting.get(client, ()):
                waiter.notify()
