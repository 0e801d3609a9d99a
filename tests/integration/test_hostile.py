"""A live fl-server under a bounded hostile load (loopback only): a few hundred update streams that never
send a header, a selected client whose upload stalls after its header, and a half-sent HTTP request to the
monitoring endpoint. The honest federation must still finish its rounds, and each attacker gets the status
the limits promise. The full measurement is `python -m bench.hostile` (docs/security.md)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.request
from collections import Counter

import pytest

from bench import hostile, loadgen
from fl_tools.processes import ServerProcess
from tests.integration.conftest import ENV, read_metrics

pytestmark = pytest.mark.integration

IDLE = 300
ROUNDS = 3


def test_honest_rounds_finish_under_idle_streams_a_stalled_upload_and_a_half_sent_request(tmp_path):
    out = tmp_path / "run"
    # Three clients, all selected every round: two honest ones and "mallory", whose upload stalls; a round
    # needs the two honest updates only. One receive buffer, so that a stall would block every upload.
    server = ServerProcess(["--port", "0", "--metrics-port", "0", "--out", str(out), "--rounds", str(ROUNDS),
                            "--model-name", "mlp", "--num-clients", "3", "--clients-per-round", "3", "--min-fit", "2",
                            "--max-uploads", "1", "--first-message-timeout", "2", "--upload-progress-timeout", "2",
                            "--round-timeout", "120", "--metrics-request-timeout", "2"], env=ENV)
    idle_codes: Counter = Counter()
    stall_codes: Counter = Counter()
    try:
        half = socket.create_connection(("127.0.0.1", server.metrics_port))
        half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never finished
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as reply:
            assert reply.status == 200  # served beside the half-sent request
        attack_seconds = 12.0
        attackers = [
            threading.Thread(target=lambda: asyncio.run(hostile.idle_streams(server.address, IDLE, attack_seconds,
                                                                             idle_codes)), daemon=True),
            threading.Thread(target=lambda: asyncio.run(hostile.stalled_uploads(server.address, attack_seconds,
                                                                                stall_codes)), daemon=True),
        ]
        for attacker in attackers:
            attacker.start()
        time.sleep(1.0)  # the idle streams are open before the honest clients start
        stats = loadgen.run(server.address, 2, prefix="honest")
        assert stats.errors == []
        assert stats.submits == 2 * ROUNDS
        half.settimeout(10)
        assert half.recv(1) == b""  # the half-sent request was closed after metrics_request_timeout
        assert time.monotonic() - started < 60
        for attacker in attackers:
            attacker.join(attack_seconds + 30)
    finally:
        server.stop()
    records = read_metrics(out)
    assert [r["round"] for r in records if r["aggregated"]] == list(range(1, ROUNDS + 1))
    for record in records:
        assert sorted(record["clients"]) == ["honest0", "honest1"]
        assert "stalled" in record["drop_reasons"]["mallory"]
    # Each idle stream was ended with the first-message deadline's status, and no call was refused for
    # want of a thread.
    assert idle_codes["DEADLINE_EXCEEDED"] >= IDLE
    assert set(idle_codes) == {"DEADLINE_EXCEEDED"}
    assert stall_codes["DEADLINE_EXCEEDED"] >= ROUNDS
    print(json.dumps({"idle": idle_codes, "stalled": stall_codes}))
