"""A federation in one process, through the server's own classes: `RoundState` (validation, sampling,
aggregation) and each client's own round (fl_client.round: federated evaluation, training,
compression), without the network. For experiments that are about learning, not transport:
fl-experiment, model poisoning (fl_tools.poisoning), differential privacy (bench/privacy.py), accuracy
on real data (tests)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from common import tensors
from common.datasets import ArrayData, BatchLoader, model_spec_for
from common.messages import JoinRequest, TrainConfig
from common.models import build_model
from common.partition import client_share
from common.secure_rounds import default_neighbours, default_threshold
from common.training import EvalResult, evaluate
from fl_client.builtin import BuiltinTraining
from fl_client.round import ClientRound, State, seed_for
from fl_client.secure import SecureRound
from fl_client.task import Task, run_app
from fl_server.aggregation import make_aggregator
from fl_server.aggregation.secure import SecureSum
from fl_server.errors import InvalidUpdateError
from fl_server.membership import RandomSelector
from fl_server.round_types import RoundOutcome
from fl_server.rounds import RoundRules, RoundState

Tamper = Callable[[int, State], State]  # (client index, diff) -> sent diff


def _tamper_of(tamper: Tamper | None, index: int) -> Callable[[State], State] | None:
    return None if tamper is None else lambda diff: tamper(index, diff)


def run(train_data: ArrayData, test_data: ArrayData, *, model: str = "mlp", clients: int = 10, rounds: int = 5,
        local_epochs: int = 2, aggregator: str = "fedavg", seed: int = 0, tamper: Tamper | None = None,
        on_round: Callable[[int, EvalResult], None] | None = None, clients_per_round: int | None = None,
        dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0, partition: str = "iid", mu: float = 0.0,
        lr: float = 0.05, optimizer: str = "sgd", dataset: str = "",
        on_final: Callable[[dict[str, torch.Tensor]], None] | None = None, compression: str = "none",
        eval_fraction: float = 0.0, on_outcome: Callable[[RoundOutcome], None] | None = None,
        secure_aggregation: bool = False, secagg_neighbours: int = 0, secagg_threshold: int = 0,
        drop_after_keys: Callable[[int, list[str]], list[str]] | None = None) -> float:
    """Train `rounds` rounds of `clients_per_round` sampled clients (all by default) on shares of
    `train_data` split by `partition`; return the final test accuracy, and give `on_round` the test
    result of every round. `tamper` may change what a client sends (an attack); updates the server
    refuses are skipped. `mu` > 0 is FedProx. `on_final` is given the final global model. `dataset`
    names the data set, for its training augmentation (CIFAR's). `compression` and `eval_fraction`
    are fl-server's options of those names; `on_outcome` is given each round's outcome as the server
    records it (the clients' metrics, federated evaluation's among them). `secure_aggregation` runs each
    round through secure aggregation's stages (fl_server/secure.py) with the clients' own secure rounds
    (fl_client/secure.py); `drop_after_keys(round, selected)` names clients that vanish after the key
    exchange, before their masked upload."""
    per_round = clients_per_round or clients
    spec = model_spec_for(model, train_data)
    cfg = TrainConfig(model=spec, dataset=dataset, num_clients=clients, seed=seed, local_epochs=local_epochs,
                      batch_size=32, lr=lr, momentum=0.9, weight_decay=0.0, optimizer=optimizer, mu=mu,
                      partition=partition, compression=compression, eval_fraction=eval_fraction,
                      secure_aggregation=secure_aggregation,
                      secagg_neighbours=secagg_neighbours or (default_neighbours(per_round)
                                                              if secure_aggregation else 0),
                      secagg_threshold=secagg_threshold or (default_threshold(per_round, secagg_neighbours)
                                                            if secure_aggregation else 0))
    initial = build_model(spec, seed=seed).state_dict()
    rules = RoundRules(clients_per_round=per_round, min_clients=clients, min_fit=1, round_timeout=600)
    specs = tensors.specs_of(initial)
    state = RoundState(global_state=initial, train_config=cfg, rules=rules, selector=RandomSelector(seed),
                       aggregator=SecureSum(specs) if secure_aggregation else make_aggregator(
                           specs, aggregator, per_round, dp_noise_multiplier=dp_noise_multiplier, dp_clip=dp_clip))
    # One model for all the clients (they train one after the other): a thousand clients hold a
    # thousand shares, not a thousand models.
    net, device = build_model(spec), torch.device("cpu")
    members = []
    for i in range(clients):
        training = BuiltinTraining(client_share(train_data, i, clients, seed, partition), model=net)
        training.configure(str(i), cfg, device)
        members.append((ClientRound(str(i), tamper=_tamper_of(tamper, i)), training))
    test_loader = BatchLoader(test_data, 1000)
    accuracy = 0.0
    for _ in range(rounds):
        # Every client calls again before each round, as fl-client does: the server samples only the
        # clients it heard from lately, and a slow round must not age the early finishers out.
        for member, training in members:
            state.join(JoinRequest(client_id=member.client_id, num_samples=training.num_samples), 0)
        selected = state.open_round()
        start = {k: v.clone() for k, v in state.global_state.items()}
        version = state.model_version
        secure = _exchange_keys(state, selected, cfg, version + 1, start) if secure_aggregation else {}
        gone = set(drop_after_keys(version + 1, selected)) if drop_after_keys is not None else set()
        for client in selected:
            if client in gone:
                continue
            member, training = members[int(client)]
            # The same task and the same app as fl-client's (fl_client.api), without the network.
            task = Task(client_id=client, round=version + 1, config=cfg, global_state=start, device=device,
                        seed=seed_for(cfg, client, version + 1))
            trained = run_app(task, training.train, training.evaluate)
            assert trained is not None, "the built-in training returns its result"
            update = (secure[client].prepare(start, task, trained) if secure_aggregation else
                      member.prepare(start, task, trained))
            try:
                reply = state.submit(update.header(version), update.payload.chunks())
            except InvalidUpdateError:
                continue  # e.g. an honest client whose training diverged on a model an attack has wrecked
            if reply.accepted:
                member.commit(update)
        # Every update is in (or refused): close at once rather than wait for a silence or a deadline.
        if secure_aggregation:
            state.begin_unmasking()
            for client, rnd in secure.items():
                if client not in gone:
                    lists = state.secure_step(rnd.unmask_request(), 0)
                    if lists.ready:
                        state.secure_step(rnd.revelation(lists), 0)
        outcome = state.close_round()
        if on_outcome is not None:
            on_outcome(outcome)
        if not outcome.aggregated:
            break  # every update refused: the model is lost
        net.load_state_dict(state.global_state)
        result = evaluate(net, test_loader, device)
        accuracy = result.accuracy
        if on_round is not None:
            on_round(state.model_version, result)
    if on_final is not None:
        on_final(state.global_state)
    return accuracy


def _exchange_keys(state: RoundState, selected: list[str], cfg: TrainConfig, round_: int,
                   start: State) -> dict[str, SecureRound]:
    """Stages 1 and 2 of a secure round for every selected client, in one thread: each client's request
    once to take part, then again for the stage's answer."""
    rounds = {c: SecureRound(c, cfg, round_, start, lambda req: state.secure_step(req, 0)) for c in selected}
    for rnd in rounds.values():
        state.secure_step(rnd.advertisement(), 0)
    roster = {c: state.secure_step(rnd.advertisement(), 0).entries for c, rnd in rounds.items()}
    for c, rnd in rounds.items():
        state.secure_step(rnd.shares(roster[c]), 0)
    for c, rnd in rounds.items():
        rnd.received = state.secure_step(rnd.shares(roster[c]), 0).entries
    return rounds
