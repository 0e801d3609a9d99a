"""A federation simulated through the server's own classes: `RoundState` (validation, sampling,
aggregation) and each client's own round (fl_client.round: federated evaluation, training,
compression), without the network. For experiments that are about learning, not transport:
fl-experiment, model poisoning (fl_tools.poisoning), differential privacy (bench/privacy.py), accuracy
on real data (tests).

Two backends run the clients' rounds: in this process, one after the other (the default, and the
reference), or as Ray tasks on a local Ray instance or a cluster (fl_tools.ray_backend,
docs/simulation.md). Both run the same client round (fl_tools.clients) and the same server side here, so
the same seeds give the same models on either.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import torch

from common import tensors
from common.datasets import ArrayData, BatchLoader, model_spec_for
from common.messages import JoinRequest, TrainConfig
from common.models import build_model
from common.partition import client_share, split_indices
from common.secure_rounds import default_neighbours, default_threshold
from common.training import EvalResult, evaluate
from fl_client.builtin import BuiltinTraining
from fl_client.round import ClientRound, PreparedUpdate, State
from fl_client.secure import SecureRound
from fl_client.task import Result, Task
from fl_server.aggregation import make_aggregator
from fl_server.aggregation.secure import SecureSum
from fl_server.errors import InvalidUpdateError, NotSelectedError, StaleRoundError
from fl_server.membership import RandomSelector
from fl_server.round_types import RoundOutcome
from fl_server.rounds import RoundRules, RoundState
from fl_tools.clients import ClientData, ClientResult, train_round
from fl_tools.ray_backend import RayOptions, SimulationError

Tamper = Callable[[int, State], State]  # (client index, diff) -> sent diff
BACKENDS = ("inprocess", "ray")
# A round that ends without enough updates because clients were lost (a dead worker, the deadline) is
# re-run with a fresh sample, as fl-server does; this many times in a row, and the study stops.
MAX_ROUND_ATTEMPTS = 3

__all__ = ["BACKENDS", "ClientData", "ClientResult", "RayOptions", "SimulationError", "run"]


def _tamper_of(tamper: Tamper | None, index: int) -> Callable[[State], State] | None:
    return None if tamper is None else lambda diff: tamper(index, diff)


class _InProcess:
    """The reference backend: every client in this process, one after the other, materialized (its share
    cut, its held-out part chosen) the first time it is selected."""

    def __init__(self, train: ArrayData | ClientData, test: ArrayData, net: torch.nn.Module, cfg: TrainConfig):
        self.data, self.cfg = train, cfg
        # One model for all the clients (they train one after the other): a thousand clients hold a
        # thousand shares, not a thousand models.
        self.net, self.device = net, torch.device("cpu")
        self.test_loader = BatchLoader(test, 1000)
        self.trainings: dict[str, BuiltinTraining] = {}
        self._parts: list | None = None

    def training(self, client: str) -> BuiltinTraining:
        if client not in self.trainings:
            index, cfg = int(client), self.cfg
            if isinstance(self.data, ClientData):
                data = self.data.share(index, cfg.num_clients, cfg.seed, cfg.partition)
            else:
                if self._parts is None:  # client_share's cut, made once for all the clients
                    client_share(self.data, index, cfg.num_clients, cfg.seed, cfg.partition)  # its checks
                    self._parts = split_indices(self.data.y.numpy(), cfg.num_clients, cfg.partition, cfg.seed)
                data = self.data.subset(self._parts[index])
            training = BuiltinTraining(data, model=self.net)
            training.configure(client, cfg, self.device)
            self.trainings[client] = training
        return self.trainings[client]

    def train(self, client: str, start: State, round_: int) -> tuple[Task, Result]:
        return train_round(self.training(client), self.cfg, client, round_, start, self.device)

    def run_round(self, selected: list[str], members: dict[str, ClientRound], start: State,
                  round_: int) -> Iterator[tuple[str, PreparedUpdate | str, ClientResult | None]]:
        """Each selected client's update in turn. No deadline: the clients run one after the other, so a
        round takes the sum of their times, and nothing here can be lost or hang."""
        for client in selected:
            began = time.perf_counter()
            task, trained = self.train(client, start, round_)
            update = members[client].prepare(start, task, trained)
            yield client, update, ClientResult(round_, client, "local", os.getpid(), time.perf_counter() - began)

    def evaluate(self, state: State) -> EvalResult:
        self.net.load_state_dict(state)
        return evaluate(self.net, self.test_loader, self.device)


def run(train_data: ArrayData | ClientData, test_data: ArrayData, *, model: str = "mlp", clients: int = 10,
        rounds: int = 5, local_epochs: int = 2, aggregator: str = "fedavg", seed: int = 0,
        tamper: Tamper | None = None, on_round: Callable[[int, EvalResult], None] | None = None,
        clients_per_round: int | None = None, dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0,
        partition: str = "iid", mu: float = 0.0, lr: float = 0.05, optimizer: str = "sgd", dataset: str = "",
        on_final: Callable[[dict[str, torch.Tensor]], None] | None = None, compression: str = "none",
        eval_fraction: float = 0.0, on_outcome: Callable[[RoundOutcome], None] | None = None,
        secure_aggregation: bool = False, secagg_neighbours: int = 0, secagg_threshold: int = 0,
        drop_after_keys: Callable[[int, list[str]], list[str]] | None = None, batch_size: int = 32,
        backend: str = "inprocess", ray: RayOptions | None = None, round_timeout: float = 600.0,
        min_fit: int = 1, on_client: Callable[[ClientResult], None] | None = None) -> float:
    """Train `rounds` rounds of `clients_per_round` sampled clients (all by default) on shares of
    `train_data` split by `partition`; return the final test accuracy, and give `on_round` the test
    result of every round. `train_data` is the samples themselves, or where each client loads its own
    (`ClientData`: a data set by name, or shards by path; the way for the Ray backend, whose workers then
    load only their clients' data). `tamper` may change what a client sends (an attack); updates the
    server refuses are skipped. `mu` > 0 is FedProx. `on_final` is given the final global model.
    `dataset` names the data set, for its training augmentation (CIFAR's). `compression` and
    `eval_fraction` are fl-server's options of those names; `on_outcome` is given each round's outcome
    as the server records it (the clients' metrics, federated evaluation's among them; the clients
    dropped, and why, in drop_reasons). `secure_aggregation` runs each round through secure aggregation's
    stages (fl_server/secure.py) with the clients' own secure rounds (fl_client/secure.py);
    `drop_after_keys(round, selected)` names clients that vanish after the key exchange, before their
    masked upload.

    `backend`: "inprocess" (the reference) or "ray" (each client's round a Ray task, `ray` saying where
    and with what resources; `tamper` is then pickled with each task). On Ray a round takes the updates
    that are in by `round_timeout` seconds (in-process, whose clients run one after the other, has no
    deadline) and is aggregated with at least `min_fit` of them; a round short of them because clients
    were lost is re-run with a fresh sample, at most MAX_ROUND_ATTEMPTS times in a row (then
    SimulationError). `on_client` is told where each client's round ran."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
    if backend == "ray" and secure_aggregation:
        raise ValueError("secure aggregation runs on the in-process backend only: its key exchange and "
                         "unmasking talk to the round state between the clients' steps")
    per_round = clients_per_round or clients
    spec = model_spec_for(model, test_data if isinstance(train_data, ClientData) else train_data)
    cfg = TrainConfig(model=spec, dataset=dataset, num_clients=clients, seed=seed, local_epochs=local_epochs,
                      batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=0.0, optimizer=optimizer, mu=mu,
                      partition=partition, compression=compression, eval_fraction=eval_fraction,
                      secure_aggregation=secure_aggregation,
                      secagg_neighbours=secagg_neighbours or (default_neighbours(per_round)
                                                              if secure_aggregation else 0),
                      secagg_threshold=secagg_threshold or (default_threshold(per_round, secagg_neighbours)
                                                            if secure_aggregation else 0))
    initial = build_model(spec, seed=seed).state_dict()
    rules = RoundRules(clients_per_round=per_round, min_clients=clients, min_fit=min_fit,
                       round_timeout=round_timeout)
    specs = tensors.specs_of(initial)
    state = RoundState(global_state=initial, train_config=cfg, rules=rules, selector=RandomSelector(seed),
                       aggregator=SecureSum(specs) if secure_aggregation else make_aggregator(
                           specs, aggregator, per_round, dp_noise_multiplier=dp_noise_multiplier, dp_clip=dp_clip))
    local = _InProcess(train_data, test_data, build_model(spec), cfg)
    if backend == "ray":
        from fl_tools.ray_backend import RayBackend  # noqa: PLC0415 - Ray is imported only when asked for

        remote: RayBackend | None = RayBackend(ray or RayOptions(), train_data, test_data, spec, tamper)
    else:
        remote = None
    # Each client's side of the rounds (top-k's error feedback among it) lives here, on the driver,
    # whichever backend trains it: see fl_tools/ray_backend.py.
    members = {str(i): ClientRound(str(i), tamper=_tamper_of(tamper, i)) for i in range(clients)}
    samples: dict[str, int] = {}  # what each client said it trained on; 0 (not known yet) until it has
    accuracy, attempts = 0.0, 0
    while state.model_version < rounds:
        # Every client calls again before each round, as fl-client does: the server samples only the
        # clients it heard from lately, and a slow round must not age the early finishers out.
        for client in members:
            state.join(JoinRequest(client_id=client, num_samples=samples.get(client, 0)), 0)
        selected = state.open_round()
        start = {k: v.clone() for k, v in state.global_state.items()}
        version = state.model_version
        refused: set[str] = set()
        if secure_aggregation:
            _secure_round(state, local, selected, cfg, version, start, drop_after_keys)
        else:
            reports = (remote.run_round(cfg, selected, members, start, version + 1, time.monotonic() + round_timeout)
                       if remote is not None else local.run_round(selected, members, start, version + 1))
            for client, update, where in reports:
                if isinstance(update, str):
                    # A lost worker is a client that cannot deliver the round: reported as a deployed
                    # client reports a failure, so that the outcome records why it was dropped.
                    state.join(JoinRequest(client_id=client, num_samples=samples.get(client, 0),
                                           training_round=version + 1, failure=update), 0)
                    continue
                if on_client is not None and where is not None:
                    on_client(where)
                samples[client] = update.num_samples
                try:
                    reply = state.submit(update.header(version), update.payload.chunks())
                except InvalidUpdateError:
                    refused.add(client)
                    continue  # e.g. an honest client whose training diverged on a model an attack has wrecked
                if reply.accepted:
                    members[client].commit(update)
                else:
                    refused.add(client)
        # Every update is in (or refused, or given up on): close at once rather than wait for a silence.
        outcome = state.close_round()
        if on_outcome is not None:
            on_outcome(outcome)
        if not outcome.aggregated:
            lost = any(c not in outcome.contributors and c not in refused for c in selected)
            if not lost:
                break  # every update refused: the model is lost
            attempts += 1
            if attempts >= MAX_ROUND_ATTEMPTS:
                reason = next(iter(outcome.drop_reasons.values()), "no update")
                raise SimulationError(
                    f"round {version + 1} got {len(outcome.contributors)} of the {min_fit} updates it needs "
                    f"{MAX_ROUND_ATTEMPTS} times in a row (e.g. {reason}); give the clients more time "
                    "(round_timeout) or the cluster more workers")
            continue  # the round again, with a fresh sample
        attempts = 0
        result = remote.evaluate(state.global_state) if remote is not None else local.evaluate(state.global_state)
        accuracy = result.accuracy
        if on_round is not None:
            on_round(state.model_version, result)
    if on_final is not None:
        on_final(state.global_state)
    return accuracy


def _secure_round(state: RoundState, local: _InProcess, selected: list[str], cfg: TrainConfig, version: int,
                  start: State, drop_after_keys: Callable[[int, list[str]], list[str]] | None) -> None:
    """A round through secure aggregation's stages, every client in this process. A stage that fails
    (too few clients left for the threshold) leaves the round to close unaggregated, to be re-run."""
    try:
        secure = exchange_keys(state, selected, cfg, version + 1, start)
    except (StaleRoundError, NotSelectedError):
        return
    gone = set(drop_after_keys(version + 1, selected)) if drop_after_keys is not None else set()
    for client in selected:
        if client in gone:
            continue
        task, trained = local.train(client, start, version + 1)
        update = secure[client].prepare(start, task, trained)
        try:
            state.submit(update.header(version), update.payload.chunks())
        except (InvalidUpdateError, NotSelectedError):
            continue
    state.begin_unmasking()
    for client, rnd in secure.items():
        if client in gone:
            continue
        try:
            lists = state.secure_step(rnd.unmask_request(), 0)
            if lists.ready:
                state.secure_step(rnd.revelation(lists), 0)
        except (StaleRoundError, NotSelectedError):
            return  # the round failed: it closes unaggregated


def exchange_keys(state: RoundState, selected: list[str], cfg: TrainConfig, round_: int,
                   start: State) -> dict[str, SecureRound]:
    """Stages 1 and 2 of a secure round for every selected client, in one thread: each client's request
    once to take part, then again for the stage's answer (the unit tests drive secure rounds with it too)."""
    rounds = {c: SecureRound(c, cfg, round_, start, lambda req: state.secure_step(req, 0)) for c in selected}
    for rnd in rounds.values():
        state.secure_step(rnd.advertisement(), 0)
    roster = {c: state.secure_step(rnd.advertisement(), 0).entries for c, rnd in rounds.items()}
    for c, rnd in rounds.items():
        state.secure_step(rnd.shares(roster[c]), 0)
    for c, rnd in rounds.items():
        rnd.received = state.secure_step(rnd.shares(roster[c]), 0).entries
    return rounds
