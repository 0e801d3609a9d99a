"""A simulated client, wherever it runs: where its samples come from (`ClientData`) and its round
(`train_round`: the `Task`, the built-in app through `run_app`). The in-process backend
(fl_tools.simulation) and the Ray backend (fl_tools.ray_backend) call the same functions, then the same
`ClientRound.prepare`, so that the two differ only in where a client's round runs.

A client is materialized where it runs, when it is first needed: its samples are read from its own shard
(by path, on storage every worker can read) or cut from the data set loaded there, never shipped from the
driver. The data set and its split are cached per process, so that a worker that runs a hundred clients
loads the data set once, not a hundred times.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common import messages as m
from common.datasets import ArrayData, DataError, load_dataset
from common.models import build_model
from common.partition import read_shard, split_indices
from fl_client.builtin import BuiltinTraining
from fl_client.round import seed_for
from fl_client.task import Result, Task, run_app


@dataclass(frozen=True)
class ClientResult:
    """One client's round as it ran: where (the Ray node's id, or "local"), in which process, how long."""

    round: int
    client_id: str
    node_id: str
    pid: int
    seconds: float


@dataclass(frozen=True)
class ClientData:
    """Where simulated clients' training samples come from, by name rather than by value, so that each
    client's share is loaded where the client runs.

    `dataset` (with `data_root`): a data set `load_dataset` knows, cut into the federation's shares by
    the run's partition, seed and number of clients (`client_share`'s cut). `shards`: a folder of
    `fl-partition` shards, client i reading `shards/shard{i}` (the partition is then the one the shards
    were written with). `within=(i, n)`: only client i of n's data, to be the whole of a one-client
    federation: IID share i of n of the data set, or shard i. That is the baseline of a client training
    alone on its own share."""

    dataset: str = ""
    data_root: str = "data"
    shards: str = ""
    classes: str = ""
    within: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if bool(self.dataset) == bool(self.shards):
            raise ValueError("ClientData takes a data set name or a folder of shards, exactly one of them")

    def describe(self) -> str:
        return f"shards in {self.shards}" if self.shards else self.dataset

    def share(self, index: int, num_clients: int, seed: int, partition: str) -> ArrayData:
        """Client `index`'s samples: the same ones `client_share` gives for the same arguments."""
        if self.shards:
            if self.within is not None:
                index = self.within[0]
            return read_shard(Path(self.shards) / f"shard{index}")
        if not 0 <= index < num_clients:
            raise DataError(f"client index {index} is outside the federation's {num_clients} clients")
        return self.train(seed).subset(_split(self, num_clients, seed, partition)[index])

    def train(self, seed: int) -> ArrayData:
        """The training samples shares are cut from (this process's cached copy)."""
        train = cached_dataset(self.dataset, self.data_root, self.classes)[0]
        if self.within is None:
            return train
        index, of = self.within
        return train.subset(_within(self.dataset, self.data_root, self.classes, of, seed)[index])


# Per process: the driver's, or a Ray worker's, which runs many clients one after the other. Data sets
# are few (one per study, two when a study compares them), hence the small bound.
@functools.lru_cache(maxsize=4)
def cached_dataset(name: str, root: str, classes: str = "") -> tuple[ArrayData, ArrayData]:
    """(train, test) of a data set, loaded once per process."""
    return load_dataset(name, root, classes=classes)


@functools.lru_cache(maxsize=4)
def _within(name: str, root: str, classes: str, of: int, seed: int) -> list[np.ndarray]:
    return split_indices(cached_dataset(name, root, classes)[0].y.numpy(), of, "iid", seed)


@functools.lru_cache(maxsize=16)
def _split(source: ClientData, num_clients: int, seed: int, partition: str) -> list[np.ndarray]:
    """Every client's sample indices at once: a split costs a pass over the labels (Dirichlet's several),
    and a thousand clients would otherwise pay it a thousand times."""
    return split_indices(source.train(seed).y.numpy(), num_clients, partition, seed)


@functools.lru_cache(maxsize=2)
def shared_model(spec: m.ModelSpec) -> nn.Module:
    """One module per process for every client it runs (they train one after the other): each round
    loads the global state into it, so its own initial weights never matter."""
    return build_model(spec)


def train_round(training: BuiltinTraining, cfg: m.TrainConfig, client_id: str, round_: int,
                global_state: dict[str, torch.Tensor], device: torch.device,
                should_stop: Callable[[], bool] = lambda: False) -> tuple[Task, Result]:
    """One client's round as fl-client runs it (fl_client.api): the same `Task`, seeded by (client,
    round), and the built-in app through `run_app` (federated evaluation first, when asked, then
    training). The caller encodes the result with the client's `ClientRound.prepare`."""
    task = Task(client_id=client_id, round=round_, config=cfg, global_state=global_state, device=device,
                seed=seed_for(cfg, client_id, round_), _should_stop=should_stop)
    trained = run_app(task, training.train, training.evaluate)
    assert trained is not None, "the built-in training returns its result"
    return task, trained
