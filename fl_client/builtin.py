"""The built-in training: an app like any user's (fl_client.task), and fl-client's default.

It trains the federation's model (built from the round's model spec) with common.training.train on
this client's data: `--data DIR` (a shard, an image folder or a CSV file, common.local_data), or else
its share of the federation's data set. When the server asks for federated evaluation, it holds out
`eval_fraction` of the data (the same part every round, never trained on) and evaluates each global
model on it before training.
"""
from __future__ import annotations

import logging
import sys

import torch
from torch import nn
from tqdm import tqdm

from common import messages as m
from common.datasets import NO_DATASET, ArrayData, BatchLoader, DataError, augmentation_for, load_dataset
from common.models import build_model, is_custom
from common.parallel import train_data_parallel
from common.partition import client_index, client_share
from common.training import evaluate, train
from fl_client.task import Evaluation, Result, Task

log = logging.getLogger("fl_client")
tqdm.monitor_interval = 0  # no monitor thread: the bars are short-lived and only shown on a terminal


class BuiltinTraining:
    """`train(task)` and `evaluate(task)` for fl-client's default app. One per client: it keeps the
    client's data, its held-out part and the model across rounds."""

    def __init__(self, data: ArrayData | None = None, *, data_dir: str | None = None, data_root: str = "data",
                 download: bool = False, devices: tuple[str, ...] = (), autocast: torch.dtype | None = None,
                 progress: bool = False, allowed_models: tuple[str, ...] = (), model: nn.Module | None = None):
        """`data`: the client's samples; else read from `data_dir`, or else its share of the federation's
        data set under `data_root`. `devices`: two or more train data-parallel (common.parallel).
        `allowed_models`: custom model classes the server may have this client build. `model`: the module to
        train in (built from the round's spec when None); a simulation shares one among its clients."""
        self.data = data
        self.data_dir = data_dir
        self.data_root, self.download = data_root, download
        self.devices = devices
        self.autocast = autocast
        self.progress = progress  # a bar for the local epochs, only ever on a terminal
        self.allowed_models = allowed_models
        self.model = model
        self.held_out: BatchLoader | None = None  # federated evaluation's part of the data (eval_fraction)
        self._configured = False
        # Kept across rounds, so that the data moves to the device once; remade for another batch size.
        self._loader: BatchLoader | None = None

    def configure(self, client_id: str, cfg: m.TrainConfig, device: torch.device) -> None:
        """Load the data (once), check that it fits the federation's model, hold out cfg.eval_fraction of it."""
        if not cfg.model.name:
            raise DataError("the federation has no model class (its server federates a weights file as it is), "
                            "so the built-in training has nothing to build; train with your own code: --app "
                            "MODULE:FUNCTION")
        if is_custom(cfg.model.name) and cfg.model.name not in self.allowed_models:
            raise DataError(f"the server asks this client to build the model class {cfg.model.name!r}; importing "
                            f"it runs its code, so start fl-client with --allow-model {cfg.model.name} if you "
                            "trust it")
        if self.model is None:
            # Built now, while the client waits for a round: a class that cannot be imported or built is
            # the same error every round, so it ends the client in one sentence.
            try:
                self.model = build_model(cfg.model)
            except ValueError as e:
                raise DataError(str(e)) from None
        if self.data is None:
            self.data = self._load(client_id, cfg)
        data = self.data
        if data.input_shape != cfg.model.input_shape or data.num_classes != cfg.model.num_classes:
            raise DataError(f"this client's data has samples of shape {list(data.input_shape)} with "
                            f"{data.num_classes} classes, but the federation trains {cfg.model.name} on "
                            f"{list(cfg.model.input_shape)} with {cfg.model.num_classes} classes"
                            + (f" ({cfg.dataset})" if cfg.dataset != NO_DATASET else "")
                            + "; give --data this federation's kind of data")
        if cfg.eval_fraction > 0 and self.held_out is None and len(data) >= 2:
            # The same part every time (seeded by the client): never trained on.
            generator = torch.Generator().manual_seed(cfg.seed + client_index(client_id))
            order = torch.randperm(len(data), generator=generator)
            cut = min(len(data) - 1, max(1, round(cfg.eval_fraction * len(data))))
            self.held_out = BatchLoader(data.subset(order[:cut]), 256, device=device)
            self.data = data.subset(order[cut:])
            self._loader = None  # made again over the training part only
            log.info("holding out %d samples to evaluate the global model, training on %d", cut, len(self.data))
        self._configured = True

    def _load(self, client_id: str, cfg: m.TrainConfig) -> ArrayData:
        if self.data_dir is not None:
            from common.local_data import load_client_data

            data = load_client_data(self.data_dir, cfg)
            log.info("training on %s: %d samples", self.data_dir, len(data))
            return data
        train_data, _ = load_dataset(cfg.dataset, self.data_root, self.download, classes=cfg.classes)
        index = client_index(client_id)
        data = client_share(train_data, index, cfg.num_clients, cfg.seed, cfg.partition)
        log.info("training on share %d of %d of %s (%s): %d samples", index, cfg.num_clients, cfg.dataset,
                 cfg.partition, len(data))
        return data

    def _model(self, task: Task) -> nn.Module:
        if self.model is None:
            self.model = build_model(task.config.model)
        self.model.load_state_dict(task.global_state)
        return self.model

    def evaluate(self, task: Task) -> Evaluation | None:
        """The global model on the held-out part (before training, so that it measures the global model)."""
        self.configure(task.client_id, task.config, task.device)
        if self.held_out is None:
            return None
        quality = evaluate(self._model(task), self.held_out, task.device)
        accuracy = None if quality.accuracy != quality.accuracy else quality.accuracy  # NaN: an autoencoder has none
        return Evaluation(quality.loss, quality.num_samples, accuracy)

    def train(self, task: Task) -> Result:
        self.configure(task.client_id, task.config, task.device)
        assert self.data is not None, "configure loads it"
        cfg, data, autocast = task.config, self.data, self.autocast
        precision = f" ({str(autocast).removeprefix('torch.')} autocast)" if autocast is not None else ""
        if len(self.devices) > 1:
            log.info("round %d: training on %d samples, data-parallel across %s%s", task.round, len(data),
                     ", ".join(self.devices), precision)
            # One process per device for the round's epochs; they cannot be interrupted half-way, so a
            # round that ends meanwhile is noticed once they are done.
            local, result = train_data_parallel(task.global_state, data, cfg, self.devices, task.seed,
                                                autocast=autocast)
            weights: nn.Module | dict[str, torch.Tensor] = local
        else:
            log.info("round %d: training on %d samples%s", task.round, len(data), precision)
            model = self._model(task)
            loader = self._loader_for(data, cfg, task.device)
            loader.generator.manual_seed(task.seed)
            if not (self.progress and sys.stderr.isatty()):  # no bar to show: none made, each round
                result = train(model, loader, cfg, task.device, should_stop=task.should_stop, autocast=autocast)
            else:
                with tqdm(total=cfg.local_epochs, desc=f"round {task.round}", unit="epoch", leave=False) as bar:
                    def on_epoch(_epoch: int, loss: float) -> None:
                        bar.set_postfix(loss=f"{loss:.4f}")
                        bar.update(1)

                    result = train(model, loader, cfg, task.device, should_stop=task.should_stop,
                                   on_epoch=on_epoch, autocast=autocast)
            weights = model
        return Result(weights, result.num_samples, {"train_loss": result.loss, "train_seconds": result.seconds})

    def _loader_for(self, data: ArrayData, cfg: m.TrainConfig, device: torch.device) -> BatchLoader:
        if self._loader is None or self._loader.batch_size != cfg.batch_size:
            self._loader = BatchLoader(data, cfg.batch_size, shuffle=True, device=device,
                                       augment=augmentation_for(cfg.dataset))
        return self._loader

    @property
    def num_samples(self) -> int:
        """What this client trains on; 0 while its data is not loaded yet."""
        return len(self.data) if self.data is not None else 0
