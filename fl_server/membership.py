"""Who has joined, who is live, and how a round's clients are chosen.

Not thread-safe on its own: the round state calls it under its lock.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from common.datasets import NO_DATASET
from common.logs import safe
from common.messages import REGISTRY_FULL, JoinRequest
from common.partition import client_index
from fl_server.errors import InvalidJoinError, RegistryFullError

if TYPE_CHECKING:
    from fl_server.round_types import OpenRound

log = logging.getLogger("fl_server.membership")


@dataclass
class ClientInfo:
    num_samples: int
    device: str
    last_seen: float  # last time the client called us (join, heartbeat, fetch, upload)
    polls: int = 0  # JoinRound long-polls of this client being held open right now
    downloads: int = 0  # its model downloads in progress, waiting for a slot or streaming
    # (round, model version, payload checksum) of the last update of its that a round counted: a re-sent
    # copy of it (the answer was lost once the update was in) is answered as a duplicate, even after that
    # round closed (RoundState._counted_already).
    counted: tuple[int, int, int] | None = None

    @property
    def in_call(self) -> bool:
        """A call of the client's is open now: it is there, whenever it last began one."""
        return self.polls > 0 or self.downloads > 0


@dataclass(frozen=True)
class RegistryLimits:
    """How many clients the server keeps track of, and for how long (the server's max_clients and
    forget_clients_after settings)."""

    max_clients: int = 0  # 0 = no limit; fl-server sets one in open mode (no client tokens, no mTLS)
    forget_after: float = 600.0  # seconds without a word after which a client is forgotten


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

    def __init__(self, heartbeat_seconds: float, clock: Callable[[], float], limits: RegistryLimits | None = None,
                 dataset: str = "", num_shares: int = 0):
        """`dataset`, `num_shares`: the federation's data set and how many shares clients without data of
        their own (--data) may train on."""
        self.clock = clock
        self.dataset, self.num_shares = dataset, num_shares
        # Working clients report every heartbeat; three missed ones (plus slack for a busy machine) means
        # the client is gone: it is dropped from its round and not sampled until it calls again.
        self.silence_limit = 3 * heartbeat_seconds + 2.0
        # A round samples only clients that are there now: waiting in a long-poll, or heard from within a
        # heartbeat (a working client sends one that often; an idle one polls without a break). An id
        # that joined once and left is not sampled, though it counts as live for a while.
        self.recent = heartbeat_seconds + 1.0
        self.limits = limits or RegistryLimits()
        self.clients: dict[str, ClientInfo] = {}
        self.polling = 0  # JoinRound long-polls held open now, of all clients (the round state counts them)
        self._pruned = -float("inf")  # when forget() last went through every client
        # After a search of a full registry found no one to forget, newcomers are refused without another
        # search until this time: a flood of new ids then costs one pass over the registry a second, not one
        # each (measured: 580 refused joins a second over 1,000 clients took a core's third).
        self._no_room_until = -float("inf")

    def seen(self, client_id: str, num_samples: int, device: str,
             keep: Collection[str] = ()) -> tuple[ClientInfo, bool]:
        """Register or refresh a client; the second value says whether it is new. A new client may first
        make the registry forget others (never those in `keep`: the open round's); RegistryFullError when
        it is full of clients that are all still there."""
        info = self.clients.get(client_id)
        new = info is None
        if info is None:
            self._make_room(keep)
            info = self.clients[client_id] = ClientInfo(num_samples, device, self.clock())
        # A join that names no device (one made after an update: SubmitUpdate's join_after) keeps the known one.
        info.num_samples, info.device, info.last_seen = num_samples, device or info.device, self.clock()
        return info, new

    def register(self, req: JoinRequest, keep: Collection[str] = ()) -> ClientInfo:
        """Register or refresh the client calling (never forgetting those in `keep` to make room); logs
        what it is. InvalidJoinError for a client without data whose id has no share to train on."""
        if not req.num_samples:
            self._check_share(req.client_id)
        known = self.clients.get(req.client_id)
        samples_before = known.num_samples if known is not None else 0
        info, new = self.seen(req.client_id, req.num_samples, req.device, keep)
        if new:
            # Without --data a client trains on its share of the federation's data set, whose size it
            # reports once it has loaded it.
            data = (f"{req.num_samples} samples" if req.num_samples else
                    f"share {client_index(req.client_id)} of {self.dataset}")
            log.info("client %s joined (%s, %s); %d known", safe(req.client_id), data, safe(req.device or "?"),
                     len(self.clients))
        elif req.num_samples and not samples_before:
            log.info("client %s trains on %d samples", safe(req.client_id), req.num_samples)
        return info

    def _check_share(self, client_id: str) -> None:
        """A client without data trains on share client_index(id) of the federation's data set: refused
        here, with the reason, if there is no such share (or no data set), rather than selected and waited
        for."""
        if self.dataset == NO_DATASET:
            raise InvalidJoinError(
                f"client {safe(client_id)} has no data of its own (no --data), and the federation names no data "
                "set to give it a share of; start it with --data DIR holding its own data")
        n, index = self.num_shares, client_index(client_id)
        if not 0 <= index < n:
            raise InvalidJoinError(
                f"client {safe(client_id)} has no data of its own (no --data), so it would train on share "
                f"{index} of the federation's {self.dataset}, which has only shares 0..{n - 1} "
                f"(num_clients {n}); start it with --id 0..{n - 1} or give it --data")

    def forget(self, keep: Collection[str] = ()) -> list[str]:
        """Forget the clients not heard from for `forget_after` seconds, and not polling nor in `keep`;
        returns them. One that calls again joins as new."""
        now = self.clock()
        self._pruned = now
        gone = [c for c, info in self.clients.items()
                if not info.in_call and now - info.last_seen > self.limits.forget_after and c not in keep]
        for c in gone:
            del self.clients[c]
        if gone:
            log.info("forgot %d client(s) not heard from for %.0f s", len(gone), self.limits.forget_after)
        return gone

    def _make_room(self, keep: Collection[str]) -> None:
        now = self.clock()
        if now - self._pruned >= 1.0:  # at most once a second: a burst of joins goes through the registry once
            self.forget(keep)
        cap = self.limits.max_clients
        if not cap or len(self.clients) < cap:
            return
        # Full: make room by forgetting the client gone longest, if one has been gone past the silence limit.
        searched = now >= self._no_room_until
        away = [] if not searched else [
            (info.last_seen, c) for c, info in self.clients.items()
            if not info.in_call and now - info.last_seen > self.silence_limit and c not in keep]
        if not away:
            if searched:  # the window starts at a real search: a steady flood still gets one a second
                self._no_room_until = now + 1.0
            raise RegistryFullError(f"{REGISTRY_FULL}: the server already keeps track of {cap} clients, its "
                                    "limit (max_clients), and all of them are active; try again later, or ask "
                                    "its operator to raise max_clients")
        last_seen, oldest = min(away)
        del self.clients[oldest]
        log.info("client registry full (%d): forgot client %s, not heard from for %.0f s", cap, safe(oldest),
                 now - last_seen)

    def touch(self, client_id: str, counted: tuple[int, int, int] | None = None) -> None:
        """Heard from the client now; `counted`: the identity of its update a round just counted."""
        info = self.clients.get(client_id)
        if info is not None:
            info.last_seen = self.clock()
            if counted is not None:
                info.counted = counted

    def __contains__(self, client_id: str) -> bool:
        return client_id in self.clients

    def live(self) -> list[str]:
        """Clients polling now, or heard from within the silence limit."""
        now = self.clock()
        return sorted(c for c, info in self.clients.items()
                      if info.in_call or now - info.last_seen <= self.silence_limit)

    def present(self) -> list[str]:
        """Clients polling now, or heard from within a heartbeat: those a round may sample."""
        now = self.clock()
        return sorted(c for c, info in self.clients.items() if info.in_call or now - info.last_seen <= self.recent)

    def silent_for(self, client_id: str, since: float) -> float:
        """Seconds since the client was last heard from, or since `since` if that is later; 0 while a
        call of its own is open (a download waiting for its slot may wait longer than a heartbeat)."""
        info = self.clients[client_id]
        return 0.0 if info.in_call else self.clock() - max(info.last_seen, since)

    def describe(self, r: OpenRound | None) -> dict[str, dict[str, Any]]:
        """Each client's state in words (for `fl-server status`), given the open round if any."""
        now, out = self.clock(), {}
        for c, info in sorted(self.clients.items()):
            if r is not None and c in r.submitted:
                what = "submitted"
            elif r is not None and c in r.silent:
                what = "silent"
            elif r is not None and c in r.chosen:
                what = "uploading" if c in r.uploading else "training"
            elif info.polls > 0:
                what = "waiting"
            else:
                what = "away" if now - info.last_seen > self.silence_limit else "idle"
            out[c] = {"state": what, "num_samples": info.num_samples, "device": info.device,
                      "seconds_since_seen": round(now - info.last_seen, 1)}
        return out
