"""Values a client sends, checked before anything uses them; a registry that stays bounded whatever ids
clients make up; a round loop that survives a bad record; logs that a client cannot forge lines in.
The numbers in the test names are the issue's items."""
import dataclasses
import logging
import math
import threading

import grpc
import pytest
import torch

from common import convert, logs
from common.datasets import ArrayData
from common.messages import JoinRequest, ModelSpec
from common.models import build_model
from common.proto import federation_pb2 as pb
from fl_server import errors, records
from fl_server.checkpoint import RunFolder
from fl_server.coordinator import Coordinator
from fl_server.membership import RegistryLimits
from fl_server.records import RoundRecord, federated_evaluation
from fl_server.servicer import STATUS_FOR
from fl_server.uploads import MetricLimits
from tests.unit.test_rounds import CONFIG, GUARD, diff, join, make_state, started, update

GOOD_EVALUATION = {"eval_loss": 0.5, "eval_samples": 20.0, "eval_accuracy": 0.75}


def submit_with(state, cid, metrics):
    header, payload = update(state, cid, diff(1.0))
    return state.submit(dataclasses.replace(header, metrics=metrics), payload.chunks())


# --- 1: federated evaluation's fields ----------------------------------------------------------------

@pytest.mark.parametrize("metrics", [
    {"eval_samples": 5.0},  # without eval_loss: a KeyError in federated_evaluation before
    {"eval_loss": 1.0},
    {"eval_accuracy": 0.5},
    {"eval_loss": 1.0, "eval_samples": math.inf},  # an OverflowError in int(samples) before
    {"eval_loss": 1.0, "eval_samples": 0.0},
    {"eval_loss": 1.0, "eval_samples": -3.0},
    {"eval_loss": 1.0, "eval_samples": 2.5},
    {"eval_loss": -1.0, "eval_samples": 2.0},
    {"eval_loss": math.nan, "eval_samples": 2.0},
    {"eval_loss": 1.0, "eval_samples": 2.0, "eval_accuracy": 1.5},
    {"eval_loss": 1.0, "eval_samples": 2.0, "eval_accuracy": -0.1},
    {"eval_loss": 1.0, "eval_samples": 1e13},  # more samples than any client holds (MAX_NUM_SAMPLES)
])
def test_1_an_incomplete_or_out_of_range_evaluation_is_refused(metrics):
    state = started(k=1)
    with pytest.raises(errors.InvalidUpdateError, match="eval_"):
        submit_with(state, "a", metrics)
    assert state.status()["clients"]["a"]["state"] == "training"  # not counted: it may send a good one


@pytest.mark.parametrize("metrics", [GOOD_EVALUATION, {"eval_loss": 0.01, "eval_samples": 3.0}, {}])
def test_1_complete_evaluations_and_none_are_accepted(metrics):
    state = started(k=1)
    assert submit_with(state, "a", {"train_loss": 0.3, **metrics}).accepted
    outcome = state.close_round()
    assert outcome.aggregated and outcome.client_metrics["a"] == {"train_loss": 0.3, **metrics}
    assert (RoundRecord.of(outcome).federated_evaluation is None) == (not metrics)


def test_1_federated_evaluation_leaves_out_what_it_cannot_use():
    """Behind the check, the record itself never raises on a client's metrics."""
    good = {"eval_loss": 1.0, "eval_samples": 4.0}
    assert federated_evaluation({"a": {"eval_samples": 5.0}, "b": good}, 0) == {
        "model_version": 0, "clients": 1, "samples": 4, "loss": 1.0}
    assert federated_evaluation({"a": {"eval_loss": 1.0, "eval_samples": math.inf}}, 0) is None
    assert federated_evaluation({"a": {"eval_loss": 1e308, "eval_samples": 1e308},
                                 "b": {"eval_loss": 1e308, "eval_samples": 1e308}}, 0) is None


def small_coordinator(tmp_path, state):
    spec = ModelSpec("mlp", (1, 2, 2), 2)
    test_data = ArrayData(torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64), 2)
    return Coordinator(state, rounds=1, model_spec=spec, test_data=test_data, run=RunFolder(tmp_path),
                       config_hash="test", report=lambda line: None)


