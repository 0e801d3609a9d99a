"""What the server measures: nothing (dataset none: each round's record is complete when it is aggregated,
and shows the clients' federated evaluation), the data set's test split, or the operator's own
server_evaluation; and how the round line, fl-report and monitoring show each."""
import dataclasses
import json
import logging
import threading

import pytest
import torch

from common.messages import ModelSpec
from common.models import build_model
from fl_server.checkpoint import RunFolder
from fl_server.coordinator import Coordinator, checked_metrics
from fl_server.monitoring import FederationCollector
from fl_server.records import RoundRecord, to_jsonl
from fl_server.report import client_means, report_data, write_report
from tests.models import evaluation
from tests.unit.test_rounds import GUARD, join, make_state, update

SPEC = ModelSpec("mlp", (1, 2, 2), 2)
EVALUATION = {"train_loss": 0.3, "eval_loss": 0.5, "eval_samples": 20.0, "eval_accuracy": 0.75}


def run_rounds(tmp_path, rounds=2, metrics=EVALUATION, **kwargs):
    """A coordinator run of `rounds` rounds with one client sending `metrics`; (coordinator, lines printed)."""
    model_state = build_model(SPEC, seed=0).state_dict()
    state = make_state(k=1, timeout=GUARD, clock=lambda: 0.0, global_state=model_state)
    lines: list[str] = []
    coordinator = Coordinator(state, rounds=rounds, model_spec=SPEC, run=RunFolder(tmp_path), config_hash="test",
                              report=lines.append, **{"test_data": None, **kwargs})
    join(state, "a")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("done", coordinator.run()), daemon=True)
    thread.start()
    for round_ in range(1, rounds + 1):
        assert state.wait_for(lambda r=round_: state.status()["round"] == r and state.status()["selected"] == ["a"],
                              GUARD)
        header, payload = update(state, "a", {k: torch.full_like(v, 0.01) for k, v in model_state.items()})
        assert state.submit(dataclasses.replace(header, metrics=metrics), payload.chunks()).accepted
    thread.join(GUARD)
    assert result == {"done": True}
    return coordinator, lines


def test_without_a_data_set_rounds_are_complete_when_aggregated(tmp_path):
    coordinator, lines = run_rounds(tmp_path)
    assert coordinator.model is None and not coordinator.evaluates  # nothing built to evaluate with
    records = coordinator.records()
    assert [r.round for r in records] == [1, 2]
    for r in records:
        assert r.accuracy is None and r.loss is None and not r.evaluated and r.server_metrics == {}
        assert r.federated_evaluation["model_version"] == r.round - 1
    assert lines[0] == ("round 1/2: clients' evaluation of model version 0: accuracy 0.7500, loss 0.5000 (1 clients, "
                        "20 samples), clients ['a'], " + lines[0].split("clients ['a'], ")[1])
    assert lines[1].startswith("round 2/2: clients' evaluation of model version 1")
    assert lines[2].startswith("finished 2 rounds: final clients' evaluation of model version 1")
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [w["accuracy"] for w in written] == [None, None] and "server_metrics" not in written[0]


def test_without_any_evaluation_a_round_says_so_plainly(tmp_path):
    _, lines = run_rounds(tmp_path, rounds=1, metrics={"train_loss": 0.3})
    assert lines[0].startswith("round 1/1: no test result, clients ['a']")
    assert "not evaluated" not in "".join(lines)


def test_the_operators_evaluation_fills_the_record(tmp_path):
    def evaluate(model, device):
        assert not model.training and not torch.is_grad_enabled() and device == torch.device("cpu")
        return {"accuracy": 0.5, "loss": torch.tensor(0.25), "f1": 0.4}

    coordinator, lines = run_rounds(tmp_path, server_evaluation=evaluate)
    for r in coordinator.records():
        assert (r.accuracy, r.loss, r.server_metrics) == (0.5, 0.25, {"accuracy": 0.5, "loss": 0.25, "f1": 0.4})
        assert r.evaluated
    assert lines[0].startswith("round 1/2: accuracy 0.5, loss 0.25, f1 0.4, clients")
    written = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert written["server_metrics"] == {"accuracy": 0.5, "loss": 0.25, "f1": 0.4}


