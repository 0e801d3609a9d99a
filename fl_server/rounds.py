"""The round state machine: who has joined, who is selected, what has been submitted.

A plain thread-safe object with no gRPC in it: the servicer calls `join`, `model` and `submit` from
its worker threads; the coordinator's loop calls `open_round`, `wait_until_complete` and
`close_round`. One condition variable wakes everyone waiting the moment something changes, so no one
ever sleep-polls.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common import codecs, tensors
from common.messages import (
    PROTOCOL_VERSION, Action, Encoding, JoinDecision, JoinRequest, ModelRequest, SubmitResult, TrainConfig,
    UpdateHeader,
)
from fl_server.aggregation import (
    ServerOptimizer, UpdateRejected, make_aggregator, spec_mismatch,
)

log = logging.getLogger("fl_server.rounds")

UPLOAD_MEMORY = 64 << 20  # receive buffers' total, when max_uploads is automatic (0)
MAX_AUTO_UPLOADS = 256  # ...and at most this many: each upload being received holds a server thread
MAX_NUM_SAMPLES = 10**12  # a FedAvg weight beyond this is a lie that would drown every honest client


class FederationError(Exception):
    """Base of the errors a client's request can cause; each maps to one gRPC status code."""


class ProtocolMismatchError(FederationError):
    pass


class UnknownClientError(FederationError):
    pass


class StaleRoundError(FederationError):
    """The update is for a round that is closed, or was trained from an older model."""


class NotSelectedError(FederationError):
    pass


class UploadInProgressError(FederationError):
    pass


class InvalidUpdateError(FederationError):
    """The update is malformed or does not fit the model; it never touches the aggregate."""


@dataclass
class ClientInfo:
    num_samples: int
    device: str
    last_seen: float  # last time the client called us (join, heartbeat, fetch, upload)
    polls: int = 0  # JoinRound long-polls of this client being held open right now


@dataclass
class ModelSnapshot:
    """One version of the global model, serialized once and served to every client that asks."""

    version: int
    round: int
    payload: tensors.Payload
    wire: Any = None  # what the publisher made of it (the servicer: the stream's serialized messages)


@dataclass
class RoundOutcome:
    round: int
    selected: list[str]
    contributors: list[str]
    num_samples: int
    client_metrics: dict[str, dict[str, float]]
    seconds: float
    aggregated: bool
    drop_reasons: dict[str, str]  # selected clients that did not contribute, and why
    opened_at: float  # wall-clock times (time.time()), comparable with other processes' logs
    closed_at: float  # when the new global model was ready to serve
    bytes_in: int  # payload bytes of the counted updates
    aggregate_seconds: float  # applying the aggregate and publishing the new model
    population: int  # live clients the round's sample was drawn from

    @property
    def dropped(self) -> list[str]:
        return sorted(self.drop_reasons)


@dataclass
class _OpenRound:
    number: int
    selected: list[str]
    deadline: float
    started: float
    opened_at: float
    submitted: dict[str, int] = field(default_factory=dict)  # client -> num_samples
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    uploading: set[str] = field(default_factory=set)
    population: int = 0  # live clients the sample was drawn from
    silent: dict[str, str] = field(default_factory=dict)  # client -> why it was given up on
    bytes_in: int = 0  # payload bytes of the counted updates
    folding: int = 0  # accepted updates not yet folded into the sum

    @property
    def settled(self) -> bool:
        """Every selected client has either submitted or been given up on."""
        return len(self.submitted) + len(self.silent) >= len(self.selected)


