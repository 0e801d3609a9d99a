"""Real fl-server and fl-client processes over real gRPC on localhost."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import round_timeline
from common import timeline
from tests.integration.conftest import ENV, free_port, read_metrics
from tests.integration.test_reliability import wait_for

pytestmark = pytest.mark.integration


def test_three_clients_reach_90_percent_within_10_rounds(federation, monkeypatch, tmp_path):
    # With FL_TIMELINE the processes mark each round's moments (bench/round_timeline.py): checked below.
    monkeypatch.setitem(ENV, timeline.ENV, str(tmp_path / "marks"))
    server = federation.start_server("--rounds", "10", "--num-clients", "3", "--clients-per-round", "3",
                                     "--model-name", "cnn")
    for i in range(3):
        federation.start_client(str(i))
    codes = federation.wait_clients()
    assert codes == {"0": 0, "1": 0, "2": 0}, [federation.client_log(c) for c in codes]

    metrics = read_metrics(federation.out)
    assert [m["round"] for m in metrics] == list(range(1, 11))
    assert max(m["accuracy"] for m in metrics) >= 0.90
    assert metrics[-1]["accuracy"] >= 0.90
    for m in metrics:
        assert m["clients"] == ["0", "1", "2"]
        assert m["num_samples"] == 1437  # the three shares of the 1,437 training digits
        assert m["seconds"] > 0 and 0 <= m["loss"] < 10

    # The final model is a plain state_dict that loads without running any code from the file.
    state = torch.load(federation.out / "final_model.pt", weights_only=True)
    assert "classifier.2.weight" in state

    # The server keeps serving after the last round, then stops cleanly on SIGTERM.
    assert server.proc.poll() is None
    assert server.stop() == 0
    assert any("finished 10 rounds" in line for line in server.lines)
    for text in ["".join(server.stderr_lines), *map(federation.client_log, codes)]:
        assert "Traceback" not in text

    # Every round's moments, from every process, in the order they happen.
    rounds = round_timeline.by_round(timeline.read(tmp_path / "marks"))
    for n in range(1, 11):
        r = rounds[n]
        opened, closed = r[("server", "open")][0], r[("server", "closed")][0]
        for c in ("0", "1", "2"):
            who = f"client {c}"
            task, submit, send = r[(who, "task")][0], r[(who, "submit")][0], r[(who, "send")][0]
            assert opened <= min(t for (w, e), ts in r.items() if e == "train" for t in ts) <= task
            assert task < submit <= send < closed < r[(who, "answer")][0]
        assert len(round_timeline.events_of(r, "counted", "server")) == 3
        assert max(round_timeline.events_of(r, "counted", "server")) <= closed


def test_client_started_before_the_server_waits_and_joins(federation):
    port = free_port()
    client = federation.start_client("0", server=f"127.0.0.1:{port}")
    # It tries, fails and tries again (each failure is logged) instead of giving up.
    wait_for(lambda: federation.client_log("0").count("unavailable") >= 2 or client.poll() is not None,
             what="the client retrying")
    assert client.poll() is None, "the client gave up instead of waiting for the server"
    federation.start_server("--rounds", "2", "--num-clients", "1", "--clients-per-round", "1",
                            "--model-name", "mlp", port=port)
    assert federation.wait_clients(timeout=120) == {"0": 0}
    assert "unavailable" in federation.client_log("0")  # it really did retry
    assert [m["clients"] for m in read_metrics(federation.out)] == [["0"], ["0"]]
    assert federation.server.stop() == 0


def test_clients_train_on_shards_written_by_fl_partition(federation, tmp_path):
    shards = tmp_path / "shards"
    bin_dir = __import__("pathlib").Path(sys.executable).parent
    done = subprocess.run([str(bin_dir / "fl-partition"), "--clients", "2", "--out", str(shards)],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    federation.start_server("--rounds", "3", "--clients-per-round", "2", "--model-name", "mlp")
    federation.start_client("alice", "--data", str(shards / "shard0"))
    federation.start_client("bob", "--data", str(shards / "shard1"))
    assert federation.wait_clients(timeout=120) == {"alice": 0, "bob": 0}
    metrics = read_metrics(federation.out)
    assert len(metrics) == 3 and all(m["clients"] == ["alice", "bob"] for m in metrics)
    assert metrics[-1]["num_samples"] == 1437
    assert metrics[-1]["accuracy"] > 0.8


def test_restarted_server_resumes_from_its_checkpoint(federation):
    args = ("--rounds", "2", "--num-clients", "1", "--clients-per-round", "1", "--model-name", "mlp")
    federation.start_server(*args)
    federation.start_client("0")
    assert federation.wait_clients(timeout=120) == {"0": 0}
    assert federation.server.stop() == 0
    first = read_metrics(federation.out)

    # Same --out, more rounds: it continues at round 3 rather than starting over.
    server = federation.start_server("--rounds", "4", *args[2:])
    federation.clients.clear()
    federation.start_client("0")
    assert federation.wait_clients(timeout=120) == {"0": 0}
    metrics = read_metrics(federation.out)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[:2] == first
    assert server.stop() == 0


def test_non_iid_shares_with_fedprox_and_a_server_optimizer(federation):
    federation.start_server("--rounds", "6", "--num-clients", "3", "--clients-per-round", "3", "--model-name", "mlp",
                            "--partition", "dirichlet:0.3", "--mu", "0.01", "--server-optimizer", "fedavgm",
                            "--server-lr", "0.7", "--compression", "int8")
    for i in range(3):
        federation.start_client(str(i))
    assert federation.wait_clients() == {"0": 0, "1": 0, "2": 0}
    assert "dirichlet:0.3" in federation.client_log("0")
    metrics = read_metrics(federation.out)
    assert len(metrics) == 6 and metrics[-1]["num_samples"] == 1437
    assert metrics[-1]["accuracy"] > metrics[0]["accuracy"]
    assert federation.server.stop() == 0


def test_a_differentially_private_run_reports_the_privacy_spent_each_round(federation):
    server = federation.start_server("--rounds", "3", "--num-clients", "3", "--clients-per-round", "3",
                                     "--model-name", "mlp", "--dp-noise-multiplier", "0.5", "--dp-clip", "0.5",
                                     "--local-epochs", "1")
    for i in range(3):
        federation.start_client(str(i))
    assert federation.wait_clients() == {"0": 0, "1": 0, "2": 0}
    metrics = read_metrics(federation.out)
    spent = [m["epsilon"] for m in metrics]
    assert len(spent) == 3 and 0 < spent[0] < spent[1] < spent[2] and metrics[0]["delta"] == 1e-5
    assert sum("privacy spent: epsilon" in line for line in server.lines) == 3
    assert server.stop() == 0


def test_an_autoencoder_federation_then_anomaly_scores_from_its_final_model(federation, tmp_path):
    server = federation.start_server("--rounds", "3", "--num-clients", "2", "--clients-per-round", "2",
                                     "--model-name", "autoencoder", "--optimizer", "adam", "--lr", "0.001")
    for i in range(2):
        federation.start_client(str(i))
    assert federation.wait_clients() == {"0": 0, "1": 0}
    metrics = read_metrics(federation.out)
    assert [m["accuracy"] for m in metrics] == [None, None, None]  # no accuracy: reconstruction error only
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert any("reconstruction error (MSE)" in line for line in server.lines)
    assert server.stop() == 0
    scores = tmp_path / "scores.csv"
    done = subprocess.run([str(Path(sys.executable).parent / "fl-anomaly"), "score", "--model",
                           str(federation.out / "final_model.pt"), "--out", str(scores)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "360 samples scored" in done.stdout
    assert len(scores.read_text().splitlines()) == 361
    # fl-report plots the reconstruction error, there being no accuracy.
    done = subprocess.run([str(Path(sys.executable).parent / "fl-report"), str(federation.out)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (federation.out / "loss.png").is_file() and not (federation.out / "accuracy.png").exists()
    assert "final reconstruction error (MSE)" in (federation.out / "report.md").read_text()


def test_clients_evaluate_the_global_model_on_data_they_hold_out(federation):
    server = federation.start_server("--rounds", "3", "--num-clients", "3", "--clients-per-round", "3",
                                     "--model-name", "mlp", "--eval-fraction", "0.2")
    for i in range(3):
        federation.start_client(str(i))
    assert federation.wait_clients() == {"0": 0, "1": 0, "2": 0}
    metrics = read_metrics(federation.out)
    for m in metrics:
        for report in m["client_metrics"].values():
            assert 0 <= report["eval_accuracy"] <= 1 and report["eval_samples"] == 96  # 20% of each 479-digit share
        evaluation = m["federated_evaluation"]
        assert evaluation["model_version"] == m["round"] - 1 and evaluation["clients"] == 3
        assert evaluation["samples"] == 288
    assert m["num_samples"] == 1437 - 288  # the held-out part is never trained on
    # The first round's clients evaluated the untrained model; later ones a trained one.
    assert metrics[0]["federated_evaluation"]["accuracy"] < 0.3 < metrics[-1]["federated_evaluation"]["accuracy"]
    assert server.stop() == 0


def test_a_users_own_model_class_needs_each_clients_consent(federation, monkeypatch):
    from tests.integration import conftest

    # The federation's processes import the class from this repository's tests/models/tiny.py.
    monkeypatch.setitem(conftest.ENV, "PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    name = "tests.models.tiny:TinyNet"
    server = federation.start_server("--rounds", "2", "--num-clients", "2", "--clients-per-round", "2",
                                     "--model-name", name)
    wary = federation.start_client("0")
    assert wary.wait(60) == 2
    log = federation.client_log("0")
    assert f"start fl-client with --allow-model {name}" in log and "Traceback" not in log
    federation.start_client("0", "--allow-model", name)
    federation.start_client("1", "--allow-model", name)
    assert federation.wait_clients() == {"0": 0, "1": 0}
    assert read_metrics(federation.out)[-1]["accuracy"] > 0.5
    assert server.stop() == 0


def test_a_client_trains_under_bf16_autocast(federation):
    federation.start_server("--rounds", "2", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp")
    federation.start_client("0", "--autocast", "bf16")
    federation.start_client("1")
    assert federation.wait_clients() == {"0": 0, "1": 0}, federation.client_log("0")
    assert read_metrics(federation.out)[-1]["accuracy"] > 0.8
    assert federation.client_log("0").count("(bfloat16 autocast)") == 2
    assert federation.server.stop() == 0


def test_a_client_trains_data_parallel_across_two_devices(federation):
    federation.start_server("--rounds", "2", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp")
    federation.start_client("0", "--devices", "cpu,cpu")  # DDP with gloo: the path NCCL takes on GPUs
    federation.start_client("1")
    assert federation.wait_clients() == {"0": 0, "1": 0}, federation.client_log("0")
    metrics = read_metrics(federation.out)
    assert len(metrics) == 2 and metrics[-1]["accuracy"] > 0.8
    assert metrics[-1]["client_metrics"]["0"]["train_loss"] > 0
    assert federation.client_log("0").count("data-parallel across cpu, cpu") == 2  # both rounds took the DDP path
    assert federation.server.stop() == 0
