"""Secure aggregation over the wire: real fl-server and fl-client processes, two of them killed mid-round."""
from __future__ import annotations

import sys
import textwrap

from tests.integration.conftest import read_metrics

# Killed after its masked upload, before it reveals its shares: the process ends where the reveal begins.
DIES_AFTER_UPLOAD = textwrap.dedent("""
    import os, sys
    from fl_client import secure
    secure.SecureRound.reveal = lambda self: os._exit(0)
    from fl_client.cli import main
    sys.exit(main(sys.argv[2:]))  # after the fl-client path the test puts first
""")

# Killed after the key exchange, before its masked upload: the process ends while it trains.
DIES_WHILE_TRAINING = textwrap.dedent("""
    import os
    def train(task):
        os._exit(0)
""")


def test_a_secure_federation_survives_clients_killed_before_and_after_their_upload(federation, tmp_path):
    (tmp_path / "dies_after_upload.py").write_text(DIES_AFTER_UPLOAD)
    (tmp_path / "dies_while_training.py").write_text(DIES_WHILE_TRAINING)
    # Six clients, threshold 3: with two of them gone, every secret still has three shares to reveal. (With
    # five, one survivor's self mask would have two, and the round would be re-run: tests/unit/test_secure_rounds.py.)
    server = federation.start_server(
        "--secure-aggregation", "true", "--secagg-threshold", "3", "--rounds", "1", "--num-clients", "6",
        "--clients-per-round", "6", "--min-fit", "3", "--model-name", "mlp",
        "--local-epochs", "1", "--heartbeat-seconds", "0.5", "--secagg-stage-timeout", "30", "--round-timeout", "90")
    for cid in "0123":
        federation.start_client(cid)
    federation.start_client("4", prefix=[sys.executable, str(tmp_path / "dies_after_upload.py")])
    federation.start_client("5", "--app", f"{tmp_path / 'dies_while_training.py'}:train")
    codes = federation.wait_clients(timeout=180)
    assert {c: codes[c] for c in "0123"} == {c: 0 for c in "0123"}, federation.client_log("0")
    assert server.stop() == 0
    (first,) = read_metrics(federation.out)
    assert first["aggregated"] and first["accuracy"] is not None
    assert first["clients"] == ["0", "1", "2", "3", "4"]  # 4's masked update counts: its masks were removed
    assert "silent" in first["drop_reasons"]["5"]
    assert 5 * 239 <= first["num_samples"] <= 5 * 240  # the total weight, from the unmasked sum (each header says 1)
    log = federation.client_log("0")
    assert "secure aggregation: keys exchanged" in log and "shares revealed" in log
