"""A server that holds no data (`--dataset none`): the model comes from its flags and its first weights from
a file; clients bring their own data; the rounds are recorded without a server-side test result, and
the clients' federated evaluation takes its place."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from common.datasets import load_digits
from common.messages import ModelSpec
from common.models import build_model
from tests.integration.conftest import ENV, read_metrics
from tests.integration.test_user_errors import assert_clear_error, run
from tests.unit.test_weights import safetensors_bytes

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def pretrained_mlp() -> dict[str, torch.Tensor]:
    """An MLP trained on the digits for a moment (well above chance), as a pretrained model would be."""
    train, _ = load_digits()
    torch.manual_seed(0)
    model = build_model(ModelSpec("mlp", (1, 8, 8), 10), seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(train.x), train.y).backward()
        optimizer.step()
    return model.state_dict()


def test_rounds_without_a_data_set_start_from_the_initial_weights(federation, tmp_path):
    weights = tmp_path / "pretrained.safetensors"
    weights.write_bytes(safetensors_bytes(pretrained_mlp()))
    shards = tmp_path / "shards"
    done = subprocess.run([str(BIN / "fl-partition"), "--clients", "2", "--out", str(shards)], capture_output=True,
                          text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    server = federation.start_server("--dataset", "none", "--model-name", "mlp", "--input-shape", "1,8,8",
                                     "--num-classes", "10", "--initial-weights", str(weights), "--rounds", "2",
                                     "--num-clients", "2", "--clients-per-round", "2", "--eval-fraction", "0.2",
                                     "--report")
    # A client with no data of its own has nothing to train on: refused at its join, in one sentence.
    assert_clear_error(run("fl-client", "--id", "0", "--server", server.address, "--insecure", "--device", "cpu"),
                       "the server refused this client", "names no data set", "--data DIR")
    federation.start_client("alice", "--data", str(shards / "shard0"))
    federation.start_client("bob", "--data", str(shards / "shard1"))
    assert federation.wait_clients(timeout=180) == {"alice": 0, "bob": 0}

    metrics = read_metrics(federation.out)
    assert [m["round"] for m in metrics] == [1, 2] and all(m["aggregated"] for m in metrics)
    for m in metrics:
        assert m["accuracy"] is None and m["loss"] is None and "server_metrics" not in m
        assert m["federated_evaluation"]["model_version"] == m["round"] - 1
        assert m["federated_evaluation"]["clients"] == 2
    # Round 1's clients evaluated version 0: the pretrained weights, not random ones (about 10%).
    assert metrics[0]["federated_evaluation"]["accuracy"] > 0.8

    assert server.stop() == 0  # after the report, which the round loop writes at the end
    deadline = time.monotonic() + 10
    while not any("finished 2 rounds" in line for line in server.lines) and time.monotonic() < deadline:
        time.sleep(0.1)  # the reader thread may still be catching up with the exited server's output
    lines = "".join(server.lines)
    assert "round 1/2: clients' evaluation of model version 0: accuracy" in lines
    assert "finished 2 rounds" in lines and "not evaluated" not in lines
    assert "Traceback" not in "".join(server.stderr_lines)
    for name in ("client_metrics", "federated", "participation"):
        assert (federation.out / f"{name}.png").is_file(), name
    assert not (federation.out / "accuracy.png").exists()
    assert "train_loss" in (federation.out / "report.md").read_text()
