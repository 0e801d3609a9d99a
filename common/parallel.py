"""A client's local epochs, data-parallel across several devices (torch.distributed).

One process per device, started for the round: each builds the model from the round's global state,
wraps it in DistributedDataParallel (NCCL on GPUs, gloo on CPUs) and trains on its slice of every
batch; DDP averages the gradients, so the step is the one a single process would take on the whole
batch. Rank 0 hands back the trained state. The batch size stays the federation's: each of N devices
takes batch_size / N samples of each batch.
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import ProcessException  # the module, not torch.multiprocessing.spawn()
from torch.nn.parallel import DistributedDataParallel

from common import logs
from common.datasets import ArrayData, BatchLoader, augmentation_for
from common.messages import TrainConfig
from common.models import build_model
from common.training import TrainResult, train

log = logging.getLogger("common.parallel")


class DataParallelError(RuntimeError):
    """A training process failed; the client reports it in one line."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, devices: Sequence[str], state: dict[str, torch.Tensor],
            data: ArrayData, cfg: TrainConfig, seed: int, out: str, autocast: torch.dtype | None) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank)
    try:
        device = torch.device(devices[rank])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(1)  # one core per process
        torch.manual_seed(seed)
        model = build_model(cfg.model)
        model.load_state_dict(state)
        model.to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        # Every rank shuffles with the same seed, so all see the same batches and take their own shares.
        loader = BatchLoader(data, cfg.batch_size, shuffle=True, seed=seed, device=device,
                             augment=augmentation_for(cfg.dataset), shard=(rank, world))
        result = train(ddp, loader, cfg, device, autocast=autocast)
        totals = torch.tensor([result.loss * result.num_samples, float(result.num_samples)], device=device)
        dist.all_reduce(totals)
        if rank == 0:
            local = {name: t.detach().cpu() for name, t in model.state_dict().items()}
            torch.save({"state": local, "loss": float(totals[0] / totals[1]), "num_samples": int(totals[1]),
                        "seconds": result.seconds}, out + ".tmp")
            os.replace(out + ".tmp", out)  # whole or absent
        # Leave together: a rank that tears its process group down while a peer still talks to it can
        # abort gloo's transport threads ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def train_data_parallel(state: dict[str, torch.Tensor], data: ArrayData, cfg: TrainConfig,
                        devices: Sequence[torch.device | str], seed: int,
                        autocast: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], TrainResult]:
    """Train from `state` for cfg.local_epochs on `data` across `devices` (one process each); returns the
    trained state and the training result (mean loss and samples over all devices). `autocast`: as in
    common.training.train."""
    names = [str(d) for d in devices]
    if len(names) < 2:
        raise ValueError("data-parallel training needs at least 2 devices")
    backend = "nccl" if all(n.startswith("cuda") for n in names) else "gloo"
    with tempfile.TemporaryDirectory(prefix="fl-ddp-") as tmp:
        out = str(Path(tmp) / "trained.pt")
        try:
            torch.multiprocessing.spawn(_worker, args=(len(names), _free_port(), backend, names, state, data, cfg,
                                                       seed, out, autocast), nprocs=len(names), join=True)
        except ProcessException as e:
            # gloo can abort a process as it exits, after the work is done and saved; only a missing result
            # is a failure.
            if not os.path.exists(out):
                reason = logs.brief(e, line=-1, limit=300)
                raise DataParallelError(f"data-parallel training across {', '.join(names)} failed ({reason}); "
                                        "check the devices, or train on one with --device") from None
            log.warning("a training process ended abnormally after saving the round's result (%s); using it", e)
        trained = torch.load(out, weights_only=True)
    return trained["state"], TrainResult(loss=trained["loss"], num_samples=trained["num_samples"],
                                         seconds=trained["seconds"])
