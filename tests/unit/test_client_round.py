"""One client round, as the user's code sees it (fl_client.task), as the library drives it
(fl_client.api Federation) and as a simulation does (fl_tools.simulation)."""
import dataclasses
import logging
import textwrap

import pytest
import torch
from torch import nn

from common import messages as m
from common import tensors
from common.datasets import DataError, load_digits, model_spec_for
from common.models import build_model
from common.partition import client_share
from common.training import TrainingStopped
from fl_client.api import Federation
from fl_client.builtin import BuiltinTraining
from fl_client.daemon import AppError, load_app
from fl_client.round import ClientRound, seed_for
from fl_client.task import Evaluation, Result, Task, TaskError, run_app
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


def task_for(cfg, global_state, client_id="0", round_=1, **changes) -> Task:
    return Task(client_id=client_id, round=round_, config=cfg, global_state=global_state, device=CPU,
                seed=seed_for(cfg, client_id, round_), **changes)


class Recorder:
    """ClientRound.prepare, recording what it was given and what it made."""

    def __init__(self, monkeypatch):
        self.calls = []
        prepare = ClientRound.prepare

        def recording(client, global_state, task, result):
            update = prepare(client, global_state, task, result)
            self.calls.append((client.client_id, global_state, task.config, task.round, update))
            return update

        monkeypatch.setattr(ClientRound, "prepare", recording)


class FakeConnection:
    """The server's side of a few rounds: TRAIN for each of `rounds`, then FINISHED; records what the
    client sends (updates, and heartbeats that report a failure)."""

    def __init__(self, global_state, cfg, reply=None, rounds=1):
        self.global_state, self.cfg = global_state, cfg
        self.reply = reply or m.SubmitResult(accepted=True)
        self.rounds = list(range(1, rounds + 1))
        self.submitted: list[tuple[m.UpdateHeader, tensors.Payload]] = []
        self.failures: list[m.JoinRequest] = []

    def join(self, request):
        if not self.rounds:
            return m.JoinDecision(m.Action.FINISHED, self.cfg)
        return m.JoinDecision(m.Action.TRAIN, self.cfg, round=self.rounds.pop(0), model_version=0)

    def heartbeat(self, request, timeout):
        if request.failure:
            self.failures.append(request)
        return m.JoinDecision(m.Action.WAIT, self.cfg)

    def fetch_model(self, request):
        return m.ModelHeader(round=1, model_version=request.model_version, payload=None), self.global_state

    def submit(self, header, payload, admitted=False, inline_limit=0):
        self.submitted.append((header, payload))
        return self.reply

    def close(self):
        pass


def federation(connection) -> Federation:
    return Federation(connection, "1", CPU)


def test_the_client_and_the_simulation_send_the_same_update(digits, monkeypatch):
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

    connection = FakeConnection(global_state, cfg)
    builtin = BuiltinTraining(client_share(train, 1, 4, 0, "iid"))
    federation(connection).run(builtin.train, builtin.evaluate)
    (header, payload), = connection.submitted
    client_call = recorder.calls[-1]
    assert client_call[0] == "1" and client_call[-1].payload is payload
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
    global_state = build_model(cfg.model, seed=0).state_dict()
    task = task_for(cfg, global_state)
    trained = {k: v + 0.01 * torch.randn_like(v) for k, v in global_state.items()}
    client = ClientRound("0")
    refused = client.prepare(global_state, task, Result(trained, 10))
    assert client.residual == {} and refused.residual
    accepted = client.prepare(global_state, task, Result(trained, 10))  # the retry starts from the same memory
    assert all(torch.equal(refused.residual[k], accepted.residual[k]) for k in accepted.residual)
    client.commit(accepted)
    assert client.residual is accepted.residual


@pytest.mark.parametrize("accepted", [False, True])
def test_the_client_keeps_the_residual_of_an_update_only_once_taken(digits, accepted):
    train, _ = digits
    cfg = config(train, compression="topk:0.1")
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), cfg, m.SubmitResult(accepted=accepted))
    client = federation(connection)
    builtin = BuiltinTraining(client_share(train, 0, 4, 0))
    client.run(builtin.train)
    assert len(connection.submitted) == 1 and bool(client.client.residual) == accepted


def test_a_training_function_plugs_into_the_round(digits):
    train, _ = digits
    cfg = config(train)
    seen = []

    def add_one(task: Task) -> Result:
        seen.append((task, torch.initial_seed()))
        return Result({k: v + 1 for k, v in task.global_state.items()}, 7, {"custom": 1.0})

    global_state = build_model(cfg.model, seed=0).state_dict()
    task = task_for(cfg, global_state, client_id="2", round_=3)
    update = ClientRound("2").prepare(global_state, task, run_app(task, add_one))
    (given, torch_seed), = seen
    assert given.round == 3 and given.seed == cfg.seed + 2 + 100_003 * 3 and torch_seed == given.seed
    assert update.num_samples == 7 and update.metrics == {"custom": 1.0}
    diff = tensors.decode(update.payload.specs, update.payload.data)
    assert all(torch.allclose(t, torch.ones_like(t)) for t in diff.values())
    header = update.header(model_version=2)
    assert (header.client_id, header.round, header.model_version, header.num_samples) == ("2", 3, 2, 7)


