"""One client round (fl_client.round) for the daemon and the simulation alike."""
import dataclasses

import pytest
import torch

from common import messages as m
from common import tensors
from common.datasets import load_digits, model_spec_for
from common.models import build_model
from common.partition import client_share
from common.training import TrainingStopped
from fl_client.daemon import ClientDaemon, ClientOptions
from fl_client.round import ClientRound, RoundTask, TrainOutput
from fl_tools import simulation

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    torch.set_num_threads(1)
    return load_digits()


def config(train, **changes) -> m.TrainConfig:
    cfg = m.TrainConfig(model=model_spec_for("mlp", train), dataset="", num_clients=4, seed=0, local_epochs=1,
                        batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    return dataclasses.replace(cfg, **changes)


class Recorder:
    """ClientRound.prepare, recording what it was given and what it made."""

    def __init__(self, monkeypatch):
        self.calls = []
        prepare = ClientRound.prepare

        def recording(client, global_state, cfg, round_, should_stop=lambda: False):
            update = prepare(client, global_state, cfg, round_, should_stop)
            self.calls.append((client.client_id, global_state, cfg, round_, update))
            return update

        monkeypatch.setattr(ClientRound, "prepare", recording)


class FakeConnection:
    def __init__(self, global_state, reply: m.SubmitResult):
        self.global_state, self.reply = global_state, reply
        self.submitted: list[tuple[m.UpdateHeader, tensors.Payload]] = []

    def fetch_model(self, request):
        return m.ModelHeader(round=1, model_version=request.model_version, payload=None), self.global_state

    def submit(self, header, payload):
        self.submitted.append((header, payload))
        return self.reply


def test_the_daemon_and_the_simulation_send_the_same_update(digits, monkeypatch):
    train, test = digits
    recorder = Recorder(monkeypatch)
    outcomes = []
    simulation.run(train, test, clients=4, rounds=1, local_epochs=1, compression="int8", eval_fraction=0.2,
                   on_outcome=outcomes.append)
    _, global_state, cfg, round_, simulated = next(c for c in recorder.calls if c[0] == "1")
    # Federated evaluation and compression happen in simulations too, and the server records them.
    assert simulated.codec.name == "int8" and "eval_accuracy" in simulated.metrics
    assert set(outcomes[0].client_metrics["1"]) == {"train_loss", "train_seconds", "eval_loss", "eval_samples",
                                                    "eval_accuracy"}

    connection = FakeConnection(global_state, m.SubmitResult(accepted=True))
    daemon = ClientDaemon(ClientOptions(client_id="1", device=CPU, progress=False,
                                        data=client_share(train, 1, 4, 0, "iid")), connection)
    daemon._prepare(cfg)
    daemon._train_round(m.JoinDecision(m.Action.TRAIN, cfg, round=round_, model_version=0), lambda: False)
    (header, payload), = connection.submitted
    daemon_call = recorder.calls[-1]
    assert daemon_call[0] == "1" and daemon_call[-1].payload is payload
    assert payload.data == simulated.payload.data
    assert header.payload.codec == "int8" and header.num_samples == simulated.num_samples
    assert {k: v for k, v in header.metrics.items() if k != "train_seconds"} == \
        {k: v for k, v in simulated.metrics.items() if k != "train_seconds"}


def test_compressed_simulation_sends_fewer_bytes(digits):
    train, test = digits
    received = {}
    for codec in ("none", "int8"):
        outcomes = []
        simulation.run(train, test, clients=3, rounds=1, local_epochs=1, compression=codec,
                       on_outcome=outcomes.append)
        received[codec] = outcomes[0].bytes_in
    assert received["int8"] < received["none"] / 3


def test_topk_residual_moves_on_only_when_committed(digits):
    train, _ = digits
    cfg = config(train, compression="topk:0.1")
    client = ClientRound("0", client_share(train, 0, 4, 0), CPU)
    global_state = build_model(cfg.model, seed=0).state_dict()
    refused = client.prepare(global_state, cfg, 1)
    assert client.residual == {} and refused.residual
    accepted = client.prepare(global_state, cfg, 1)  # the retry starts from the same memory
    assert all(torch.equal(refused.residual[k], accepted.residual[k]) for k in accepted.residual)
    client.commit(accepted)
    assert client.residual is accepted.residual


@pytest.mark.parametrize("accepted", [False, True])
def test_the_daemon_keeps_the_residual_of_an_update_only_once_taken(digits, accepted):
    train, _ = digits
    cfg = config(train, compression="topk:0.1")
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), m.SubmitResult(accepted=accepted))
    daemon = ClientDaemon(ClientOptions(client_id="0", device=CPU, progress=False,
                                        data=client_share(train, 0, 4, 0)), connection)
    daemon._prepare(cfg)
    daemon._train_round(m.JoinDecision(m.Action.TRAIN, cfg, round=1), lambda: False)
    assert bool(daemon.client.residual) == accepted


def test_a_training_function_plugs_into_the_round(digits):
    train, _ = digits
    cfg = config(train)
    seen = []

    def add_one(task: RoundTask) -> TrainOutput:
        seen.append(task)
        return TrainOutput({k: v + 1 for k, v in task.global_state.items()}, 7, {"custom": 1.0})

    client = ClientRound("2", client_share(train, 2, 4, 0), CPU, train_fn=add_one)
    global_state = build_model(cfg.model, seed=0).state_dict()
    update = client.prepare(global_state, cfg, 3)
    assert seen[0].round == 3 and seen[0].seed == cfg.seed + 2 + 100_003 * 3 and seen[0].data is client.data
    assert update.num_samples == 7 and update.metrics == {"custom": 1.0}
    diff = tensors.decode(update.payload.specs, update.payload.data)
    assert all(torch.allclose(t, torch.ones_like(t)) for t in diff.values())
    header = update.header(model_version=2)
    assert (header.client_id, header.round, header.model_version, header.num_samples) == ("2", 3, 2, 7)


def test_a_round_over_during_training_is_not_sent(digits):
    train, _ = digits
    cfg = config(train)
    client = ClientRound("0", client_share(train, 0, 4, 0), CPU)
    with pytest.raises(TrainingStopped):
        client.prepare(build_model(cfg.model, seed=0).state_dict(), cfg, 1, should_stop=lambda: True)


def test_held_out_part_is_fixed_and_never_trained_on(digits):
    train, _ = digits
    cfg = config(train, eval_fraction=0.25)
    share = client_share(train, 0, 4, 0)
    client = ClientRound("0", share, CPU)
    client.configure(cfg)
    first = client.data
    client.configure(cfg)  # once only
    assert client.data is first and len(client.data) + len(client.held_out.y) == len(share)
    assert len(client.held_out.y) == round(0.25 * len(share))
    # Seeded by the client: the same part in every process this client runs in.
    again = ClientRound("0", share, CPU)
    again.configure(cfg)
    assert torch.equal(again.held_out.y, client.held_out.y) and torch.equal(again.data.x, client.data.x)
