"""The JoinRound long-polls being held, each with a waiter of its own, woken when its client's answer changes.

A long-poll served by the asyncio server (fl_server.servicer) holds no thread: it waits on a `LoopWaiter`,
an asyncio event set from whichever thread wakes it. Callers that block a thread (fl_tools.simulation,
tests) wait on a condition of the round state's lock instead. Both have `notify()`."""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable
from typing import Protocol


class Waiter(Protocol):
    def notify(self) -> None: ...


class LoopWaiter:
    """A long-poll on an asyncio loop. `notify()` may come from any thread (the coordinator's, mostly);
    `event` is set in the loop's own. Clear `event` in the loop before looking at the state, then wait:
    a change made after the look is then never missed."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.event = asyncio.Event()

    def notify(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: no one waits any more
            self.loop.call_soon_threadsafe(self.event.set)


class Pollers:
    """Each long-poll's waiter, by client: a round start wakes only the clients it selected (10,000
    polling, 1,000 selected: 1,000 wake-ups), the end of training all of them. Every method runs under
    the round state's lock."""

    def __init__(self, lock: threading.RLock):
        self._lock = lock
        self._waiting: dict[str, list[Waiter]] = {}

    def condition(self) -> threading.Condition:
        """A waiter for a thread that blocks: a condition on the round state's lock."""
        return threading.Condition(self._lock)

    def add(self, client_id: str, waiter: Waiter) -> None:
        self._waiting.setdefault(client_id, []).append(waiter)

    def remove(self, client_id: str, waiter: Waiter) -> None:
        waiters = self._waiting[client_id]
        waiters.remove(waiter)
        if not waiters:
            del self._waiting[client_id]

    def wake(self, clients: Iterable[str] | None = None) -> None:
        """Wake the long-polls of `clients` (all when None): their answer has changed."""
        for client in self._waiting if clients is None else clients:
            for waiter in self._waiting.get(client, ()):
                waiter.notify()