def test_an_evaluation_function_runs_only_when_the_server_asks(digits):
    train, _ = digits
    global_state = build_model(config(train).model, seed=0).state_dict()
    calls = []

    def evaluate(task):
        calls.append(task.round)
        return Evaluation(loss=0.5, num_samples=20, accuracy=0.75, metrics={"f1": 0.7})

    def keep(task):
        return Result(task.global_state, 5)

    for eval_fraction in (0.0, 0.2):
        task = task_for(config(train, eval_fraction=eval_fraction), global_state)
        update = ClientRound("0").prepare(global_state, task, run_app(task, keep, evaluate))
    assert calls == [1]  # once: the first config asked for no evaluation
    assert update.metrics == {"eval_loss": 0.5, "eval_samples": 20.0, "eval_accuracy": 0.75, "eval_f1": 0.7}


def test_the_submitted_model_must_fit_the_global_one(digits):
    train, _ = digits
    cfg = config(train)
    model = build_model(cfg.model, seed=0)
    global_state = model.state_dict()
    task = task_for(cfg, global_state)
    client = ClientRound("0")
    # A model, its state_dict and a DistributedDataParallel-style state all do.
    for weights in (model, model.state_dict(), {f"module.{k}": v for k, v in model.state_dict().items()}):
        assert client.prepare(global_state, task, Result(weights, 1)).num_samples == 1
    with pytest.raises(TaskError, match="has no tensor 'net.1.weight' that the global model has"):
        client.prepare(global_state, task, Result({k: v for k, v in global_state.items() if k != "net.1.weight"}, 1))
    with pytest.raises(TaskError, match="shape"):
        client.prepare(global_state, task, Result({**global_state, "net.1.bias": torch.zeros(3)}, 1))
    with pytest.raises(TaskError, match="has a tensor 'extra' that the global model has not"):
        client.prepare(global_state, task, Result({**global_state, "extra": torch.zeros(1)}, 1))
    with pytest.raises(TaskError, match="6 missing, 2 extra"):
        client.prepare(global_state, task, Result(nn.Linear(2, 2), 1))
    with pytest.raises(TaskError, match="num_samples"):
        client.prepare(global_state, task, Result(model, 0))
    with pytest.raises(TaskError, match="metric 'loss' is nan"):
        client.prepare(global_state, task, Result(model, 3, {"loss": float("nan")}))


def test_a_round_over_during_training_is_not_sent(digits):
    train, _ = digits
    cfg = config(train)
    builtin = BuiltinTraining(client_share(train, 0, 4, 0))
    with pytest.raises(TrainingStopped):
        builtin.train(task_for(cfg, build_model(cfg.model, seed=0).state_dict(), _should_stop=lambda: True))


def test_a_failing_round_is_reported_and_the_client_carries_on(digits, caplog):
    train, _ = digits
    cfg = config(train)
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=3)
    builtin = BuiltinTraining(client_share(train, 1, 4, 0))

    def flaky(task):
        if task.round == 2:
            raise RuntimeError("CUDA out of memory")
        return builtin.train(task)

    with caplog.at_level(logging.ERROR, logger="fl_client"):
        federation(connection).run(flaky)
    assert [h.round for h, _ in connection.submitted] == [1, 3]
    (failure,) = connection.failures
    assert failure.training_round == 2 and failure.failure == "RuntimeError: CUDA out of memory"
    assert "round 2 failed here (RuntimeError: CUDA out of memory)" in caplog.text
    assert "Traceback" not in caplog.text  # only at DEBUG


def test_data_that_does_not_fit_is_reported_and_ends_the_client(digits):
    train, _ = digits
    cfg = config(train)
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=3)
    wrong = client_share(train, 1, 4, 0)
    wrong.num_classes = 3
    builtin = BuiltinTraining(wrong)
    with pytest.raises(DataError, match="3 classes"):
        federation(connection).run(builtin.train)
    assert [f.training_round for f in connection.failures] == [1] and not connection.submitted


