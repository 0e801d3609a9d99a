"""Users' own code and data through the client API, with real fl-server and fl-client processes."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.integration.conftest import ENV, read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

FLAKY_APP = textwrap.dedent('''
    """Trains as the built-in app does, except that round 2 raises, as users' code sometimes does."""
    from fl_client.builtin import BuiltinTraining

    builtin = BuiltinTraining()


    def train(task):
        if task.round == 2:
            raise RuntimeError("the user's bug")
        return builtin.train(task)
''')


def test_a_client_whose_training_raises_is_reported_not_waited_for(federation, tmp_path):
    (tmp_path / "flaky.py").write_text(FLAKY_APP)
    # A 90 s deadline: a round that waited for the failed client would take that long.
    server = federation.start_server("--rounds", "3", "--num-clients", "3", "--clients-per-round", "3",
                                     "--min-fit", "2", "--round-timeout", "90", "--model-name", "mlp",
                                     "--local-epochs", "1")
    started = time.monotonic()
    federation.start_client("0")
    federation.start_client("1")
    federation.start_client("2", "--app", f"{tmp_path / 'flaky.py'}:train")
    assert federation.wait_clients(timeout=120) == {"0": 0, "1": 0, "2": 0}, federation.client_log("2")
    assert time.monotonic() - started < 60
    assert server.stop() == 0
    records = read_metrics(federation.out)
    assert [r["round"] for r in records] == [1, 2, 3] and all(r["aggregated"] for r in records)
    assert records[1]["clients"] == ["0", "1"]
    assert records[1]["drop_reasons"] == {"2": "failed on the client: RuntimeError: the user's bug"}
    assert records[2]["clients"] == ["0", "1", "2"]  # it carried on with the next round
    log = federation.client_log("2")
    assert "round 2 failed here (RuntimeError: the user's bug); reported to the server" in log
    assert "Traceback" not in log


def test_fl_client_reads_an_image_folder_with_no_conversion_step(federation, tmp_path):
    subprocess.run([sys.executable, str(EXAMPLES / "image_classification" / "make_data.py"), "--clients", "2",
                    "--out", str(tmp_path / "pictures")], check=True, env=ENV, capture_output=True, timeout=120)
    # The server holds no data; class folders 0..9 are the labels (no `classes` named).
    server = federation.start_server("--dataset", "none", "--model-name", "cnn", "--input-shape", "1,16,16",
                                     "--num-classes", "10", "--rounds", "3", "--num-clients", "2",
                                     "--clients-per-round", "2", "--eval-fraction", "0.2", "--local-epochs", "1")
    for cid in "01":
        federation.start_client(cid, "--data", str(tmp_path / "pictures" / f"client{cid}"))
    assert federation.wait_clients() == {"0": 0, "1": 0}, federation.client_log("0")
    assert server.stop() == 0
    evaluations = [r["federated_evaluation"] for r in read_metrics(federation.out)]
    assert len(evaluations) == 3 and all(e["clients"] == 2 for e in evaluations)
    assert evaluations[-1]["accuracy"] > evaluations[0]["accuracy"]
    assert "training on" in federation.client_log("0") and "719 samples" in federation.client_log("0")
