"""A federation in one process, through the server's own classes: `RoundState` (validation, sampling,
aggregation) and the clients' training loop, without the network. For experiments that are about
learning, not transport: fl-experiment, model poisoning (bench/poisoning.py), differential privacy
(bench/privacy.py), accuracy on real data (tests)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from common import tensors
from common.datasets import ArrayData, BatchLoader, augmentation_for, model_spec_for
from common.messages import Encoding, JoinRequest, PayloadHeader, TrainConfig, UpdateHeader
from common.models import build_model
from common.partition import client_share
from common.training import EvalResult, evaluate, train
from fl_server.aggregation import make_aggregator
from fl_server.errors import InvalidUpdateError
from fl_server.membership import RandomSelector
from fl_server.rounds import RoundRules, RoundState

Tamper = Callable[[int, dict[str, torch.Tensor]], dict[str, torch.Tensor]]  # (client index, diff) -> sent diff


def run(train_data: ArrayData, test_data: ArrayData, *, model: str = "mlp", clients: int = 10, rounds: int = 5,
        local_epochs: int = 2, aggregator: str = "fedavg", seed: int = 0, tamper: Tamper | None = None,
        on_round: Callable[[int, EvalResult], None] | None = None, clients_per_round: int | None = None,
        dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0, partition: str = "iid", mu: float = 0.0,
        lr: float = 0.05, optimizer: str = "sgd", dataset: str = "",
        on_final: Callable[[dict[str, torch.Tensor]], None] | None = None) -> float:
    """Train `rounds` rounds of `clients_per_round` sampled clients (all by default) on shares of
    `train_data` split by `partition`; return the final test accuracy, and give `on_round` the test
    result of every round. `tamper` may change what a client sends (an attack); updates the server
    refuses are skipped. `mu` > 0 is FedProx. `on_final` is given the final global model. `dataset`
    names the data set, for its training augmentation (CIFAR's)."""
    per_round = clients_per_round or clients
    spec = model_spec_for(model, train_data)
    cfg = TrainConfig(model=spec, dataset=dataset, num_clients=clients, seed=seed, local_epochs=local_epochs,
                      batch_size=32, lr=lr, momentum=0.9, weight_decay=0.0, optimizer=optimizer, mu=mu,
                      partition=partition)
    initial = build_model(spec, seed=seed).state_dict()
    rules = RoundRules(clients_per_round=per_round, min_clients=clients, min_fit=1, round_timeout=600)
    state = RoundState(global_state=initial, train_config=cfg, rules=rules, selector=RandomSelector(seed),
                       aggregator=make_aggregator(tensors.specs_of(initial), aggregator, per_round,
                                                  dp_noise_multiplier=dp_noise_multiplier, dp_clip=dp_clip))
    shares = [client_share(train_data, i, clients, seed, partition) for i in range(clients)]
    net, device = build_model(spec), torch.device("cpu")
    test_loader = BatchLoader(test_data, 1000)
    for i in range(clients):
        state.join(JoinRequest(client_id=str(i), num_samples=len(shares[i])), 0)
    accuracy = 0.0
    for _ in range(rounds):
        selected = state.open_round()
        start = {k: v.clone() for k, v in state.global_state.items()}
        for client in selected:
            i = int(client)
            net.load_state_dict(start)
            # Seeded by (client, round), as fl-client does.
            seed_here = seed + i + 100_003 * (state.model_version + 1)
            torch.manual_seed(seed_here)
            train(net, BatchLoader(shares[i], cfg.batch_size, shuffle=True, seed=seed_here,
                                   augment=augmentation_for(cfg.dataset)), cfg, device)
            diff = {k: v.detach() - start[k] for k, v in net.state_dict().items()}
            if tamper is not None:
                diff = tamper(i, diff)
            payload = tensors.encode(diff)
            header = UpdateHeader(client_id=client, round=state.model_version + 1, model_version=state.model_version,
                                  num_samples=len(shares[i]),
                                  payload=PayloadHeader(payload.specs, payload.total_bytes, payload.num_chunks(),
                                                        payload.checksum, Encoding.DIFF))
            try:
                state.submit(header, payload.chunks())
            except InvalidUpdateError:
                pass  # e.g. an honest client whose training diverged on a model an attack has wrecked
        # Every update is in (or refused): close at once rather than wait for a silence or a deadline.
        if not state.close_round().aggregated:
            break  # every update refused: the model is lost
        net.load_state_dict(state.global_state)
        result = evaluate(net, test_loader, device)
        accuracy = result.accuracy
        if on_round is not None:
            on_round(state.model_version, result)
    if on_final is not None:
        on_final(state.global_state)
    return accuracy