def test_the_operators_evaluation_replaces_the_data_sets(tmp_path):
    from common.datasets import ArrayData

    data = ArrayData(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), 2)
    coordinator, _ = run_rounds(tmp_path, rounds=1, test_data=data, server_evaluation=evaluation.weight_norm)
    assert coordinator.test_loader is None
    [record] = coordinator.records()
    assert record.accuracy is None and record.loss is None and list(record.server_metrics) == ["weight_norm"]
    assert record.evaluated and record.quality().startswith("weight_norm ")


@pytest.mark.parametrize("function, logged", [
    (evaluation.fails, "server_evaluation failed (RuntimeError: the validation bucket is unreachable); the round "
                       "stays without a test result"),
    (evaluation.not_metrics, "server_evaluation failed (ValueError: server_evaluation's result is unusable: it "
                             "returned a float, not a dict of metrics)"),
])
def test_an_evaluation_that_fails_leaves_the_round_without_a_result(tmp_path, caplog, function, logged):
    caplog.set_level(logging.DEBUG, "fl_server.coordinator")
    coordinator, lines = run_rounds(tmp_path, server_evaluation=function)
    assert all(r.loss is None and r.server_metrics == {} for r in coordinator.records())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and logged in errors[0].getMessage() and errors[0].exc_info is None
    assert len(lines) == 3  # each round's line all the same, then the end


@pytest.mark.parametrize("returned, problem", [
    ({"accuracy": True}, "'accuracy' is True, not a finite number"),
    ({"loss": float("nan")}, "'loss' is nan, not a finite number"),
    ({"loss": "low"}, "'loss' is 'low', not a number"),
    ({3: 1.0}, "a metric named 3"),
])
def test_what_an_evaluation_may_return(returned, problem):
    with pytest.raises(ValueError, match=problem):
        checked_metrics(returned)
    assert checked_metrics({"mae": 2, "r2": 0.5}) == {"mae": 2.0, "r2": 0.5}


# --- the record ---------------------------------------------------------------------------------------

def test_quality_in_words():
    assert RoundRecord(round=1, server_metrics={"z": 1.0, "loss": 0.5, "accuracy": 0.9}).quality() == (
        "accuracy 0.9, loss 0.5, z 1")
    many = RoundRecord(round=1, server_metrics={f"m{i}": float(i) for i in range(9)})
    assert many.quality().endswith("m5 5 (and 3 more)")
    federated = RoundRecord(round=3, federated_evaluation={"model_version": 2, "clients": 2, "samples": 40,
                                                          "loss": 1.25})
    assert federated.quality() == "clients' evaluation of model version 2: loss 1.2500 (2 clients, 40 samples)"
    assert RoundRecord(round=1).quality() == "no test result"
    record = RoundRecord(round=1, server_metrics={"mae": 0.5})
    assert RoundRecord.from_dict(record.to_dict()) == record and record.to_dict()["server_metrics"] == {"mae": 0.5}


# --- fl-report and monitoring -------------------------------------------------------------------------

def client_records():
    """Three rounds of a run without a data set: clients report eval_* (with eval_samples) and a metric of
    their own task (mae)."""
    records = []
    for round_ in (1, 2, 3):
        metrics = {"0": {"train_loss": 1.0 / round_, "eval_loss": 2.0, "eval_accuracy": 0.5, "eval_samples": 10.0,
                         "mae": 3.0},
                   "1": {"train_loss": 3.0 / round_, "eval_loss": 4.0, "eval_accuracy": 1.0, "eval_samples": 30.0,
                         "mae": 5.0}}
        from fl_server.records import federated_evaluation

        records.append(RoundRecord(round=round_, clients=["0", "1"], selected=["0", "1"], client_metrics=metrics,
                                   federated_evaluation=federated_evaluation(metrics, round_ - 1), seconds=1.0))
    records.insert(1, RoundRecord(round=2, aggregated=False, selected=["1"], dropped=["1"]))
    return records


