"""The client daemon's loop: join, fetch, train, submit; until the server says training is finished."""
from __future__ import annotations

import logging
import sys
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import torch
from tqdm import tqdm

from common import codecs, tensors
from common import messages as m
from common.convert import payload_header_of
from common.datasets import ArrayData, BatchLoader, DataError, augmentation_for, load_dataset
from common.models import build_model, is_custom
from common.parallel import train_data_parallel
from common.partition import client_share
from common.training import TrainingStopped, evaluate, train
from fl_client.connection import RequestRefusedError, ServerConnection

log = logging.getLogger("fl_client")
tqdm.monitor_interval = 0  # no monitor thread: the bars are short-lived and only shown on a terminal


def client_index(client_id: str) -> int:
    """A number for seeding and for picking a share of the built-in data: the id itself when numeric."""
    return int(client_id) if client_id.isdigit() else zlib.crc32(client_id.encode()) % 1_000_000


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
        self.data = options.data
        self._loader: BatchLoader | None = None
        self.held_out: BatchLoader | None = None  # federated evaluation's part of the data (eval_fraction)
        self._model: torch.nn.Module | None = None
        # Top-k compression's error feedback: what this client has not sent yet, added to its next diff.
        self._residual: dict[str, torch.Tensor] = {}
        self.rounds_trained = 0

    def run(self) -> None:
        """Serve rounds until the server answers FINISHED."""
        while True:
            decision = self.connection.join(m.JoinRequest(
                client_id=self.client_id, num_samples=len(self.data) if self.data is not None else 0,
                device=str(self.options.device)))
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
        if self.data is None:
            train_data, _ = load_dataset(cfg.dataset, self.options.data_root, self.options.download)
            self.data = client_share(train_data, client_index(self.client_id), cfg.num_clients, cfg.seed,
                                     cfg.partition)
            log.info("training on share %d of %d of %s (%s): %d samples", client_index(self.client_id),
                     cfg.num_clients, cfg.dataset, cfg.partition, len(self.data))
        if self.data.input_shape != cfg.model.input_shape or self.data.num_classes != cfg.model.num_classes:
            raise DataError(f"this client's data has samples of shape {list(self.data.input_shape)} with "
                            f"{self.data.num_classes} classes, but the federation trains {cfg.model.name} on "
                            f"{list(cfg.model.input_shape)} with {cfg.model.num_classes} classes ({cfg.dataset}); "
                            "give --data a shard of the federation's data set")
        if cfg.eval_fraction > 0 and self.held_out is None and len(self.data) >= 2:
            # Once, and the same part every time (seeded by the client): never trained on.
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(
                cfg.seed + client_index(self.client_id)))
            cut = min(len(self.data) - 1, max(1, round(cfg.eval_fraction * len(self.data))))
            self.held_out = BatchLoader(self.data.subset(order[:cut]), 256, device=self.options.device)
            self.data = self.data.subset(order[cut:])
            self._loader = None
            log.info("holding out %d samples to evaluate the global model, training on %d", cut, len(self.data))
        # Data-parallel rounds give each worker process its own loader (common.parallel); this one would
        # only hold a second copy of the data on the first device.
        if not self._data_parallel and (self._loader is None or self._loader.batch_size != cfg.batch_size):
            self._loader = BatchLoader(self.data, cfg.batch_size, shuffle=True, device=self.options.device,
                                       augment=augmentation_for(cfg.dataset))

    @property
    def _data_parallel(self) -> bool:
        return len(self.options.devices) > 1

    def train_round(self, decision: m.JoinDecision) -> m.SubmitResult:
        heartbeat_request = m.JoinRequest(client_id=self.client_id, num_samples=len(self.data),
                                          device=str(self.options.device), training_round=decision.round)
        with Heartbeat(self.connection, heartbeat_request, decision.heartbeat_seconds) as heartbeat:
            return self._train_round(decision, heartbeat.round_over.is_set)

    def _train_round(self, decision: m.JoinDecision, round_over: Callable[[], bool]) -> m.SubmitResult:
        cfg = decision.config
        header, global_state = self.connection.fetch_model(
            m.ModelRequest(client_id=self.client_id, model_version=decision.model_version))
        if self._model is None:
            self._model = build_model(cfg.model)
        model = self._model
        model.load_state_dict(global_state)  # data-parallel rounds use it only for the held-out evaluation
        # Federated evaluation: how the model this round starts from does on data this client never
        # trains on. Before training, so that it measures the global model, not the local one.
        held_out = {}
        if self.held_out is not None:
            quality = evaluate(model, self.held_out, self.options.device)
            held_out = {"eval_loss": quality.loss, "eval_samples": float(quality.num_samples)}
            if quality.accuracy == quality.accuracy:  # not NaN (an autoencoder has none)
                held_out["eval_accuracy"] = quality.accuracy
        # Seeded by (client, round), not by how many rounds this process happens to have run: a round
        # re-run after a server restart trains exactly as the first attempt did.
        seed = cfg.seed + client_index(self.client_id) + 100_003 * decision.round
        torch.manual_seed(seed)
        autocast = self.options.autocast
        precision = f" ({str(autocast).removeprefix('torch.')} autocast)" if autocast is not None else ""
        if self._data_parallel:
            log.info("round %d: training on %d samples, data-parallel across %s%s", decision.round, len(self.data),
                     ", ".join(self.options.devices), precision)
            # One process per device for the round's epochs; they cannot be interrupted half-way, so a
            # round that ends meanwhile is noticed once they are done.
            local, result = train_data_parallel(global_state, self.data, cfg, self.options.devices, seed,
                                                autocast=autocast)
        else:
            log.info("round %d: training on %d samples%s", decision.round, len(self.data), precision)
            self._loader.generator.manual_seed(seed)
            with tqdm(total=cfg.local_epochs, desc=f"round {decision.round}", unit="epoch", leave=False,
                      disable=not (self.options.progress and sys.stderr.isatty())) as bar:
                def on_epoch(_epoch: int, loss: float) -> None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)

                result = train(model, self._loader, cfg, self.options.device, should_stop=round_over,
                               on_epoch=on_epoch, autocast=autocast)
            local = {name: t.detach().cpu() for name, t in model.state_dict().items()}
        if round_over():
            raise TrainingStopped
        diff = {name: local[name] - global_state[name] for name in global_state}
        codec = codecs.parse(cfg.compression)
        # The error-feedback memory moves on only once the server has taken this update: a refused or
        # discarded attempt must not leave its residual behind for the retry.
        residual = dict(self._residual)
        payload = tensors.encode(codecs.encode(diff, codec, residual))
        update = m.UpdateHeader(
            client_id=self.client_id, round=decision.round, model_version=header.model_version,
            num_samples=result.num_samples,
            payload=payload_header_of(payload, m.Encoding.DIFF, tensors.CHUNK_SIZE, str(codec)),
            metrics={"train_loss": result.loss, "train_seconds": result.seconds, **held_out})
        reply = self.connection.submit(update, payload)
        if reply.accepted:
            self._residual = residual
        self.rounds_trained += 1
        log.info("round %d: trained %d samples in %.2f s (loss %.4f); server: %s", decision.round,
                 result.num_samples, result.seconds, result.loss, reply.message)
        return reply
