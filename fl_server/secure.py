"""The stages of a secure round, around its upload (config secure_aggregation; common/secagg.py):

    ADVERTISE_KEYS  each selected client sends its public keys; the round learns who takes part (U1)
    SHARE_KEYS      each of U1 sends its secrets' shares, encrypted for its neighbours (U2 sent them)
    (training)      each of U2 trains, masks its encoded update and uploads it through SubmitUpdate (U3)
    UNMASK/REVEAL   each of U3 learns who survived and who dropped, and reveals the shares that remove
                    the masks which do not cancel: survivors' self masks, the dropped clients' pairwise ones

A stage closes when every client it waits for has answered, or at its deadline (secagg_stage_timeout);
a client missing then is given up on for the round, as a silent one is. A stage left with fewer than
the threshold's clients fails the round, which the coordinator then re-runs with a fresh sample: never
a wrong aggregate. Everything here runs under the round state's lock (RoundState.secure_step).
"""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

from common import messages as m
from common import secagg, secagg_sessions
from common.logs import safe
from common.secure_rounds import round_params
from fl_server.aggregation.secure import SecureSum
from fl_server.errors import InvalidUpdateError, NotSelectedError, StaleRoundError
from fl_server.membership import Membership
from fl_server.round_types import OpenRound

log = logging.getLogger("fl_server.secure")


class Phase(enum.Enum):
    ADVERTISE = 1
    SHARE = 2
    UPLOAD = 3
    REVEAL = 4
    FAILED = 5