def test_client_means_weigh_eval_metrics_by_eval_samples():
    means = client_means(client_records()[0].client_metrics)
    assert means == {"eval_accuracy": pytest.approx(0.875), "eval_loss": pytest.approx(3.5), "eval_samples": 20.0,
                     "mae": 4.0, "train_loss": 2.0}
    assert client_means({"a": {"x": float("inf")}, "b": {"x": 1.0, "eval_y": 2.0, "eval_samples": 0.0}}) == {
        "eval_samples": 0.0, "eval_y": 2.0, "x": 1.0}


def test_a_report_without_server_evaluation_plots_what_the_clients_measured(tmp_path):
    records = client_records()
    (tmp_path / "metrics.jsonl").write_text(to_jsonl(records))
    written = {p.name for p in write_report(tmp_path)}
    assert written == {"federated.png", "client_metrics.png", "participation.png", "report_data.json", "report.md"}
    data = report_data(records)
    assert data["rounds"] == [] and data["participation_rounds"] == [1, 2, 3]
    assert data["federated"] == {"rounds": [1, 2, 3], "model_version": [0, 1, 2], "loss": [3.5] * 3,
                                 "accuracy": [0.875] * 3}
    assert data["client_metrics"]["train_loss"] == {"rounds": [1, 2, 3], "values": [2.0, 1.0, pytest.approx(2 / 3)]}
    text = (tmp_path / "report.md").read_text()
    assert "the server evaluated no model" in text
    assert "clients' final evaluation (of model version 2, on data they hold out): accuracy 0.8750, loss 3.5000" in text
    assert "eval_accuracy, eval_loss, eval_samples, mae, train_loss" in text
    assert "![federated](federated.png) ![client_metrics](client_metrics.png)" in text
    assert "| 3 | - | - | 0.8750 | 3.5000 | 0, 1 | 1.00 |" in text


def test_a_report_of_the_operators_evaluation(tmp_path, monkeypatch):
    from fl_server import report

    monkeypatch.setattr(report, "MAX_PLOTTED_METRICS", 2)
    records = client_records()
    for r in records:
        if r.aggregated:
            r.server_metrics = {"mae": 1.0 / r.round, "r2": 0.5, "max_error": 2.0}
    (tmp_path / "metrics.jsonl").write_text(to_jsonl(records))
    written = {p.name for p in write_report(tmp_path)}
    assert {"server_metrics.png", "federated.png", "client_metrics.png"} <= written
    assert "accuracy.png" not in written and "loss.png" not in written
    text = (tmp_path / "report.md").read_text()
    assert "final server evaluation: mae 0.3333, max_error 2, r2 0.5 after round 3" in text
    assert "eval_accuracy, eval_loss (not plotted: eval_samples, mae, train_loss" in text


def test_monitoring_shows_the_clients_evaluation_when_the_server_has_none():
    records = client_records()
    collector = FederationCollector(make_state(k=1), lambda: records)
    samples = {s.name: s.value for family in collector.collect() for s in family.samples}
    assert "fl_accuracy" not in samples and "fl_loss" not in samples
    assert samples["fl_federated_loss"] == 3.5 and samples["fl_federated_accuracy"] == 0.875
    records[-1].server_metrics, records[-1].loss = {"loss": 0.5, "mae": 0.25}, 0.5
    families = {f.name: f for f in collector.collect()}
    assert [s.value for s in families["fl_loss"].samples] == [0.5] and "fl_accuracy" not in families
    assert {s.labels["name"]: s.value for s in families["fl_server_metric"].samples} == {"loss": 0.5, "mae": 0.25}