def test_1_the_round_loop_survives_a_record_or_an_evaluation_that_fails(tmp_path, monkeypatch, caplog):
    """Whatever slips past the checks: a failure to record the clients' metrics or to evaluate the model
    is logged, and the run goes on to its end."""
    model_state = build_model(ModelSpec("mlp", (1, 2, 2), 2), seed=0).state_dict()
    state = make_state(k=1, timeout=GUARD, clock=lambda: 0.0, global_state=model_state)
    coordinator = small_coordinator(tmp_path, state)

    def broken(client_metrics, model_version):  # as federated_evaluation did with eval_samples alone
        if client_metrics:
            raise KeyError("eval_loss")

    monkeypatch.setattr(records, "federated_evaluation", broken)
    monkeypatch.setattr(coordinator, "evaluate", lambda state: (_ for _ in ()).throw(OverflowError("inf")))
    join(state, "a")
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("done", coordinator.run()), daemon=True)
    thread.start()
    assert state.wait_for(lambda: state.status()["selected"] == ["a"], GUARD)
    header, payload = update(state, "a", {k: torch.ones_like(v) for k, v in model_state.items()})
    assert state.submit(dataclasses.replace(header, metrics=GOOD_EVALUATION), payload.chunks()).accepted
    thread.join(GUARD)
    assert result == {"done": True}
    [record] = coordinator.records()
    assert record.aggregated and record.client_metrics == {} and record.loss is None
    assert "could not be recorded" in caplog.text and "evaluating the model failed" in caplog.text
    assert (tmp_path / "final_model.pt").exists()


