"""RoundRecord: one line of metrics.jsonl, written and read with exactly the keys it always had."""
import json

import pytest

from fl_server.records import RoundRecord, federated_evaluation, read_jsonl, to_jsonl
from fl_server.report import ReportError, read_metrics, report_data
from fl_server.rounds import RoundOutcome

# A line as the server wrote it before RoundRecord existed (a DP run's, so with epsilon and delta).
LINE = {"round": 2, "aggregated": True, "accuracy": 0.75, "loss": 0.5, "clients": ["0", "2"], "num_samples": 90,
        "bytes_in": 4000, "seconds": 1.2345, "aggregate_seconds": 0.01, "selected": ["0", "1", "2"],
        "population": 3, "dropped": ["1"], "drop_reasons": {"1": "silent"},
        "client_metrics": {"0": {"train_loss": 0.4, "eval_loss": 1.0, "eval_samples": 10.0}},
        "federated_evaluation": {"model_version": 1, "clients": 1, "samples": 10, "loss": 1.0},
        "opened_at": 100.0, "closed_at": 101.5, "time": 101.6, "epsilon": 1.5, "delta": 1e-05}


def test_a_line_reads_and_writes_back_key_for_key():
    record = RoundRecord.from_dict(LINE)
    assert (record.round, record.accuracy, record.dropped, record.epsilon) == (2, 0.75, ["1"], 1.5)
    assert json.dumps(record.to_dict()) == json.dumps(LINE)  # same keys, same order, same values


def test_from_dict_of_to_dict_is_the_record():
    for record in (RoundRecord(round=1), RoundRecord.from_dict(LINE),
                   RoundRecord(round=3, aggregated=False, selected=["a"], dropped=["a"], drop_reasons={"a": "x"})):
        assert RoundRecord.from_dict(record.to_dict()) == record


def test_without_privacy_there_is_no_epsilon_key():
    line = {k: v for k, v in LINE.items() if k not in ("epsilon", "delta")}
    assert RoundRecord.from_dict(line).to_dict() == line


def test_a_record_of_an_older_version_reads():
    # The first versions wrote no selected, dropped, bytes_in, population, timings or evaluations.
    old = {"round": 1, "accuracy": 0.5, "loss": 1.0, "clients": ["0", "1"], "seconds": 2.0, "time": 5.0}
    record = RoundRecord.from_dict(old)
    assert record.aggregated and record.selected == ["0", "1"] and record.dropped == []
    assert record.bytes_in == 0 and record.aggregate_seconds == 0.0 and record.federated_evaluation is None
    assert RoundRecord.from_dict({**old, "a_key_from_a_newer_version": 1}) == record


def test_quality_and_evaluated():
    assert RoundRecord.from_dict(LINE).quality() == "accuracy 0.7500, loss 0.5000"
    autoencoder = RoundRecord(round=1, loss=0.01234)
    assert autoencoder.quality() == "reconstruction error (MSE) 0.0123" and autoencoder.evaluated
    assert not RoundRecord(round=1).evaluated and not RoundRecord(round=1, aggregated=False, loss=1.0).evaluated


def test_a_record_of_an_outcome():
    outcome = RoundOutcome(round=4, selected=["0", "1"], contributors=["0"], num_samples=10,
                           client_metrics={"0": {"eval_loss": 2.0, "eval_samples": 5.0, "eval_accuracy": 0.2}},
                           seconds=1.234567, aggregated=True, drop_reasons={"1": "silent"}, opened_at=1.0,
                           closed_at=2.0, bytes_in=99, aggregate_seconds=0.000123456, population=2)
    record = RoundRecord.of(outcome)
    assert list(record.to_dict()) == [k for k in LINE if k not in ("epsilon", "delta")]
    assert (record.seconds, record.aggregate_seconds, record.dropped) == (1.2346, 0.0001, ["1"])
    assert record.accuracy is None and record.loss is None
    assert record.federated_evaluation == {"model_version": 3, "clients": 1, "samples": 5, "loss": 2.0,
                                           "accuracy": 0.2}


def test_federated_evaluation_weighs_by_samples_and_needs_every_accuracy():
    metrics = {"a": {"eval_loss": 1.0, "eval_samples": 1.0, "eval_accuracy": 1.0},
               "b": {"eval_loss": 3.0, "eval_samples": 3.0, "eval_accuracy": 0.0}, "c": {"train_loss": 1.0}}
    assert federated_evaluation(metrics, 0) == {"model_version": 0, "clients": 2, "samples": 4, "loss": 2.5,
                                                "accuracy": 0.25}
    del metrics["a"]["eval_accuracy"]
    assert "accuracy" not in federated_evaluation(metrics, 0)
    assert federated_evaluation({"c": {"train_loss": 1.0}}, 0) is None


def test_jsonl_files_and_the_report(tmp_path):
    records = [RoundRecord.from_dict(LINE), RoundRecord(round=3, aggregated=False, selected=["1"], dropped=["1"])]
    (tmp_path / "metrics.jsonl").write_text(to_jsonl(records) + "\n")
    assert read_jsonl(tmp_path / "metrics.jsonl") == records == read_metrics(tmp_path)
    data = report_data(records)
    assert data["rounds"] == [2] and data["clients"] == ["0", "1", "2"]
    assert data["participation"] == [[1.0], [0.5], [1.0]]
    for bad in ("[1, 2]\n", '{"no": "round"}\n', "{nope\n"):
        (tmp_path / "metrics.jsonl").write_text(bad)
        with pytest.raises(ReportError, match="metrics.jsonl is not"):
            read_metrics(tmp_path)