def test_a_script_that_stops_inside_a_round_reports_it(digits):
    train, _ = digits
    cfg = config(train)
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=3)
    with pytest.raises(KeyError), federation(connection) as client:
        for task in client.rounds():
            task.submit(task.global_state, 5)
            if task.round == 2:
                raise KeyError("the user's bug")
    assert [h.round for h, _ in connection.submitted] == [1, 2] and connection.failures == []
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=3)
    with pytest.raises(KeyError), federation(connection) as client:
        for task in client.rounds():
            if task.round == 2:
                raise KeyError("the user's bug")
            task.submit(task.global_state, 5)
    assert [f.training_round for f in connection.failures] == [2]


def test_each_task_is_submitted_once(digits):
    train, _ = digits
    cfg = config(train)
    connection = FakeConnection(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=1)
    with federation(connection) as client:
        for task in client.rounds():
            assert task.submit(task.global_state, 5).accepted
            with pytest.raises(TaskError, match="submitted already"):
                task.submit(task.global_state, 5)


class NextJoinInAnswer(FakeConnection):
    """A server that answers each update with the client's next join (SubmitResult.next), as fl-server does
    for an update whose header asks (join_after); counts the client's own joins."""

    joins = 0

    def join(self, request):
        self.joins += 1
        return super().join(request)

    def submit(self, header, payload, admitted=False, inline_limit=0):
        super().submit(header, payload, admitted, inline_limit)
        return m.SubmitResult(accepted=header.join_after, next=super().join(None) if header.join_after else None)


def test_the_answer_to_an_update_brings_the_next_round_so_the_client_joins_only_once(digits):
    train, _ = digits
    cfg = config(train)
    connection = NextJoinInAnswer(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=3)
    with federation(connection) as client:
        rounds = [task.round for task in client.rounds() if task.submit(task.global_state, 5).accepted]
    assert rounds == [1, 2, 3] and connection.joins == 1
    assert all(header.join_after for header, _ in connection.submitted)


def test_a_client_that_stops_after_an_update_gives_back_the_round_its_answer_brought(digits):
    train, _ = digits
    cfg = config(train)
    connection = NextJoinInAnswer(build_model(cfg.model, seed=0).state_dict(), cfg, rounds=3)
    with federation(connection) as client:
        for task in client.rounds():
            task.submit(task.global_state, 5)
            break  # the answer selected this client for round 2 already
    (failure,) = connection.failures
    assert failure.training_round == 2 and "stopped" in failure.failure


def test_held_out_part_is_fixed_and_never_trained_on(digits):
    train, _ = digits
    cfg = config(train, eval_fraction=0.25)
    share = client_share(train, 0, 4, 0)
    builtin = BuiltinTraining(share)
    builtin.configure("0", cfg, CPU)
    first = builtin.data
    builtin.configure("0", cfg, CPU)  # once only
    assert builtin.data is first and len(builtin.data) + len(builtin.held_out.y) == len(share)
    assert len(builtin.held_out.y) == round(0.25 * len(share))
    # Seeded by the client: the same part in every process this client runs in.
    again = BuiltinTraining(share)
    again.configure("0", cfg, CPU)
    assert torch.equal(again.held_out.y, builtin.held_out.y) and torch.equal(again.data.x, builtin.data.x)


def test_apps_load_by_module_file_or_class(tmp_path, monkeypatch):
    (tmp_path / "my_training.py").write_text(textwrap.dedent("""
        def train(task):
            return "trained"

        def check(task):
            return "checked"

        class Trainer:
            def train(self, task):
                return "by class"

            def evaluate(self, task):
                return "evaluated by class"

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    train, evaluate = load_app("my_training:train", "my_training:check")
    assert (train(None), evaluate(None)) == ("trained", "checked")
    train, evaluate = load_app("my_training:Trainer")
    assert (train(None), evaluate(None)) == ("by class", "evaluated by class")
    train, evaluate = load_app(f"{tmp_path / 'my_training.py'}:train")
    assert train(None) == "trained" and evaluate is None
    for text, message in [("my_training", "is not MODULE:NAME"),
                          ("no_such_module:train", "cannot import no_such_module"),
                          ("my_training:nothing", "has no 'nothing'"),
                          ("my_training:NOT_A_FUNCTION", "not a function")]:
        with pytest.raises(AppError, match=message):
            load_app(text)


def test_a_model_class_the_client_cannot_import_ends_it_in_one_sentence(digits):
    train, _ = digits
    cfg = config(train, model=m.ModelSpec("nowhere.models:Net", (1, 8, 8), 10))
    builtin = BuiltinTraining(client_share(train, 0, 4, 0), allowed_models=("nowhere.models:Net",))
    with pytest.raises(DataError, match="cannot import model 'nowhere.models:Net'"):
        builtin.configure("0", cfg, CPU)
    connection = FakeConnection(build_model(config(train).model, seed=0).state_dict(), cfg, rounds=2)
    with pytest.raises(DataError):
        federation(connection).run(builtin.train, builtin.evaluate, lambda c: builtin.configure("1", c, CPU))
    assert connection.submitted == []
