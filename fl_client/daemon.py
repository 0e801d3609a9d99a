"""The client daemon's loop: join, fetch the model, do the round (fl_client.round), submit; until the
server says training is finished."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch

from common import messages as m
from common.datasets import ArrayData, DataError, load_dataset
from common.models import is_custom
from common.partition import client_index, client_share
from common.training import TrainingStopped
from fl_client.connection import RequestRefusedError, ServerConnection
from fl_client.round import ClientRound, LocalTraining

log = logging.getLogger("fl_client")


class Heartbeat:
    """Tells the server, every few seconds while this client works on a round, that it is alive; and
    notices when the server says the round is over, so the work can stop early."""

    def __init__(self, connection: ServerConnection, request: m.JoinRequest, interval: float):
        self.connection = connection
        self.request = request
        self.interval = interval
        self.round_over = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            reply = self.connection.heartbeat(self.request, timeout=max(self.interval, 1.0))
            if reply is None:
                log.warning("round %d: heartbeat not delivered; carrying on", self.request.training_round)
            elif reply.action is not m.Action.TRAIN or reply.round != self.request.training_round:
                log.info("round %d: %s", self.request.training_round, reply.message or "round is over")
                self.round_over.set()
                return

    def __enter__(self) -> Heartbeat:
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


@dataclass
class ClientOptions:
    client_id: str
    device: torch.device
    data: ArrayData | None = None  # the client's own shard; None = its share of the federation's data set
    data_root: str = "data"  # where the federation's data set lives, when `data` is None
    download: bool = False  # fetch a torchvision data set into data_root when missing
    progress: bool = True  # a progress bar for the local epochs (only ever on a terminal)
    devices: tuple[str, ...] = ()  # two or more: train data-parallel across them (common.parallel)
    allowed_models: tuple[str, ...] = ()  # custom model classes (package.module:Class) the server may name
    autocast: torch.dtype | None = None  # train in this lower precision where safe (common.training.train)


class ClientDaemon:
    def __init__(self, options: ClientOptions, connection: ServerConnection):
        self.options = options
        self.connection = connection
        self.client_id = options.client_id
        self.client: ClientRound | None = None  # once the data is known (the first join's config names it)
        self.rounds_trained = 0

    @property
    def num_samples(self) -> int:
        """What this client trains on; 0 while its share of the federation's data is not loaded yet."""
        data = self.client.data if self.client is not None else self.options.data
        return len(data) if data is not None else 0

    def run(self) -> None:
        """Serve rounds until the server answers FINISHED."""
        while True:
            decision = self.connection.join(m.JoinRequest(
                client_id=self.client_id, num_samples=self.num_samples, device=str(self.options.device)))
            if decision.action is m.Action.FINISHED:
                log.info("server says training is finished after %d round(s) here", self.rounds_trained)
                return
            self._prepare(decision.config)
            if decision.action is m.Action.WAIT:
                if decision.retry_after:
                    time.sleep(decision.retry_after)
                continue
            try:
                self.train_round(decision)
            except TrainingStopped:
                log.info("round %d: abandoned; joining again", decision.round)
            except RequestRefusedError as e:
                if e.code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED):
                    raise
                # The round closed or moved on while we trained (or the server restarted and does not
                # know us yet), or an earlier attempt of this upload is still being wound up there:
                # resynchronize by joining again.
                log.warning("round %d: update not taken (%s); joining again", decision.round, e.details)
                if e.code is grpc.StatusCode.ABORTED:
                    time.sleep(1.0)

    def _prepare(self, cfg: m.TrainConfig) -> None:
        """Load the data (once) and check that it fits the federation's model."""
        if is_custom(cfg.model.name) and cfg.model.name not in self.options.allowed_models:
            raise DataError(f"the server asks this client to build the model class {cfg.model.name!r}; importing "
                            f"it runs its code, so start fl-client with --allow-model {cfg.model.name} if you "
                            "trust it")
        if self.client is None:
            data = self.options.data
            if data is None:
                train_data, _ = load_dataset(cfg.dataset, self.options.data_root, self.options.download)
                data = client_share(train_data, client_index(self.client_id), cfg.num_clients, cfg.seed,
                                    cfg.partition)
                log.info("training on share %d of %d of %s (%s): %d samples", client_index(self.client_id),
                         cfg.num_clients, cfg.dataset, cfg.partition, len(data))
            training = LocalTraining(self.options.devices, self.options.autocast, self.options.progress)
            self.client = ClientRound(self.client_id, data, self.options.device, train_fn=training)
        self.client.configure(cfg)

    def train_round(self, decision: m.JoinDecision) -> m.SubmitResult:
        heartbeat_request = m.JoinRequest(client_id=self.client_id, num_samples=self.num_samples,
                                          device=str(self.options.device), training_round=decision.round)
        with Heartbeat(self.connection, heartbeat_request, decision.heartbeat_seconds) as heartbeat:
            return self._train_round(decision, heartbeat.round_over.is_set)

    def _train_round(self, decision: m.JoinDecision, round_over: Callable[[], bool]) -> m.SubmitResult:
        assert self.client is not None, "_prepare comes first"
        header, global_state = self.connection.fetch_model(
            m.ModelRequest(client_id=self.client_id, model_version=decision.model_version))
        update = self.client.prepare(global_state, decision.config, decision.round, round_over)
        reply = self.connection.submit(update.header(header.model_version), update.payload)
        if reply.accepted:
            self.client.commit(update)
        self.rounds_trained += 1
        log.info("round %d: trained %d samples in %.2f s (loss %.4f); server: %s", decision.round,
                 update.num_samples, update.metrics.get("train_seconds", float("nan")),
                 update.metrics.get("train_loss", float("nan")), reply.message)
        return reply