class SecureStages:
    """One secure round's stages at a time, for the round state that owns the lock."""

    def __init__(self, train_config: m.TrainConfig, aggregator: SecureSum, stage_timeout: float,
                 clock: Callable[[], float]):
        self.train_config = train_config
        self.aggregator = aggregator
        self.stage_timeout = stage_timeout
        self.clock = clock
        self.round: OpenRound | None = None
        self.session: secagg_sessions.ServerSession | None = None
        self.phase = Phase.FAILED
        self.deadline = 0.0
        self.advertised: set[str] = set()
        self.shared: set[str] = set()
        self.revealed: set[str] = set()
        self.survivors: tuple[str, ...] = ()
        self.dropped: tuple[str, ...] = ()
        self.advertisements: dict[str, bytes] = {}
        self.closing = False  # the uploads are over: no more masked updates are taken
        self.failure = ""
        # Counts what was recorded and every phase change: a waiter is woken only when this moves, so that
        # clients waiting on a stage do not wake each other in a loop.
        self.changes = 0

    def open(self, r: OpenRound) -> None:
        params = round_params(self.train_config, self.aggregator.length, r.number)
        self.session = secagg_sessions.ServerSession(params, r.selected)
        self.aggregator.session, self.aggregator.params = self.session, params
        self.round, self.phase, self.failure = r, Phase.ADVERTISE, ""
        self.deadline = self.clock() + self.stage_timeout
        self.advertised, self.shared, self.revealed = set(), set(), set()
        self.advertisements = {}
        self.survivors, self.dropped = (), ()
        self.closing = False
        self.changes += 1

    @property
    def threshold(self) -> int:
        assert self.session is not None
        return self.session.params.threshold

    # --- requests ------------------------------------------------------------------------------------

    def handle(self, r: OpenRound, req: m.SecAggRequest) -> m.SecAggReply:
        """Record the client's part of its stage; the stage's answer once it is complete (ready)."""
        if r is not self.round or self.session is None:
            raise StaleRoundError(f"round {req.round} is not the secure round in progress")
        client = req.client_id
        if client not in r.chosen:
            raise NotSelectedError(f"client {client!r} was not selected for round {r.number}")
        self.advance(r)
        if self.phase is Phase.FAILED:
            raise StaleRoundError(f"round {r.number} cannot be aggregated securely ({self.failure}); join again")
        try:
            return self._answer(r, req)
        except _ClientFault as e:
            self._give_up(r, client, f"sent a malformed secure-aggregation message ({e})")
            raise InvalidUpdateError(f"round {r.number}: {e}") from None
        except secagg.SecAggError as e:  # the round's own state cannot go on (too few in a neighbourhood)
            self.fail(r, str(e))
            raise StaleRoundError(f"round {r.number} cannot be aggregated securely ({e}); join again") from None

    def _answer(self, r: OpenRound, req: m.SecAggRequest) -> m.SecAggReply:
        assert self.session is not None
        client, stage = req.client_id, req.stage
        if stage is m.SecAggStage.ADVERTISE_KEYS:
            keys = req.entries.get(client, b"")
            if client in self.advertisements and keys != self.advertisements[client]:
                # Other keys than the first time: the client restarted, and its new session cannot take part
                # in a round whose roster holds its old keys.
                self._give_up(r, client, "advertised other keys (it restarted mid-round)")
                raise NotSelectedError(f"client {client!r} advertised other keys for round {r.number}; it takes "
                                       "no further part in it")
            if self.phase is Phase.ADVERTISE and client not in self.advertised and client not in r.stalled:
                _by_client(self.session.add_keys, client, keys)
                self.advertised.add(client)
                self.advertisements[client] = keys
                self.changes += 1
                self.advance(r)
            if self.phase is Phase.ADVERTISE:
                return m.SecAggReply(ready=False, message="waiting for the round's key advertisements")
            self._require(client in self.advertised, r, "missed the key advertisement")
            return m.SecAggReply(ready=True, entries=self.session.roster())
        if stage is m.SecAggStage.SHARE_KEYS:
            self._require(client in self.advertised, r, "missed the key advertisement")
            if self.phase is Phase.SHARE and client not in self.shared and client not in r.stalled:
                _by_client(self.session.add_shares, client, req.entries)
                self.shared.add(client)
                self.changes += 1
                self.advance(r)
            if self.phase is Phase.SHARE:
                return m.SecAggReply(ready=False, message="waiting for the round's share exchange")
            self._require(client in self.shared, r, "missed the share exchange")
            return m.SecAggReply(ready=True, entries=self.session.shares_for(client))
        # Only the clients that exchanged keys take part in unmasking, and only once the keys are exchanged.
        self._require(client in self.shared and self.phase in (Phase.UPLOAD, Phase.REVEAL), r,
                      "is not in the unmasking")
        if stage is m.SecAggStage.UNMASK:
            if self.phase is not Phase.REVEAL:
                return m.SecAggReply(ready=False, message="waiting for the round's uploads")
            self._require(client in self.survivors, r, "its masked update is not in the round")
            return m.SecAggReply(ready=True, survivors=self.survivors, dropped=self.dropped)
        # REVEAL
        self._require(self.phase is Phase.REVEAL and client in self.survivors, r, "is not asked to reveal shares")
        if client not in self.revealed:
            _by_client(self.session.add_reveal, client, req.entries)
            self.revealed.add(client)
            self.changes += 1
        return m.SecAggReply(ready=True, message="shares received")

    def step(self, r: OpenRound, req: m.SecAggRequest, cond: threading.Condition, deadline: float,
             still_open: Callable[[], bool]) -> m.SecAggReply:
        """`handle`, held (under the round state's `cond`) until the stage answers, the round is no longer
        `still_open`, or `deadline`. Waiters are woken only when something was recorded, so that clients
        waiting on a stage do not wake each other in a loop."""
        while True:
            changes = self.changes
            reply = self.handle(r, req)
            if self.changes != changes:
                cond.notify_all()
            remaining = deadline - self.clock()
            if reply.ready or remaining <= 0 or not still_open():
                return reply
            # A stage with a deadline is closed by whoever looks after it; the uploads' end is announced.
            stage_left = self.deadline - self.clock()
            cond.wait(min(remaining, stage_left + 0.05) if stage_left > 0 else remaining)

    def check_upload(self, client: str) -> None:
        """NotSelectedError unless the client may upload its masked update now (accepts_upload)."""
        if not self.accepts_upload(client):
            number = self.round.number if self.round is not None else 0
            raise NotSelectedError(f"client {client!r} may not upload into round {number} now: a secure round "
                                   "takes masked updates only from the clients that exchanged keys, between the "
                                   "key exchange and the unmasking")

    def give_up_on_silent(self, r: OpenRound, members: Membership, since: float) -> None:
        """While the round is unmasked: a survivor that vanished after its upload is not waited for until
        the stage's deadline (a live one answers the moment it is asked: it is long-polling for the lists)."""
        for c in self.waiting_for(r):
            silent_for = members.silent_for(c, since)
            if silent_for > members.silence_limit:
                r.silent[c] = f"silent for {silent_for:.1f} s while the round was unmasked"
                log.warning("round %d: client %s %s; unmasking without it", r.number, safe(c), r.silent[c])

    def accepts_upload(self, client: str) -> bool:
        """A masked update counts only from a client that exchanged keys, while the round takes uploads."""
        return self.phase is Phase.UPLOAD and not self.closing and client in self.shared

    def _require(self, ok: bool, r: OpenRound, what: str) -> None:
        if not ok:
            raise NotSelectedError(f"this client {what} of round {r.number}; it takes no further part in it")

    # --- stage transitions ---------------------------------------------------------------------------

    def waiting_for(self, r: OpenRound) -> set[str]:
        """The clients the current stage still waits for."""
        live = {c for c in r.selected if c not in r.silent}
        if self.phase is Phase.ADVERTISE:
            return live - self.advertised
        if self.phase is Phase.SHARE:
            return (live & self.advertised) - self.shared
        if self.phase is Phase.REVEAL:
            return (live & set(self.survivors)) - self.revealed
        return set()

    def advance(self, r: OpenRound) -> bool:
        """Close the current stage if it is complete or past its deadline; True when the phase changed."""
        if self.phase not in (Phase.ADVERTISE, Phase.SHARE) or r is not self.round:
            return False
        if self.waiting_for(r) and self.clock() < self.deadline:
            return False
        takers = self.advertised if self.phase is Phase.ADVERTISE else self.shared
        missed = "no key advertisement" if self.phase is Phase.ADVERTISE else "no share exchange"
        for client in r.selected:
            if client not in takers and client not in r.silent:
                self._give_up(r, client, f"{missed} within secagg_stage_timeout")
        assert self.session is not None
        neighbours = self.session.params.neighbours
        degree = len(takers) - 1 if not neighbours else min(neighbours, len(takers) - 1)
        if degree < self.threshold:
            self.fail(r, f"only {len(takers)} clients took part in the {self.phase.name.lower()} stage: their "
                         f"neighbourhoods of {degree} cannot hold the threshold's {self.threshold} shares")
        else:
            self.phase = Phase.SHARE if self.phase is Phase.ADVERTISE else Phase.UPLOAD
            self.deadline = self.clock() + self.stage_timeout
            self.changes += 1
            log.info("round %d: secure aggregation: %d clients in, on to %s", r.number, len(takers),
                     self.phase.name.lower())
        return True

    def begin_reveal(self, r: OpenRound) -> None:
        """The uploads are in: the survivors are those whose masked update was counted."""
        assert self.session is not None
        if self.phase is not Phase.UPLOAD:
            if self.phase is not Phase.FAILED:
                self.fail(r, f"the round's uploads closed during the {self.phase.name.lower()} stage")
            return
        self.survivors = tuple(sorted(c for c in r.submitted if c in self.shared))
        self.dropped = tuple(sorted(self.shared - set(self.survivors)))
        for client in self.survivors:
            self.session.add_masked(client)
        if len(self.survivors) < self.threshold:
            self.fail(r, f"only {len(self.survivors)} masked updates arrived, fewer than the threshold "
                         f"{self.threshold}")
            return
        self.phase = Phase.REVEAL
        self.deadline = self.clock() + self.stage_timeout
        self.changes += 1
        log.info("round %d: secure aggregation: %d masked updates in, %d dropped; unmasking", r.number,
                 len(self.survivors), len(self.dropped))

    def end_uploads(self, r: OpenRound, cond: threading.Condition, wait_step: float) -> None:
        """No more masked updates start; once those in flight are folded (every counted one in the sum
        before anyone is told), the survivors are told to reveal. Under `cond`, the round state's lock."""
        self.closing = True
        while r.folding or r.uploading:
            # Woken when an upload or fold ends; the timeout is a backstop, not the mechanism.
            cond.wait(wait_step)
        self.begin_reveal(r)
        cond.notify_all()

    def unmask(self, r: OpenRound, cond: threading.Condition, members: Membership, stopping: Callable[[], bool],
               wait_step: float) -> None:
        """The round's last stage: end the uploads, then wait (under `cond`) until the survivors have
        revealed the shares that remove the masks left, the stage's deadline passes, or we are stopping."""
        self.end_uploads(r, cond, wait_step)
        started = self.clock()
        while not stopping() and not self.reveal_done(r):
            self.give_up_on_silent(r, members, started)
            cond.wait(min(max(self.deadline - self.clock(), 0.0) + 0.05, wait_step))

    def reveal_done(self, r: OpenRound) -> bool:
        return self.phase is not Phase.REVEAL or not self.waiting_for(r) or self.clock() >= self.deadline

    def fail(self, r: OpenRound, why: str) -> None:
        self.phase, self.failure = Phase.FAILED, why
        self.changes += 1
        log.warning("round %d: secure aggregation failed: %s; the round will be re-run", r.number, why)
        for client in r.selected:
            if client not in r.silent and client not in r.submitted:
                self._give_up(r, client, f"the secure round failed: {why}")

    def _give_up(self, r: OpenRound, client: str, why: str) -> None:
        if client not in r.silent and client not in r.submitted:
            r.silent[client] = why
            r.stalled.add(client)
            log.warning("round %d: client %s %s; giving up on it", r.number, safe(client), why)


class _ClientFault(Exception):
    """A secure-aggregation message that its sender got wrong."""


def _by_client(record: Callable[..., None], *args: object) -> None:
    """`record` a client's message; its SecAggError is the client's fault, not the round's."""
    try:
        record(*args)
    except secagg.SecAggError as e:
        raise _ClientFault(str(e)) from None