class RoundState:
    def __init__(self, *, global_state: Mapping[str, torch.Tensor], train_config: TrainConfig,
                 clients_per_round: int, min_clients: int, min_fit: int, round_timeout: float,
                 server_lr: float = 1.0, seed: int = 0, model_version: int = 0, heartbeat_seconds: float = 2.0,
                 max_concurrent_uploads: int = 0, server_optimizer: ServerOptimizer | None = None,
                 aggregator: str = "fedavg", dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.train_config = train_config
        self.clients_per_round = clients_per_round
        self.min_clients = min_clients
        self.min_fit = min_fit
        self.round_timeout = round_timeout
        self.clock = clock
        self.heartbeat_seconds = heartbeat_seconds
        # Working clients report every heartbeat; three missed ones (plus slack for a busy machine) means
        # the client is gone: it is dropped from its round and not sampled until it calls again.
        self.silence_limit = 3 * heartbeat_seconds + 2.0
        self.rng = np.random.default_rng(seed)
        self.clients: dict[str, ClientInfo] = {}
        self.finished = False
        self.stopping = False
        self.bytes_received = 0  # payload bytes of every counted update
        self.bytes_sent = 0  # bytes of every model stream served in full
        self._cond = threading.Condition()
        self._round: _OpenRound | None = None
        self._global = {name: t.detach().cpu().clone() for name, t in global_state.items()}
        self._retired: dict[str, torch.Tensor] | None = None  # a replaced global state, to reuse as sums
        self._specs = tensors.specs_of(self._global)
        self.server_optimizer = server_optimizer or ServerOptimizer("fedavg", server_lr)
        self._aggregator = make_aggregator(self._specs, aggregator, clients_per_round, self.server_optimizer,
                                           dp_noise_multiplier, dp_clip)
        self._publish: Callable[[ModelSnapshot], Any] = lambda snapshot: None
        self._snapshot = ModelSnapshot(model_version, model_version + 1, tensors.encode(self._global))
        self.codec = codecs.parse(train_config.compression)
        # What clients send: the model's tensors as the round's codec compresses them.
        self._wire_specs = codecs.wire_specs(self._specs, self.codec)
        # Receive buffers for uploads, one model each, reused round after round. Their number bounds the
        # uploads being received at once, and so the server's memory, whatever the number of clients:
        # other uploads wait, sending nothing, until a buffer is free (see submit's `on_admitted`).
        # 0 = as many as fit in UPLOAD_MEMORY: one for a large model, many for a small one.
        upload_bytes = sum(spec.nbytes for spec in self._wire_specs)
        if max_concurrent_uploads <= 0:
            max_concurrent_uploads = max(1, min(MAX_AUTO_UPLOADS, UPLOAD_MEMORY // max(1, upload_bytes)))
        self.max_concurrent_uploads = max_concurrent_uploads
        log.info("receiving up to %d upload(s) at once, %.1f MB of buffers each", max_concurrent_uploads,
                 upload_bytes / 1e6)
        self._upload_buffers: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
        for _ in range(max_concurrent_uploads):
            self._upload_buffers.put(None)  # allocated on first use
        # An accepted update is folded into the sum on this thread, after its client has the answer: the
        # answer rests on the checks, which all run before it, and a checked update cannot fail to fold.
        # The client's upload time then ends with the checks; with more than one receive buffer, the next
        # upload is received while the last one is folded. close_round waits for the folds; a fold returns
        # its receive buffer. (Admitting the next upload before the fold returns the only buffer, to stream
        # into gRPC's window meanwhile, made 10-client rounds no faster in a scratch A/B: they are bound by CPU.)
        self._folder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fold")
        self._fold_lock = threading.Lock()  # guards the aggregator: fold, install, apply, reset

    def set_publisher(self, publish: Callable[[ModelSnapshot], Any]) -> None:
        """`publish(snapshot)` runs once per model version, as soon as it exists; its result is kept as
        `snapshot.wire`. The servicer serializes the model there, so no client waits for it."""
        with self._cond:
            self._publish = publish
            self._snapshot.wire = publish(self._snapshot)

    # --- what clients call ---------------------------------------------------------------------------

    @property
    def model_version(self) -> int:
        return self._snapshot.version

    @property
    def global_state(self) -> dict[str, torch.Tensor]:
        return self._global

    @property
    def global_checksum(self) -> int:
        """XXH3-64 of the global state's bytes, computed once when the version was published."""
        return self._snapshot.payload.checksum

    def join(self, req: JoinRequest, timeout: float) -> JoinDecision:
        """Register the client and hold the call until there is something for it to do, or `timeout`."""
        self._check_protocol(req.protocol_version)
        deadline = self.clock() + timeout
        with self._cond:
            info = self.clients.get(req.client_id)
            if info is None:
                info = self.clients[req.client_id] = ClientInfo(req.num_samples, req.device, self.clock())
                log.info("client %s joined (%d samples, %s); %d known", req.client_id, req.num_samples,
                         req.device or "?", len(self.clients))
            info.num_samples, info.device, info.last_seen = req.num_samples, req.device, self.clock()
            if req.training_round:
                return self._heartbeat_reply(req.client_id, req.training_round)
            self._cond.notify_all()  # the coordinator may be waiting for enough clients
            info.polls += 1
            try:
                while True:
                    decision = self._decision_for(req.client_id)
                    remaining = deadline - self.clock()
                    if decision is not None or remaining <= 0:
                        break
                    self._cond.wait(remaining)
            finally:
                info.polls -= 1
        return decision or JoinDecision(Action.WAIT, self.train_config, message="no round needs you yet")

    def _heartbeat_reply(self, client_id: str, training_round: int) -> JoinDecision:
        r = self._round
        if r is not None and r.number == training_round and client_id in r.selected and client_id not in r.submitted:
            if r.silent.pop(client_id, None):
                log.info("round %d: client %s is back after being given up on", r.number, client_id)
            return JoinDecision(Action.TRAIN, self.train_config, round=r.number, model_version=self.model_version,
                                heartbeat_seconds=self.heartbeat_seconds, message="carry on")
        return JoinDecision(Action.WAIT, self.train_config,
                            message=f"round {training_round} is over for this client; stop working on it")

    def _decision_for(self, client_id: str) -> JoinDecision | None:
        if self.finished:
            return JoinDecision(Action.FINISHED, self.train_config, model_version=self.model_version,
                                message="training finished")
        if self.stopping:
            return JoinDecision(Action.WAIT, self.train_config, retry_after=1.0, message="server is stopping")
        r = self._round
        if r is not None and client_id in r.selected and client_id not in r.submitted:
            return JoinDecision(Action.TRAIN, self.train_config, round=r.number, model_version=self.model_version,
                                heartbeat_seconds=self.heartbeat_seconds)
        return None

    def model(self, req: ModelRequest) -> ModelSnapshot:
        self._check_protocol(req.protocol_version)
        with self._cond:
            # A copy, so that the serialized form it carries stays with the caller even if a new
            # version replaces this one (and drops the old form) while the caller streams it.
            snapshot = dataclasses.replace(self._snapshot)
            if req.client_id in self.clients:
                self.clients[req.client_id].last_seen = self.clock()
        if req.model_version not in (0, snapshot.version):
            raise StaleRoundError(f"model version {req.model_version} is gone; the current one is "
                                  f"{snapshot.version}: join again")
        return snapshot

    def submit(self, header: UpdateHeader, chunks: Iterable[bytes],
               on_admitted: Callable[[], None] = lambda: None) -> SubmitResult:
        """Receive one update and fold it into the round's aggregate, or refuse it untouched.
        `on_admitted()` runs once a receive buffer is reserved for the update, just before its data is
        read: the servicer tells the client there that it may send the data now."""
        self._check_protocol(header.protocol_version)
        with self._cond:
            r = self._check_submittable(header)
            if header.client_id in r.submitted:
                return SubmitResult(accepted=True, duplicate=True,
                                    message=f"update for round {r.number} was already counted")
            if header.client_id in r.uploading:
                raise UploadInProgressError(f"an upload from client {header.client_id} for round {r.number} "
                                            "is already in progress")
            self._check_header(header)
            r.uploading.add(header.client_id)
        buffer, handed_to_folder = None, False
        try:
            queued = time.perf_counter()
            buffer = self._upload_buffers.get()
            # Logged with the update: a long wait says more receive buffers (max_uploads) would help.
            waited = time.perf_counter() - queued
            buffer = buffer or bytearray(header.payload.total_bytes)
            on_admitted()
            result, handed_to_folder = self._receive_and_check(r, header, chunks, buffer, waited)
            return result
        finally:
            if not handed_to_folder:
                self._upload_buffers.put(buffer)  # None if the allocation failed: allocated next time
            with self._cond:
                r.uploading.discard(header.client_id)

    def _receive_and_check(self, r: _OpenRound, header: UpdateHeader, chunks: Iterable[bytes | memoryview],
                           buffer: bytearray, waited: float) -> tuple[SubmitResult, bool]:
        """Receive an update into `buffer` and check it; if it is accepted, its fold is queued and owns
        `buffer` from then on (the second value is True)."""
        started = time.perf_counter()
        try:
            # Outside the lock: uploads from different clients stream in parallel.
            # Uncompressed, the received tensors are the diff: the receiver checks the values for NaN
            # and Inf, and finds the largest magnitude, as each chunk lands, while later ones stream.
            receiver = tensors.PayloadReceiver(header.payload.specs, header.payload.checksum, buffer,
                                               check_values=self.codec.name == "none")
            received_chunks = 0
            for chunk in chunks:
                receiver.add(chunk)
                received_chunks += 1
            wire = receiver.finish()
            if received_chunks != header.payload.num_chunks:
                raise InvalidUpdateError(f"update announced {header.payload.num_chunks} chunks but sent "
                                         f"{received_chunks}")
            diff = codecs.decode(wire, self._specs, self.codec)
            received = time.perf_counter()
            self._aggregator.check(diff, header.num_samples, receiver.largest)
        except (tensors.PayloadError, codecs.CodecError, UpdateRejected) as e:
            raise InvalidUpdateError(str(e)) from None
        with self._cond:
            # The round may have closed while the bytes were streaming in.
            if self._round is not r:
                raise StaleRoundError(f"round {r.number} closed while the update was uploading")
            if header.client_id in r.submitted:
                return SubmitResult(accepted=True, duplicate=True, message="already counted"), False
            r.folding += 1
            r.submitted[header.client_id] = header.num_samples
            r.bytes_in += header.payload.total_bytes
            self.bytes_received += header.payload.total_bytes
            r.silent.pop(header.client_id, None)
            r.metrics[header.client_id] = dict(header.metrics)
            self.clients[header.client_id].last_seen = self.clock()
            log.info("round %d: update from %s (%d samples, %.1f MB; waited %.3f s for a receive buffer, received "
                     "in %.3f s, checked in %.3f s), %d/%d in", r.number, header.client_id, header.num_samples,
                     header.payload.total_bytes / 1e6, waited, received - started, time.perf_counter() - received,
                     len(r.submitted), len(r.selected))
            self._cond.notify_all()
        self._folder.submit(self._fold, r, header.client_id, diff, header.num_samples, buffer)
        return SubmitResult(accepted=True, message=f"update for round {r.number} counted"), True

    def _fold(self, r: _OpenRound, client_id: str, diff: dict[str, torch.Tensor], weight: int,
              buffer: bytearray) -> None:
        try:
            with self._fold_lock:
                self._aggregator.fold(diff, weight)
        except Exception as e:  # a bug, since the update passed every check: count it out, loudly
            log.exception("round %d: folding the update from %s failed", r.number, client_id)
            with self._cond:
                r.submitted.pop(client_id, None)
                r.silent[client_id] = f"its update could not be folded in ({e})"
        finally:
            self._upload_buffers.put(buffer)
            with self._cond:
                r.folding -= 1
                self._cond.notify_all()

    def _check_protocol(self, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise ProtocolMismatchError(f"client speaks protocol version {version}, this server speaks "
                                        f"{PROTOCOL_VERSION}; install matching fl-client and fl-server versions")

    def _check_submittable(self, header: UpdateHeader) -> _OpenRound:
        if header.client_id not in self.clients:
            raise UnknownClientError(f"client {header.client_id!r} has not joined; call JoinRound first")
        r = self._round
        if r is None or header.round != r.number or header.model_version != self.model_version:
            current = f"round {r.number}" if r else "no round"
            raise StaleRoundError(f"update is for round {header.round} (model version {header.model_version}) "
                                  f"but {current} is open (model version {self.model_version}); join again")
        if header.client_id not in r.selected:
            raise NotSelectedError(f"client {header.client_id!r} was not selected for round {r.number}")
        return r

    def _check_header(self, header: UpdateHeader) -> None:
        p = header.payload
        if p.encoding is not Encoding.DIFF:
            raise InvalidUpdateError(f"update must be encoded as DIFF, got {p.encoding.name}")
        if not 0 < header.num_samples <= MAX_NUM_SAMPLES:
            raise InvalidUpdateError(f"num_samples must be between 1 and {MAX_NUM_SAMPLES}, "
                                     f"got {header.num_samples}")
        # Compared against the model we hold before anything is allocated: a header claiming
        # 100 GB is refused here, not after an attempt to allocate it.
        if p.codec != str(self.codec):
            raise InvalidUpdateError(f"update is compressed with {p.codec!r}, this federation uses {str(self.codec)!r}")
        mismatch = spec_mismatch(p.specs, self._wire_specs)
        if mismatch:
            raise InvalidUpdateError(mismatch)
        expected = sum(s.nbytes for s in self._wire_specs)
        if p.total_bytes != expected:
            raise InvalidUpdateError(f"update announces {p.total_bytes} bytes; the model's diff is {expected}")

    # --- what the coordinator calls ------------------------------------------------------------------

    def wait_for_clients(self) -> None:
        """Block until `min_clients` live clients have joined (or we are stopping)."""
        with self._cond:
            if len(self._live_clients()) < self.min_clients:
                log.info("waiting for %d clients (%d connected)", self.min_clients, len(self._live_clients()))
            while len(self._live_clients()) < self.min_clients and not self.stopping:
                self._cond.wait(1.0)  # joins wake us at once; the timeout only lets silent clients age out

    def status(self) -> dict[str, Any]:
        """What the server is doing, for `fl-server status` and the metrics endpoint."""
        with self._cond:
            r, now = self._round, self.clock()
            clients = {}
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
                clients[c] = {"state": what, "num_samples": info.num_samples, "device": info.device,
                              "seconds_since_seen": round(now - info.last_seen, 1)}
            return {
                "phase": "finished" if self.finished else "training" if r is not None else "waiting",
                "round": r.number if r is not None else self.model_version + (0 if self.finished else 1),
                "model_version": self.model_version,
                "selected": list(r.selected) if r is not None else [],
                "clients": clients,
                "live_clients": len(self._live_clients()),
                "bytes_received": self.bytes_received,
                "bytes_sent": self.bytes_sent,
            }

    def count_sent(self, nbytes: int) -> None:
        with self._cond:
            self.bytes_sent += nbytes

    def _live_clients(self) -> list[str]:
        now = self.clock()
        return sorted(c for c, info in self.clients.items()
                      if info.polls > 0 or now - info.last_seen <= self.silence_limit)

    def open_round(self) -> list[str]:
        """Sample `clients_per_round` of the live clients and wake them; returns who was selected."""
        with self._cond:
            live = self._live_clients()
            k = min(self.clients_per_round, len(live))
            selected = sorted(self.rng.choice(live, size=k, replace=False).tolist()) if k else []
            now = self.clock()
            with self._fold_lock:
                self._aggregator.reset()
            self._round = _OpenRound(number=self.model_version + 1, selected=selected,
                                     deadline=now + self.round_timeout, started=now, opened_at=time.time(),
                                     population=len(live))
            log.info("round %d started with %s", self._round.number, selected)
            self._cond.notify_all()
            return selected

    def wait_until_complete(self) -> None:
        """Block until every selected client has submitted or fallen silent, the deadline passes, or
        we are stopping."""
        # Zeroing a model-sized sum costs page faults: pay them now, while clients train, not when the
        # first update arrives.
        with self._cond:
            recycle, self._retired = self._retired, None
        sums = self._aggregator.empty_sums(recycle)
        with self._fold_lock:
            self._aggregator.install(sums)
        with self._cond:
            r = self._round
            assert r is not None, "no round is open"
            while not self.stopping:
                self._give_up_on_silent(r)
                remaining = r.deadline - self.clock()
                if r.settled or remaining <= 0:
                    break
                # Submissions wake us at once; the timeout is what notices a silent client.
                self._cond.wait(min(remaining, self.heartbeat_seconds))

    def _give_up_on_silent(self, r: _OpenRound) -> None:
        now = self.clock()
        for c in r.selected:
            if c in r.submitted or c in r.silent or c in r.uploading:
                continue
            silent_for = now - max(self.clients[c].last_seen, r.started)
            if silent_for > self.silence_limit:
                r.silent[c] = f"silent for {silent_for:.1f} s (no heartbeat)"
                log.warning("round %d: client %s %s; giving up on it", r.number, c, r.silent[c])

    def close_round(self) -> RoundOutcome:
        """Close the open round: aggregate if at least `min_fit` updates arrived, else discard them."""
        with self._cond:
            r = self._round
            assert r is not None, "no round is open"
            self._round = None  # no more uploads are accepted into it...
            while r.folding:  # ...and those accepted are all folded in
                self._cond.wait()
            aggregated = len(r.submitted) >= self.min_fit and not self.stopping
            aggregate_started = time.perf_counter()
            if aggregated:
                # The new state is computed in the sums' memory; the old one becomes the next round's
                # sums (wait_until_complete), by which time its evaluation has finished (the
                # coordinator waits for it before opening another round) and no reader is left.
                self._retired = self._global
                with self._fold_lock:
                    self._global = self._aggregator.apply(self._global)
                version = self.model_version + 1
                # Let the old version's serialized form go before making the new one (streams sending it
                # hold their own copy of the snapshot, see model()), so two never sit in memory side by side.
                self._snapshot.wire = None
                snapshot = ModelSnapshot(version, version + 1, tensors.encode(self._global))
                snapshot.wire = self._publish(snapshot)
                self._snapshot = snapshot
            with self._fold_lock:
                self._aggregator.reset()
            self._cond.notify_all()
            reasons = {c: r.silent.get(c, "stopping" if self.stopping else "no update by the round's deadline")
                       for c in r.selected if c not in r.submitted}
            return RoundOutcome(round=r.number, selected=r.selected, contributors=sorted(r.submitted),
                                num_samples=sum(r.submitted.values()), client_metrics=r.metrics,
                                seconds=self.clock() - r.started, aggregated=aggregated, drop_reasons=reasons,
                                opened_at=r.opened_at, closed_at=time.time(), bytes_in=r.bytes_in,
                                aggregate_seconds=time.perf_counter() - aggregate_started, population=r.population)

    def finish(self) -> None:
        with self._cond:
            self.finished = True
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self.stopping = True
            self._cond.notify_all()