def test_1_a_metrics_log_that_cannot_be_written_stops_nothing(tmp_path, monkeypatch, caplog):
    state = make_state(k=1)
    coordinator = small_coordinator(tmp_path, state)

    def full(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(coordinator.run_folder, "write_metrics", full)
    coordinator._add_record(RoundRecord(round=1))
    assert [r.round for r in coordinator.records()] == [1] and "writing" in caplog.text


# --- 4: a bounded registry ---------------------------------------------------------------------------

def test_4_a_full_registry_in_open_mode_refuses_new_ids_while_all_are_active():
    state = make_state(k=2, registry=RegistryLimits(max_clients=3))
    for cid in ("a", "b", "c"):
        join(state, cid)
    with pytest.raises(errors.RegistryFullError, match="max_clients"):
        join(state, "d")
    join(state, "a")  # a known client is never refused
    assert sorted(state.status()["clients"]) == ["a", "b", "c"]
    assert STATUS_FOR[errors.RegistryFullError] is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_4_a_new_client_takes_the_place_of_the_one_gone_longest():
    state = make_state(k=1, registry=RegistryLimits(max_clients=2))
    join(state, "gone")
    state.clock.advance(1.0)
    join(state, "a")
    state.clock.advance(state.members.silence_limit)  # "gone" is past the silence limit, "a" not yet
    join(state, "new")
    assert sorted(state.status()["clients"]) == ["a", "new"]


def test_4_a_client_whose_long_poll_just_ended_is_not_forgotten_to_make_room():
    """A long-poll lasts longer than the silence limit: the moment it ends, before its client polls again,
    the client was heard from just now, not when the poll began (a Sybil flood evicted honest clients so)."""
    state = make_state(k=2, registry=RegistryLimits(max_clients=2))
    # A poll of 1 s on the fake clock, which it waits for in real seconds (see FakeClock), again and again
    # until the clock has moved past its deadline.
    poll = threading.Thread(target=join, args=(state, "a", 1.0))
    poll.start()
    assert state.wait_for(lambda: state.status()["clients"].get("a", {}).get("state") == "waiting", GUARD)
    state.clock.advance(state.members.silence_limit + 10.0)  # the poll lasted longer than the silence limit
    poll.join(GUARD)
    assert not poll.is_alive()
    join(state, "b")
    with pytest.raises(errors.RegistryFullError, match="^the client registry is full: .*max_clients"):
        join(state, "newcomer")
    assert sorted(state.status()["clients"]) == ["a", "b"]


def test_4_clients_not_heard_from_for_a_while_are_forgotten_but_never_a_selected_one():
    state = make_state(k=1, registry=RegistryLimits(forget_after=600.0))
    join(state, "a")
    join(state, "idle")
    state.clock.advance(1.0)
    join(state, "a")
    state.selector.select = lambda live, k: ["a"]
    assert state.open_round() == ["a"]
    state.clock.advance(700.0)  # "a" trains a long while and says nothing; the round is still open
    join(state, "b")  # a new client: the registry forgets those gone
    assert sorted(state.status()["clients"]) == ["a", "b"]
    assert state.status()["clients"]["a"]["state"] == "training"


def test_4_a_round_samples_only_clients_there_now():
    """2,000 ids that joined once and left count as live for a few seconds, but are not sampled."""
    state = make_state(k=2, registry=RegistryLimits(max_clients=3000))
    for i in range(2000):
        join(state, f"fake{i}")
    state.clock.advance(state.rules.heartbeat_seconds + 2.0)  # beyond a heartbeat, within the silence limit
    join(state, "a")
    join(state, "b")
    assert state.status()["live_clients"] == 2002
    assert state.open_round() == ["a", "b"]


def test_4_without_a_cap_the_registry_only_forgets():
    state = make_state(k=1)
    for i in range(50):
        join(state, str(i))
    assert len(state.status()["clients"]) == 50


# --- 5: metrics --------------------------------------------------------------------------------------

@pytest.mark.parametrize("metrics, match", [
    ({f"m{i}": 1.0 for i in range(33)}, "at most 32 metrics"),
    ({"x" * 65: 1.0}, "max_metric_name_length"),
    ({"x" * 5_000_000: 1.0}, "max_metric_name_length"),
    ({"": 1.0}, "max_metric_name_length"),
    ({"loss\nINFO forged": 1.0}, "max_metric_name_length"),
    ({"lo ss": 1.0}, "max_metric_name_length"),
    ({"train_loss": math.nan}, "finite"),
    ({"train_loss": -math.inf}, "finite"),
    ({"train_loss": 1e16}, "max_metric_value"),
])
def test_5_metrics_beyond_the_limits_are_refused(metrics, match):
    state = started(k=1)
    with pytest.raises(errors.InvalidUpdateError, match=match) as refused:
        submit_with(state, "a", metrics)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300
    assert "a" not in state.close_round().contributors


def test_5_the_limits_are_the_servers_settings():
    state = started(k=1, metrics=MetricLimits(max_metrics=2, max_name_length=5, max_value=10.0))
    with pytest.raises(errors.InvalidUpdateError, match="at most 2 metrics"):
        submit_with(state, "a", {"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(errors.InvalidUpdateError, match="1 to 5 letters"):
        submit_with(state, "a", {"abcdef": 1.0})
    with pytest.raises(errors.InvalidUpdateError, match="at most 10"):
        submit_with(state, "a", {"a": 11.0})
    assert submit_with(state, "a", {"a/b.c": -10.0, "x:y-z": 3.0}).accepted


def test_5_the_client_metrics_are_accepted_as_they_are():
    """What fl-client sends (fl_client/round.py): training's and federated evaluation's metrics."""
    state = started(k=1)
    metrics = {"train_loss": 0.42, "train_seconds": 12.5, **GOOD_EVALUATION}
    assert submit_with(state, "a", metrics).accepted


def raw_update_header(metrics):
    header = pb.UpdateHeader(protocol_version=2, client_id="a", round=1, model_version=0, num_samples=1,
                             metrics=metrics, payload=pb.PayloadHeader(encoding=pb.DIFF))
    return pb.UpdateChunk(header=header).SerializeToString()


def test_5_convert_refuses_too_many_metrics_rather_than_keeping_some():
    many = {f"m{i}": float(i) for i in range(60)}
    assert convert.update_opening_from_raw(raw_update_header(many))[0].metrics == many  # all of them, not 50
    with pytest.raises(convert.MalformedMessage, match="at most 1000 metrics"):
        convert.update_opening_from_raw(raw_update_header({f"m{i}": 0.0 for i in range(convert.MAX_METRICS + 1)}))[0]
    with pytest.raises(convert.MalformedMessage, match="metric names"):
        convert.update_opening_from_raw(raw_update_header({"x" * 5000: 0.0}))[0]


# --- 7: log injection --------------------------------------------------------------------------------

def test_7_safe_escapes_control_characters_and_caps_the_length():
    assert logs.safe("cpu") == "cpu"
    assert logs.safe("cpu\n2024-01-01 INFO forged") == "cpu\\n2024-01-01 INFO forged"
    assert logs.safe("a\x1b[31mb\u202ec\r") == "a\\x1b[31mb\\u202ec\\r"
    assert logs.safe("x" * 1000, 10) == "x" * 10 + "..."
    assert logs.safe("\n" * 1000, 10) == "\\n" * 10 + "..."


def test_7_a_clients_device_cannot_forge_log_lines(caplog):
    state = make_state(k=1)
    with caplog.at_level(logging.INFO, logger="fl_server"):
        state.join(JoinRequest(client_id="a", num_samples=10, device="cpu\n2024-01-01 WARNING forged" + "x" * 500),
                   0)
    [line] = [r.getMessage() for r in caplog.records if "joined" in r.getMessage()]
    assert "\n" not in line and "cpu\\n2024-01-01 WARNING forged" in line and len(line) < 200


# --- 10 and 11: clients without --data ---------------------------------------------------------------

@pytest.mark.parametrize("cid", ["3", "7", "alice"])
def test_10_a_client_without_data_and_without_a_share_is_refused_at_its_join(cid):
    state = make_state(k=1)  # CONFIG: num_clients 3, so shares 0..2
    with pytest.raises(errors.InvalidJoinError, match=r"shares 0\.\.2 .*--id 0\.\.2 or give it --data"):
        state.join(JoinRequest(client_id=cid, num_samples=0), 0)
    assert cid not in state.status()["clients"]
    assert STATUS_FOR[errors.InvalidJoinError] is grpc.StatusCode.INVALID_ARGUMENT


def test_10_clients_with_a_share_or_their_own_data_are_admitted():
    state = make_state(k=1)
    state.join(JoinRequest(client_id="2", num_samples=0), 0)
    state.join(JoinRequest(client_id="alice", num_samples=10), 0)
    assert sorted(state.status()["clients"]) == ["2", "alice"]


def test_11_a_client_without_data_is_logged_with_its_share_then_its_samples(caplog):
    state = make_state(k=1)
    with caplog.at_level(logging.INFO, logger="fl_server"):
        state.join(JoinRequest(client_id="0", num_samples=0, device="cpu"), 0)
        state.join(JoinRequest(client_id="0", num_samples=600, device="cpu"), 0)  # its share loaded
        state.join(JoinRequest(client_id="0", num_samples=600, device="cpu"), 0)
    lines = [r.getMessage() for r in caplog.records]
    assert f"client 0 joined (share 0 of {CONFIG.dataset}, cpu); 1 known" in lines
    assert not any("(0 samples" in line for line in lines)
    assert lines.count("client 0 trains on 600 samples") == 1


def test_a_flood_of_refusals_is_logged_once_a_second_with_a_count(caplog):
    from fl_server.refusals import RefusalLog  # noqa: PLC0415

    now = [0.0]
    refusals = RefusalLog(logging.getLogger("fl_server.servicer"), clock=lambda: now[0])
    full = errors.RegistryFullError("the client registry is full")
    with caplog.at_level(logging.WARNING, logger="fl_server.servicer"):
        for i in range(500):
            now[0] = i * 0.004  # 500 refusals in two seconds
            refusals.refused(f"ipv4:127.0.0.1:{i}", grpc.StatusCode.RESOURCE_EXHAUSTED, full)
        refusals.refused("ipv4:127.0.0.1:1", grpc.StatusCode.UNAUTHENTICATED, errors.RegistryFullError("other"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "(and 249 more RESOURCE_EXHAUSTED refusal(s) not logged)" in lines[1]
    assert "UNAUTHENTICATED" in lines[2]  # each status has its own allowance


def test_a_steady_flood_of_new_ids_still_lets_the_registry_forget_a_client_gone_silent():
    """A full registry is searched for a client to forget at most once a second, however many newcomers
    are refused meanwhile: the window starts at a search, not at each refusal."""
    state = make_state(k=1, registry=RegistryLimits(max_clients=2))
    join(state, "gone")
    join(state, "active")
    admitted_at = None
    for i in range(200):  # a newcomer every 0.1 s; "active" keeps calling, "gone" never does again
        state.clock.advance(0.1)
        join(state, "active")
        try:
            join(state, f"new{i}")
        except errors.RegistryFullError:
            continue
        admitted_at = (i + 1) * 0.1
        break
    assert admitted_at is not None and admitted_at <= state.members.silence_limit + 1.2
    assert "gone" not in state.status()["clients"]
