"""Who has joined, who is live, and how a round's clients are chosen.

Not thread-safe on its own: the round state calls it under its lock.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from fl_server.round_types import OpenRound


@dataclass
class ClientInfo:
    num_samples: int
    device: str
    last_seen: float  # last time the client called us (join, heartbeat, fetch, upload)
    polls: int = 0  # JoinRound long-polls of this client being held open right now


class ClientSelector(Protocol):
    """Picks a round's clients among the live ones. Its state is checkpointed, so that a resumed run
    samples as the uninterrupted one would have."""

    def select(self, live: Sequence[str], k: int) -> list[str]: ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RandomSelector:
    """`k` clients uniformly at random without replacement (the seed's FedAvg), from a seeded generator."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def select(self, live: Sequence[str], k: int) -> list[str]:
        k = min(k, len(live))
        return sorted(self.rng.choice(list(live), size=k, replace=False).tolist()) if k else []

    def state_dict(self) -> Any:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: Any) -> None:
        self.rng.bit_generator.state = state


class Membership:
    """The clients the server knows, and when each was last heard from."""

    def __init__(self, heartbeat_seconds: float, clock: Callable[[], float]):
        self.clock = clock
        # Working clients report every heartbeat; three missed ones (plus slack for a busy machine) means
        # the client is gone: it is dropped from its round and not sampled until it calls again.
        self.silence_limit = 3 * heartbeat_seconds + 2.0
        self.clients: dict[str, ClientInfo] = {}

    def seen(self, client_id: str, num_samples: int, device: str) -> tuple[ClientInfo, bool]:
        """Register or refresh a client; the second value says whether it is new."""
        info = self.clients.get(client_id)
        new = info is None
        if info is None:
            info = self.clients[client_id] = ClientInfo(num_samples, device, self.clock())
        info.num_samples, info.device, info.last_seen = num_samples, device, self.clock()
        return info, new

    def touch(self, client_id: str) -> None:
        if client_id in self.clients:
            self.clients[client_id].last_seen = self.clock()

    def __contains__(self, client_id: str) -> bool:
        return client_id in self.clients

    def live(self) -> list[str]:
        """Clients polling now, or heard from within the silence limit."""
        now = self.clock()
        return sorted(c for c, info in self.clients.items()
                      if info.polls > 0 or now - info.last_seen <= self.silence_limit)

    def silent_for(self, client_id: str, since: float) -> float:
        """Seconds since the client was last heard from, or since `since` if that is later."""
        return self.clock() - max(self.clients[client_id].last_seen, since)

    def describe(self, r: OpenRound | None) -> dict[str, dict[str, Any]]:
        """Each client's state in words (for `fl-server status`), given the open round if any."""
        now, out = self.clock(), {}
        for c, info in sorted(self.clients.items()):
            if r is not None and c in r.submitted:
                what = "submitted"
            elif r is not None and c in r.silent:
                what = "silent"
            elif r is not None and c in r.selected:
                what = "uploading" if c in r.uploading else "training"
            elif info.polls > 0:
                what = "waiting"
            else:
                what = "away" if now - info.last_seen > self.silence_limit else "idle"
            out[c] = {"state": what, "num_samples": info.num_samples, "device": info.device,
                      "seconds_since_seen": round(now - info.last_seen, 1)}
        return out
