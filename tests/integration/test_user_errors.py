"""Every error a user can cause ends in one sentence on stderr, never a traceback."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ENV, free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def run(tool, *args, timeout=60):
    return subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def assert_clear_error(done, *fragments, code=2):
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    error_lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in error_lines[0]


def test_unknown_config_key(tmp_path):
    conf = tmp_path / "conf.json"
    conf.write_text(json.dumps({"model_name": "cnn", "globl_epochs": 3}))
    assert_clear_error(run("fl-server", "--config", str(conf), "--port", "0"), "unknown config key 'globl_epochs'")


def test_bad_config_value_from_a_flag(tmp_path):
    assert_clear_error(run("fl-server", "--clients-per-round", "0", "--out", str(tmp_path)),
                       "'clients_per_round': must be at least 1")


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_clear_error(run("fl-server", "--port", str(port), "--out", str(tmp_path), "--insecure"),
                           f"cannot listen on 127.0.0.1:{port}", "--port")


def test_missing_data_folder(tmp_path):
    assert_clear_error(run("fl-client", "--id", "0", "--data", str(tmp_path / "nowhere")),
                       "does not exist", "fl-partition")


def test_empty_data_folder(tmp_path):
    assert_clear_error(run("fl-client", "--id", "0", "--data", str(tmp_path)), "holds no shard")


def test_unreachable_server():
    done = run("fl-client", "--id", "0", "--server", f"127.0.0.1:{free_port()}", "--give-up-after", "2", "--insecure")
    assert_clear_error(done, "unreachable", "check that fl-server runs there", code=3)


def test_cuda_requested_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_clear_error(run("fl-client", "--id", "0", "--device", "cuda"), "CUDA is not available")


def test_missing_mnist_files(tmp_path):
    assert_clear_error(run("fl-server", "--dataset", "mnist", "--data-root", str(tmp_path), "--out", str(tmp_path)),
                       "MNIST file", "not found")


SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def test_client_data_that_does_not_fit_the_federations_model(federation, tmp_path):
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"no MNIST copy at {SHARED_MNIST}")
    assert run("fl-partition", "--clients", "1", "--out", str(tmp_path / "shards")).returncode == 0
    federation.start_server("--dataset", "mnist", "--data-root", str(SHARED_MNIST), "--clients-per-round", "1",
                            "--model-name", "mlp")
    proc = federation.start_client("0", "--data", str(tmp_path / "shards" / "shard0"))
    assert proc.wait(60) == 2
    text = federation.client_log("0")
    assert "Traceback" not in text
    assert "shape [1, 8, 8]" in text and "[1, 28, 28]" in text and "(mnist)" in text


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    import torch

    from common.messages import ModelSpec
    from common.models import build_model
    from fl_server.checkpoint import Checkpoint, RunFolder
    from fl_server.config import config_hash, load

    spec = ModelSpec("mlp", (1, 8, 8), 10)
    run_folder = RunFolder(tmp_path)
    run_folder.save_checkpoint(Checkpoint(model=build_model(spec).state_dict(), model_version=1, rng_state={},
                                          model_spec=spec, config_hash=config_hash(load(lr=0.5, model_name="mlp"))))
    assert_clear_error(run("fl-server", "--model-name", "mlp", "--out", str(tmp_path)),
                       "other training settings", "--allow-config-change")
    assert_clear_error(run("fl-server", "--model-name", "cnn", "--out", str(tmp_path)),
                       "holds a ['mlp', [1, 8, 8], 10] model")
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_clear_error(run("fl-server", "--out", str(tmp_path)), "unreadable", "move it away")
    del torch


def test_bad_log_level_and_unwritable_paths(tmp_path):
    assert_clear_error(run("fl-server", "--log-level", "loud", "--out", str(tmp_path)), "unknown --log-level 'loud'")
    assert_clear_error(run("fl-client", "--id", "0", "--log-level", "loud"), "unknown --log-level 'loud'")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clear_error(run("fl-server", "--out", str(blocker / "run")), "cannot use", "--out")
    assert_clear_error(run("fl-client", "--id", "0", "--log-file", str(blocker / "x.log")), "cannot write the log file")


def test_client_without_data_and_without_a_share_is_refused_at_its_join(federation):
    """Items 10 and 11: refused by the server at once (not selected and waited for), and a client without
    data that has a share is logged with it rather than as `0 samples`."""
    import time

    federation.start_server("--num-clients", "3", "--clients-per-round", "1", "--rounds", "1")
    assert_clear_error(run("fl-client", "--id", "7", "--server", federation.server.address, "--insecure",
                           "--device", "cpu"),
                       "the server refused this client", "share 7", "--id 0..2 or give it --data", "INVALID_ARGUMENT")
    assert_clear_error(run("fl-client", "--id", "alice", "--server", federation.server.address, "--insecure",
                           "--device", "cpu"), "has no data of its own", "INVALID_ARGUMENT")
    federation.start_client("0")
    assert federation.wait_clients() == {"0": 0}
    federation.server.stop()  # after its last round a server keeps serving the final model
    deadline = time.monotonic() + 10
    while "stopped" not in "".join(federation.server.stderr_lines) and time.monotonic() < deadline:
        time.sleep(0.1)  # the reader thread may still be catching up with the exited server's output
    log = "".join(federation.server.stderr_lines)
    assert "client 0 joined (share 0 of digits, cpu)" in log and "(0 samples" not in log
    assert "client 0 trains on " in log
    assert "client 7 " not in log.replace("client 7 has no data", "")  # never admitted


def test_the_users_own_code_and_files_that_cannot_be_used(tmp_path, monkeypatch):
    """A model class, aggregation rule or evaluation function that cannot be imported, and initial weights
    that do not fit: one sentence each from fl-server at start-up, saying where the module must be."""
    from tests.integration import conftest

    monkeypatch.setitem(conftest.ENV, "PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    out = ("--out", str(tmp_path / "run"), "--dataset", "none", "--input-shape", "1,8,8", "--num-classes", "10")
    assert_clear_error(run("fl-server", *out, "--model-name", "tests.models.nowhere:Net"),
                       "cannot import model class 'tests.models.nowhere:Net' (ModuleNotFoundError",
                       "must be importable by fl-server: in the folder it runs in, on its PYTHONPATH")
    assert_clear_error(run("fl-server", *out, "--model-name", "tests.models.tiny:Explodes"),
                       "failed to build as Explodes", "this model needs a GPU")
    assert_clear_error(run("fl-server", *out, "--model-name", "mlp", "--aggregator", "tests.custom_rules:LacksFold"),
                       "does not keep the Aggregator protocol", "lacks begin_round, check, fold")
    (tmp_path / "w.pt").write_bytes(b"not weights")
    assert_clear_error(run("fl-server", *out, "--model-name", "mlp", "--initial-weights", str(tmp_path / "w.pt")),
                       f"cannot read initial_weights {tmp_path / 'w.pt'}")
