"""What a client does in one round, whoever drives it: the fl-client daemon over the network, or a
simulation in one process (fl_tools.simulation).

    client = ClientRound("3", data, torch.device("cpu"))
    client.configure(cfg)                       # checks the data, holds out the evaluation part
    update = client.prepare(global_state, cfg, round_, should_stop)
    ... send update.header(model_version) and update.payload ...
    client.commit(update)                       # only once the server accepted it

`prepare` evaluates the global model on the held-out data (federated evaluation), trains through a
training function (`TrainFn`; `LocalTraining` is the built-in one), and encodes local - global (integer
and bool tensors: their local values, which cannot wrap) with the round's codec. A training function
gets a `RoundTask` and returns a `TrainOutput`.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from common import codecs, tensors
from common import messages as m
from common.convert import payload_header_of
from common.datasets import ArrayData, BatchLoader, DataError, augmentation_for
from common.models import build_model
from common.parallel import train_data_parallel
from common.partition import client_index
from common.training import TrainingStopped, evaluate, train

log = logging.getLogger("fl_client")
tqdm.monitor_interval = 0  # no monitor thread: the bars are short-lived and only shown on a terminal

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class RoundTask:
    """What a training function is given for one round. One object rather than many arguments, so
    that what is added to it later does not break the functions already written."""

    model: nn.Module  # holds the global state already
    global_state: State  # on the CPU; do not change it
    data: ArrayData  # this client's training data (without the held-out part)
    cfg: m.TrainConfig
    round: int
    seed: int  # torch's global generator is seeded with it already
    device: torch.device
    should_stop: Callable[[], bool]  # True once the round is over: stop (raise TrainingStopped) early


class TrainOutput(NamedTuple):
    state: State  # the trained local weights, on the CPU
    num_samples: int  # the update's weight in the aggregate
    metrics: dict[str, float]  # sent with the update (fl-server records them per client)


TrainFn = Callable[[RoundTask], TrainOutput]


class LocalTraining:
    """The built-in training function: common.training.train on one device, or data-parallel across
    `devices` (two or more), for cfg.local_epochs epochs."""

    def __init__(self, devices: tuple[str, ...] = (), autocast: torch.dtype | None = None, progress: bool = False):
        self.devices = devices
        self.autocast = autocast
        self.progress = progress  # a bar for the local epochs, only ever on a terminal
        # Kept across rounds, so that the data moves to the device once; remade for other data (a new
        # held-out split) or another batch size.
        self._loader: BatchLoader | None = None
        self._loader_data: ArrayData | None = None

    def __call__(self, task: RoundTask) -> TrainOutput:
        cfg, data = task.cfg, task.data
        autocast = self.autocast
        precision = f" ({str(autocast).removeprefix('torch.')} autocast)" if autocast is not None else ""
        if len(self.devices) > 1:
            log.info("round %d: training on %d samples, data-parallel across %s%s", task.round, len(data),
                     ", ".join(self.devices), precision)
            # One process per device for the round's epochs; they cannot be interrupted half-way, so a
            # round that ends meanwhile is noticed once they are done.
            local, result = train_data_parallel(task.global_state, data, cfg, self.devices, task.seed,
                                                autocast=autocast)
        else:
            log.info("round %d: training on %d samples%s", task.round, len(data), precision)
            loader = self._loader_for(data, cfg, task.device)
            loader.generator.manual_seed(task.seed)
            with tqdm(total=cfg.local_epochs, desc=f"round {task.round}", unit="epoch", leave=False,
                      disable=not (self.progress and sys.stderr.isatty())) as bar:
                def on_epoch(_epoch: int, loss: float) -> None:
                    bar.set_postfix(loss=f"{loss:.4f}")
                    bar.update(1)

                result = train(task.model, loader, cfg, task.device, should_stop=task.should_stop,
                               on_epoch=on_epoch, autocast=autocast)
            local = {name: t.detach().cpu() for name, t in task.model.state_dict().items()}
        return TrainOutput(local, result.num_samples, {"train_loss": result.loss, "train_seconds": result.seconds})

    def _loader_for(self, data: ArrayData, cfg: m.TrainConfig, device: torch.device) -> BatchLoader:
        if self._loader is None or self._loader.batch_size != cfg.batch_size or self._loader_data is not data:
            self._loader = BatchLoader(data, cfg.batch_size, shuffle=True, device=device,
                                       augment=augmentation_for(cfg.dataset))
            self._loader_data = data
        return self._loader


@dataclass
class PreparedUpdate:
    """A round's update, ready to send; `commit` it to the ClientRound that made it once accepted."""

    client_id: str
    round: int
    payload: tensors.Payload
    codec: codecs.Codec
    num_samples: int
    metrics: dict[str, float]
    residual: State  # the error-feedback memory as it is once this update has been taken

    def header(self, model_version: int) -> m.UpdateHeader:
        """The header that announces this update, for the global model `model_version` it was trained from."""
        return m.UpdateHeader(
            client_id=self.client_id, round=self.round, model_version=model_version, num_samples=self.num_samples,
            payload=payload_header_of(self.payload, m.Encoding.DIFF, tensors.CHUNK_SIZE, str(self.codec)),
            metrics=dict(self.metrics))


