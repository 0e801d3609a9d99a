"""The round state machine: who is selected, what has been submitted, when a round closes.

A plain thread-safe object with no gRPC in it: the servicer calls `join_async` on its asyncio loop and
`model` and `submit` from worker threads; the coordinator's loop calls `open_round`,
`wait_until_complete` and `close_round`. No one sleep-polls: the coordinator and tools wait on one
condition variable, woken the moment something they wait for changes; each JoinRound long-poll waits on a
waiter of its own (fl_server/polls.py: an asyncio event, no thread), woken only when its client's answer
changes, so that a round started among 10,000 polling clients wakes the 1,000 it selected rather than all
of them. Its parts, each in its own module: membership (who is live, how clients are selected), uploads
(receiving and checking one update), aggregation (the rule) and publication (each model version, encoded
once).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from common import codecs, tensors, timeline
from common.logs import safe
from common.messages import (
    Action,
    JoinDecision,
    JoinRequest,
    ModelRequest,
    SecAggReply,
    SecAggRequest,
    SubmitResult,
    TrainConfig,
    UpdateHeader,
)
from common.secagg import SecAggError
from fl_server.aggregation import Aggregator, FedAvg
from fl_server.aggregation.secure import SecureSum
from fl_server.errors import NotSelectedError, StaleRoundError, UnknownClientError, UploadStalledError, check_protocol
from fl_server.membership import ClientInfo, ClientSelector, Membership, RandomSelector
from fl_server.polls import LoopWaiter, Pollers, Waiter
from fl_server.publication import ModelPublisher, ModelSnapshot
from fl_server.round_types import OpenRound, RoundOutcome, RoundRules, ServerLimits
from fl_server.secure import Phase, SecureStages
from fl_server.uploads import CheckedUpdate, UploadReceiver

log = logging.getLogger("fl_server.rounds")


class RoundState:
    def __init__(self, *, global_state: Mapping[str, torch.Tensor], train_config: TrainConfig, rules: RoundRules,
                 aggregator: Aggregator | None = None, selector: ClientSelector | None = None, model_version: int = 0,
                 limits: ServerLimits | None = None, clock: Callable[[], float] = time.monotonic):
        limits = limits or ServerLimits()
        self.train_config = train_config
        self.rules = rules
        self.clock = clock
        self.selector = selector or RandomSelector()
        self.members = Membership(rules.heartbeat_seconds, clock, limits.registry, train_config.dataset,
                                  train_config.num_clients)
        self.finished = False
        self.stopping = False
        self.bytes_received = 0  # payload bytes of every counted update
        self.bytes_sent = 0  # bytes of every model stream served in full
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        # Each JoinRound long-poll's own waiter, by client: woken when a round selects the client, and all
        # of them at the end.
        self._pollers = Pollers(self._lock)
        self._watchers = 0  # callers of wait_for() waiting now: they watch joins too
        self._round: OpenRound | None = None
        self._global = {name: t.detach().cpu().clone() for name, t in global_state.items()}
        specs = tensors.specs_of(self._global)
        self.aggregator = aggregator or (SecureSum(specs) if train_config.secure_aggregation else FedAvg(specs))
        # Secure aggregation's stages around each round's upload (fl_server/secure.py).
        self.secure: SecureStages | None = None
        if train_config.secure_aggregation:
            if not isinstance(self.aggregator, SecureSum):
                raise ValueError("secure aggregation needs the SecureSum aggregator")
            self.secure = SecureStages(train_config, self.aggregator, limits.secagg_stage_timeout, clock)
        self.publisher = ModelPublisher(self._global, model_version)
        # What an update must be is the aggregator's to say: the model's tensors, or a secure round's one
        # masked vector.
        self.uploads = UploadReceiver(self.aggregator.specs, codecs.parse(train_config.compression),
                                      self.aggregator.check,
                                      limits.max_concurrent_uploads, clock, limits.upload_progress_timeout)
        self.uploads.metric_limits = limits.metrics
        # An accepted update is folded into the sum on this thread, after its client has the answer: the
        # answer rests on the checks, which all run before it, and a checked update cannot fail to fold.
        # The client's upload time then ends with the checks; with more than one receive buffer, the next
        # upload is received while the last one is folded. close_round waits for the folds; a fold returns
        # its receive buffer.
        self._folder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fold")
        self._fold_lock = threading.Lock()  # keeps begin_round, fold, finish and discard apart

    # --- what clients call ---------------------------------------------------------------------------

    @property
    def model_version(self) -> int:
        return self.publisher.current.version

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self._global

    @property
    def global_checksum(self) -> int:
        return self.publisher.current.checksum

    def subscribe(self, on_publish: Callable[[ModelSnapshot], None]) -> None:
        """`on_publish(snapshot)` now and for every new model version, under the state's lock."""
        with self._cond:
            self.publisher.subscribe(on_publish)

    def join(self, req: JoinRequest, timeout: float) -> JoinDecision:
        """Register the client and hold the call, blocking this thread, until there is something for it to
        do, or `timeout`."""
        deadline = self.clock() + timeout
        with self._cond:
            decision, info = self._enter_join(req)
            if decision is not None:
                return decision
            waiter = self._pollers.condition()
            self._start_poll(req.client_id, waiter, info)
            try:
                while True:
                    decision = self._decision_for(req.client_id)
                    remaining = deadline - self.clock()
                    if decision is not None or remaining <= 0:
                        break
                    waiter.wait(remaining)
            finally:
                self._end_poll(req.client_id, waiter, info)
        return decision or self._no_work()

    async def join_async(self, req: JoinRequest, timeout: float) -> JoinDecision:
        """`join` for the asyncio server: the long-poll holds no thread, only an event on the running loop.
        The lock is taken on the loop's thread: its holders keep it for moments (the longest, closing a
        round of a large model, for tens of milliseconds), and a thread hop per poll would cost more."""
        deadline = self.clock() + timeout
        with self._cond:
            decision, info = self._enter_join(req)
            if decision is not None:
                return decision
            waiter = LoopWaiter(asyncio.get_running_loop())
            self._start_poll(req.client_id, waiter, info)
        try:
            while True:
                waiter.event.clear()
                with self._cond:
                    decision = self._decision_for(req.client_id)
                remaining = deadline - self.clock()
                if decision is not None or remaining <= 0:
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await waiter.event.wait()
        finally:  # also when the call is cancelled (its client went away)
            with self._cond:
                self._end_poll(req.client_id, waiter, info)
        return decision or self._no_work()

    def _enter_join(self, req: JoinRequest) -> tuple[JoinDecision | None, ClientInfo]:
        """Register the client; the answer when it is due at once (a heartbeat, a failure report), else
        None: the call is to be held. Under the lock."""
        check_protocol(req.protocol_version)
        info = self.members.register(req, keep=self._round.chosen if self._round is not None else ())
        if req.training_round and req.failure:
            return self._give_up_on_failed(req.client_id, req.training_round, req.failure), info
        if req.training_round:
            return self._heartbeat_reply(req.client_id, req.training_round), info
        if self._round is None or self._watchers:
            # The coordinator may be waiting for enough clients (no round is open then). During a round
            # joins change nothing it waits for: waking it for each of thousands of polls would cost it
            # a pass over the round's clients each time.
            self._cond.notify_all()
        return None, info

    def _start_poll(self, client_id: str, waiter: Waiter, info: ClientInfo) -> None:
        info.polls += 1
        self.members.polling += 1
        self._pollers.add(client_id, waiter)

    def _end_poll(self, client_id: str, waiter: Waiter, info: ClientInfo) -> None:
        info.polls -= 1
        self.members.polling -= 1
        self._pollers.remove(client_id, waiter)
        # Heard from until now: a client whose long-poll just ended is not "away" (and may not be
        # forgotten to make room for a newcomer) in the moment before it polls again.
        info.last_seen = self.clock()

    def _no_work(self) -> JoinDecision:
        return JoinDecision(Action.WAIT, self.train_config, message="no round needs you yet")

    def _train(self, r: OpenRound, message: str = "") -> JoinDecision:
        # With a receive buffer for every selected client, no upload of theirs ever waits for one: the
        # admission's round trip would only delay it, so the clients are told to send their data at once.
        return JoinDecision(Action.TRAIN, self.train_config, round=r.number, model_version=self.model_version,
                            heartbeat_seconds=self.rules.heartbeat_seconds, message=message,
                            upload_admitted=self._admitted_in_advance(r))

    def _admitted_in_advance(self, r: OpenRound) -> bool:
        return self.uploads.max_concurrent >= len(r.selected)

    def _heartbeat_reply(self, client_id: str, training_round: int) -> JoinDecision:
        r = self._round
        if r is not None and r.number == training_round and r.expects(client_id):
            if r.silent.pop(client_id, None):
                log.info("round %d: client %s is back after being given up on", r.number, safe(client_id))
            return self._train(r, "carry on")
        return JoinDecision(Action.WAIT, self.train_config,
                            message=f"round {training_round} is over for this client; stop working on it")

    def _give_up_on_failed(self, client_id: str, training_round: int, failure: str) -> JoinDecision:
        """The client cannot deliver the round (its training code raised): the round stops waiting for
        it now, rather than at its deadline, and does not offer it the round again."""
        r = self._round
        if r is not None and r.number == training_round and r.expects(client_id):
            r.silent[client_id] = f"failed on the client: {failure}"
            r.stalled.add(client_id)
            log.warning("round %d: client %s could not train it: %s", r.number, safe(client_id), safe(failure))
            self._cond.notify_all()  # the round may be settled now
        return JoinDecision(Action.WAIT, self.train_config,
                            message=f"round {training_round}: noted that this client could not train it")

    def _decision_for(self, client_id: str) -> JoinDecision | None:
        if self.finished:
            return JoinDecision(Action.FINISHED, self.train_config, model_version=self.model_version,
                                message="training finished")
        if self.stopping:
            return JoinDecision(Action.WAIT, self.train_config, retry_after=1.0, message="server is stopping")
        r = self._round
        if r is not None and r.expects(client_id):
            return self._train(r)
        return None

    def model(self, req: ModelRequest) -> ModelSnapshot:
        check_protocol(req.protocol_version)
        with self._cond:
            snapshot = self.publisher.current
            self.members.touch(req.client_id)
        if req.model_version not in (0, snapshot.version):
            raise StaleRoundError(f"model version {req.model_version} is gone; the current one is "
                                  f"{snapshot.version}: join again")
        return snapshot

    @contextlib.contextmanager
    def downloading(self, client_id: str) -> Iterator[None]:
        """Around a model download: its client is not silent while the call is open (with a thousand
        clients fetching through max_downloads slots, one may wait longer than the silence limit), and is
        heard from when it ends."""
        with self._cond:
            info = self.members.clients.get(client_id)
            if info is not None:
                info.downloads += 1
        try:
            yield
        finally:
            if info is not None:
                with self._cond:
                    info.downloads -= 1
                    info.last_seen = self.clock()

    def submit(self, header: UpdateHeader, chunks: Iterable[bytes | memoryview],
               on_admitted: Callable[[], None] = lambda: None,
               interrupt: Callable[[str], None] = lambda why: None) -> SubmitResult:
        """Receive one update and fold it into the round's aggregate, or refuse it untouched.
        `on_admitted()` runs once a receive buffer is reserved for the update, just before its data is
        read: the servicer tells the client there that it may send the data now. `interrupt(why)` ends
        the call of an upload that stalled (uploads.UploadReceiver.receive); its client is then given up
        on for the round, as a silent one is."""
        check_protocol(header.protocol_version)
        with self._cond:
            counted = self._counted_already(header)
            if counted is not None:
                return counted
            r = self._check_submittable(header)
            self._check_secure_upload(header.client_id)
            if header.client_id in r.submitted:
                return SubmitResult(accepted=True, duplicate=True,
                                    message=f"update for round {r.number} was already counted")
            r.check_upload(header.client_id)
            self.uploads.check_header(header)
            r.uploading.add(header.client_id)
        try:
            # Outside the lock: uploads from different clients stream in parallel.
            # Every client is told, even one told in advance in its TRAIN answer (upload_admitted): a client
            # that waits for it (any but fl-client's current one may) would otherwise stall.
            update = self.uploads.receive(header, chunks, on_admitted, interrupt)
            return self._count(r, update)
        except UploadStalledError as e:
            self._give_up_on_stalled(r, header.client_id, str(e))
            raise
        finally:
            with self._cond:
                r.uploading.discard(header.client_id)
                # A secure round's reveal waits for the uploads in flight to end, whichever way they end.
                self._cond.notify_all()

    def _check_secure_upload(self, client_id: str) -> None:
        if self.secure is not None:
            self.secure.check_upload(client_id)

    def _give_up_on_stalled(self, r: OpenRound, client_id: str, why: str) -> None:
        with self._cond:
            if self._round is r and client_id not in r.submitted:
                r.stalled.add(client_id)
                r.silent[client_id] = why
                log.warning("round %d: client %s: %s; giving up on it", r.number, safe(client_id), why)
                self._cond.notify_all()

    def _count(self, r: OpenRound, update: CheckedUpdate) -> SubmitResult:
        """Count a checked update into its round and queue its fold, which owns its buffer from then on."""
        header = update.header
        with self._cond:
            if self._round is not r:  # the round closed while the bytes were streaming in
                self.uploads.release(update.buffer)
                raise StaleRoundError(f"round {r.number} closed while the update was uploading")
            try:
                self._check_secure_upload(header.client_id)  # the uploads may have closed meanwhile
            except NotSelectedError:
                self.uploads.release(update.buffer)
                raise
            if header.client_id in r.submitted:
                self.uploads.release(update.buffer)
                return SubmitResult(accepted=True, duplicate=True, message="already counted")
            r.folding += 1
            r.submitted[header.client_id] = header.num_samples
            r.bytes_in += header.payload.total_bytes
            self.bytes_received += header.payload.total_bytes
            r.silent.pop(header.client_id, None)
            r.metrics[header.client_id] = dict(header.metrics)
            timeline.mark("counted", r.number, header.client_id)
            self.members.touch(header.client_id, counted=_identity(header))
            log.info("round %d: update from %s (%d samples, %.1f MB; waited %.3f s for a receive buffer, received "
                     "in %.3f s, checked in %.3f s), %d/%d in", r.number, safe(header.client_id), header.num_samples,
                     header.payload.total_bytes / 1e6, update.waited, update.received, update.checked,
                     len(r.submitted), len(r.selected))
            self._cond.notify_all()
        self._folder.submit(self._fold, r, update)
        return SubmitResult(accepted=True, message=f"update for round {r.number} counted")

    def _begin(self, r: OpenRound) -> None:
        """The aggregator's begin_round, once per round and before its first fold; under the fold lock."""
        if not r.begun:
            self.aggregator.begin_round()
            r.begun = True

    def _fold(self, r: OpenRound, update: CheckedUpdate) -> None:
        client_id = update.header.client_id
        try:
            with self._fold_lock:
                self._begin(r)
                self.aggregator.fold(update.diff, update.header.num_samples)
        except Exception as e:  # a bug, since the update passed every check: count it out, loudly
            log.exception("round %d: folding the update from %s failed", r.number, safe(client_id))
            with self._cond:
                r.submitted.pop(client_id, None)
                r.silent[client_id] = f"its update could not be folded in ({e})"
                r.stalled.add(client_id)  # not offered the round again: it would fail the same way
        finally:
            self.uploads.release(update.buffer)
            with self._cond:
                r.folding -= 1
                self._cond.notify_all()

    def _counted_already(self, header: UpdateHeader) -> SubmitResult | None:
        """A duplicate's answer for an update of a round that is no longer open but counted this client's
        update: its copy, sent again because the answer was lost (an update asking for join_after waits
        for its answer until the next round opens). None for anything else."""
        info = self.members.clients.get(header.client_id)
        r = self._round
        if info is None or info.counted != _identity(header) or (r and r.number == header.round):
            return None
        return SubmitResult(accepted=True, duplicate=True,
                            message=f"update for round {header.round} was already counted")

    def _check_submittable(self, header: UpdateHeader) -> OpenRound:
        if header.client_id not in self.members:
            raise UnknownClientError(f"client {header.client_id!r} has not joined; call JoinRound first")
        r = self._round
        if r is None or header.round != r.number or header.model_version != self.model_version:
            current = f"round {r.number}" if r else "no round"
            raise StaleRoundError(f"update is for round {header.round} (model version {header.model_version}) "
                                  f"but {current} is open (model version {self.model_version}); join again")
        return r

    # --- what the coordinator calls ------------------------------------------------------------------

    def wait_for_clients(self) -> None:
        """Block until `min_clients` clients are there now (Membership.present) (or we are stopping)."""
        need = self.rules.min_clients
        with self._cond:
            if len(self.members.present()) < need:
                log.info("waiting for %d clients (%d connected)", need, len(self.members.present()))
            counted = -float("inf")
            while not self.stopping:
                # Joins wake us at once, but counting who is there is a pass over every client: while
                # thousands join, count again only when enough are polling, or a quarter second on.
                now = time.monotonic()
                if self.members.polling >= need or now - counted >= 0.25:
                    counted = now
                    if len(self.members.present()) >= need:
                        break
                self._cond.wait(0.25)  # the timeout lets silent clients age out

    def status(self) -> dict[str, Any]:
        """What the server is doing, for `fl-server status` and the metrics endpoint."""
        with self._cond:
            r = self._round
            clients = self.members.describe(r)
            return {
                "phase": "finished" if self.finished else "training" if r is not None else "waiting",
                "round": r.number if r is not None else self.model_version + (0 if self.finished else 1),
                "model_version": self.model_version,
                "selected": list(r.selected) if r is not None else [],
                "clients": clients,
                "live_clients": len(self.members.live()),
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
            }

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until `predicate()` (run under the state's lock, so it may call `status()`) holds, or
        `timeout` seconds pass; whether it holds. Every change a client or the coordinator can see wakes
        it: for tests and tools that must act once the state has reached a point."""
        with self._cond:
            self._watchers += 1
            try:
                return self._cond.wait_for(predicate, timeout)
            finally:
                self._watchers -= 1

    def count_sent(self, nbytes: int) -> None:
        with self._cond:
            self.bytes_sent += nbytes

    def open_round(self) -> list[str]:
        """Sample `clients_per_round` of the clients there now (see Membership.present) and wake them;
        returns who was selected. Clients gone for a long while are forgotten first."""
        with self._cond:
            self.members.forget()
            present = self.members.present()
            selected = self.selector.select(present, self.rules.clients_per_round)
            now = self.clock()
            self._round = OpenRound(number=self.model_version + 1, selected=selected,
                                     deadline=now + self.rules.round_timeout, started=now, opened_at=time.time(),
                                     population=len(present))
            if self.secure is not None:
                self.secure.open(self._round)
            shown = ", ".join(map(safe, selected[:20])) + (f" and {len(selected) - 20} more" * (len(selected) > 20))
            log.info("round %d started with %s", self._round.number, shown)
            timeline.mark("open", self._round.number)
            self._cond.notify_all()
            self._pollers.wake(selected)
            return selected

    def secure_step(self, req: SecAggRequest, timeout: float) -> SecAggReply:
        """A client's part of a secure round's stage (fl_server/secure.py); held, like a JoinRound
        long-poll, until the stage is complete or `timeout` (then ready is False: call again)."""
        check_protocol(req.protocol_version)
        deadline = self.clock() + timeout
        with self._cond:
            if self.secure is None:
                raise NotSelectedError("this server does not run secure aggregation")
            r = self._round
            if r is None or r.number != req.round:
                raise StaleRoundError(f"round {req.round} is not open; join again")
            self.members.touch(req.client_id)
            return self.secure.step(r, req, self._cond, deadline, lambda: self._round is r)

    def wait_until_complete(self) -> None:
        """Block until every selected client has submitted or fallen silent, the deadline passes, or
        we are stopping."""
        with self._cond:
            r = self._round
            assert r is not None, "no round is open"
        # Preparing the sums costs page faults: pay them now, while clients train, not when the first
        # update arrives.
        with self._fold_lock:
            self._begin(r)
        with self._cond:
            while not self.stopping:
                self._give_up_on_silent(r)
                if self.secure is not None and self.secure.advance(r):
                    self._cond.notify_all()
                remaining = r.deadline - self.clock()
                if r.settled or remaining <= 0:
                    break
                # Submissions wake us at once; the timeout is what notices a silent client.
                self._cond.wait(min(remaining, self.rules.heartbeat_seconds))
            if self.secure is not None and not self.stopping:
                self.secure.unmask(r, self._cond, self.members, lambda: self.stopping, self.rules.heartbeat_seconds)

    def begin_unmasking(self) -> None:
        """A secure round's uploads are over: tell the survivors to reveal their shares (wait_until_complete
        does this itself; a simulation in one thread calls it, then close_round)."""
        with self._cond:
            r = self._round
            assert r is not None and self.secure is not None, "no secure round is open"
            self.secure.end_uploads(r, self._cond, self.rules.heartbeat_seconds)

    def _give_up_on_silent(self, r: OpenRound) -> None:
        # Each submission wakes the coordinator; with a thousand clients a round, a pass over them all at each
        # wake-up would cost a million checks a round. Silence is counted in seconds: a pass every quarter
        # heartbeat notices it as soon.
        now = self.clock()
        if now < r.next_silence_check:
            return
        r.next_silence_check = now + self.rules.heartbeat_seconds / 4
        for c in r.selected:
            if c in r.submitted or c in r.silent or c in r.uploading:
                continue
            silent_for = self.members.silent_for(c, r.started)
            if silent_for > self.members.silence_limit:
                r.silent[c] = f"silent for {silent_for:.1f} s (no heartbeat)"
                log.warning("round %d: client %s %s; giving up on it", r.number, safe(c), r.silent[c])

    def close_round(self) -> RoundOutcome:
        """Close the open round: aggregate if at least `min_fit` updates arrived, else discard them."""
        with self._cond:
            r = self._round
            assert r is not None, "no round is open"
            self._round = None  # no more uploads are accepted into it...
            self._cond.notify_all()
            while r.folding:  # ...and those accepted are all folded in
                self._cond.wait()
            aggregated = len(r.submitted) >= self.rules.min_fit and not self.stopping
            unmask_failure = ""
            if self.secure is not None and aggregated and self.secure.phase is not Phase.REVEAL:
                aggregated, unmask_failure = False, self.secure.failure or "the secure round did not reach unmasking"
            num_samples = sum(r.submitted.values())
            aggregate_started = time.perf_counter()
            with self._fold_lock:
                if aggregated:
                    # The old state goes to the aggregator, which may reuse its memory from the next round
                    # on; by then its evaluation and checkpoint have finished (the coordinator waits for them
                    # before closing another round) and no reader is left.
                    try:
                        self._global = self.aggregator.finish(self._global)
                        if isinstance(self.aggregator, SecureSum):
                            # A secure round's updates say no sample count; the unmasked sum holds the total.
                            num_samples = self.aggregator.last_total_weight
                    except SecAggError as e:  # too few shares revealed: re-run the round, never guess
                        aggregated, unmask_failure = False, str(e)
                        log.warning("round %d: the masked updates could not be unmasked: %s", r.number, e)
                        self.aggregator.discard()
                elif r.begun:
                    self.aggregator.discard()
            if aggregated:
                self.publisher.publish(self._global, self.model_version + 1)
            timeline.mark("closed", r.number)
            self._cond.notify_all()
            reasons = {c: r.silent.get(c, "stopping" if self.stopping else "no update by the round's deadline")
                       for c in r.selected if c not in r.submitted}
            if unmask_failure:
                reasons.update({c: f"not unmasked: {unmask_failure}" for c in r.submitted})
            return RoundOutcome(round=r.number, selected=r.selected, contributors=sorted(r.submitted),
                                num_samples=num_samples, client_metrics=r.metrics,
                                seconds=self.clock() - r.started, aggregated=aggregated, drop_reasons=reasons,
                                opened_at=r.opened_at, closed_at=time.time(), bytes_in=r.bytes_in,
                                aggregate_seconds=time.perf_counter() - aggregate_started, population=r.population)

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()
            self._pollers.wake()

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
            self._pollers.wake()


def _identity(header: UpdateHeader) -> tuple[int, int, int]:
    """What tells a copy of an update from another update: a round re-run after too few updates keeps
    its number and model version, so the payload's checksum is part of it."""
    return header.round, header.model_version, header.payload.checksum