class ClientRound:
    """One client's side of the rounds: its data, held-out loader, model and compression residual."""

    def __init__(self, client_id: str, data: ArrayData, device: torch.device, *, train_fn: TrainFn | None = None,
                 model: nn.Module | None = None,
                 tamper: Callable[[State], State] | None = None):
        """`model`: the module to train in (built from the round's config when None); a simulation
        shares one among its clients. `tamper` changes the diff before it is encoded: an attacker, in
        a study of model poisoning."""
        self.client_id = client_id
        self.index = client_index(client_id)
        self.data = data
        self.device = device
        self.train_fn: TrainFn = train_fn or LocalTraining()
        self.model = model
        self.tamper = tamper
        self.held_out: BatchLoader | None = None  # federated evaluation's part of the data (eval_fraction)
        # Top-k compression's error feedback: what this client has not sent yet, added to its next diff.
        self.residual: State = {}

    def configure(self, cfg: m.TrainConfig) -> None:
        """Check that the data fits the federation's model; hold out cfg.eval_fraction of it (once)."""
        data = self.data
        if data.input_shape != cfg.model.input_shape or data.num_classes != cfg.model.num_classes:
            raise DataError(f"this client's data has samples of shape {list(data.input_shape)} with "
                            f"{data.num_classes} classes, but the federation trains {cfg.model.name} on "
                            f"{list(cfg.model.input_shape)} with {cfg.model.num_classes} classes ({cfg.dataset}); "
                            "give --data a shard of the federation's data set")
        if cfg.eval_fraction > 0 and self.held_out is None and len(data) >= 2:
            # The same part every time (seeded by the client): never trained on.
            order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + self.index))
            cut = min(len(data) - 1, max(1, round(cfg.eval_fraction * len(data))))
            self.held_out = BatchLoader(data.subset(order[:cut]), 256, device=self.device)
            self.data = data.subset(order[cut:])
            log.info("holding out %d samples to evaluate the global model, training on %d", cut, len(self.data))

    def prepare(self, global_state: State, cfg: m.TrainConfig, round_: int,
                should_stop: Callable[[], bool] = lambda: False) -> PreparedUpdate:
        """Evaluate `global_state` on the held-out data, train from it, and encode the diff. Raises
        TrainingStopped when `should_stop` says the round is over."""
        self.configure(cfg)
        if self.model is None:
            self.model = build_model(cfg.model)
        model = self.model
        model.load_state_dict(global_state)
        # Before training, so that it measures the global model, not the local one.
        held_out = {}
        if self.held_out is not None:
            quality = evaluate(model, self.held_out, self.device)
            held_out = {"eval_loss": quality.loss, "eval_samples": float(quality.num_samples)}
            if quality.accuracy == quality.accuracy:  # not NaN (an autoencoder has none)
                held_out["eval_accuracy"] = quality.accuracy
        # Seeded by (client, round), not by how many rounds this process happens to have run: a round
        # re-run after a server restart trains exactly as the first attempt did.
        seed = cfg.seed + self.index + 100_003 * round_
        torch.manual_seed(seed)
        local, num_samples, metrics = self.train_fn(
            RoundTask(model, global_state, self.data, cfg, round_, seed, self.device, should_stop))
        if should_stop():
            raise TrainingStopped
        # Floating-point tensors travel as local - global; integer and bool ones (BatchNorm's counters, a
        # uint8 or bool buffer) as the local values themselves, which cannot wrap around (see
        # fl_server/aggregation/values.py; torch cannot even subtract bools).
        diff = {name: local[name] - g if g.is_floating_point() else local[name].to(g.dtype, copy=True)
                for name, g in global_state.items()}
        if self.tamper is not None:
            diff = self.tamper(diff)
        codec = codecs.parse(cfg.compression)
        # A copy: the memory moves on only in commit, so that a refused or discarded attempt does not
        # leave its residual behind for the retry.
        residual = dict(self.residual)
        payload = tensors.encode(codecs.encode(diff, codec, residual))
        return PreparedUpdate(self.client_id, round_, payload, codec, num_samples, {**metrics, **held_out}, residual)

    def commit(self, update: PreparedUpdate) -> None:
        """The server took `update`: what it left unsent is what the next diff adds."""
        self.residual = update.residual
