"""Failures a real deployment meets, with real processes: dead clients, a dead server, broken links."""
import re
import signal
import time

import pytest

from tests.integration.conftest import free_port, read_metrics
from tests.integration.tcp_proxy import CuttingProxy

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def aggregated(out):
    return [m for m in read_metrics(out) if m["aggregated"]]


def test_kill_9_of_a_client_mid_training(federation):
    federation.start_server("--rounds", "6", "--num-clients", "4", "--clients-per-round", "4",
                            "--min-clients", "3", "--min-fit", "3", "--round-timeout", "120",
                            "--heartbeat-seconds", "0.5", "--local-epochs", "10", "--model-name", "cnn")
    for i in range(4):
        federation.start_client(str(i))
    victim = federation.clients["3"]
    wait_for(lambda: "round 2: training on" in federation.client_log("3"), what="client 3 training round 2")
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    del federation.clients["3"]

    assert federation.wait_clients() == {"0": 0, "1": 0, "2": 0}
    metrics = read_metrics(federation.out)
    assert all(m["aggregated"] for m in metrics)
    by_round = {m["round"]: m for m in metrics}
    assert sorted(by_round) == [1, 2, 3, 4, 5, 6]
    assert len(by_round[1]["clients"]) >= 3  # round 1 starts once min_clients (3) have joined
    # The round it died in closes with the other three, long before its 120 s deadline.
    assert by_round[2]["clients"] == ["0", "1", "2"] and by_round[2]["dropped"] == ["3"]
    assert "silent" in by_round[2]["drop_reasons"]["3"]
    assert by_round[2]["seconds"] < 30
    for r in (3, 4, 5, 6):
        assert by_round[r]["clients"] == ["0", "1", "2"]
    assert by_round[6]["accuracy"] >= 0.9


CRASH_ARGS = ["--rounds", "6", "--num-clients", "3", "--clients-per-round", "3", "--local-epochs", "10",
              "--heartbeat-seconds", "0.5", "--model-name", "mlp"]


def start_federation(federation, port: int = 0):
    server = federation.start_server(*CRASH_ARGS, port=port)
    for i in range(3):
        federation.start_client(str(i))
    return server


def finish_federation(federation, server) -> float:
    assert federation.wait_clients() == {"0": 0, "1": 0, "2": 0}
    assert server.stop() == 0
    metrics = aggregated(federation.out)
    assert [m["round"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    assert all(m["clients"] == ["0", "1", "2"] for m in metrics)
    return metrics[-1]["accuracy"]


def test_kill_9_of_the_server_mid_round_then_restart(federation, tmp_path):
    from tests.integration.conftest import Federation

    # The uninterrupted run to compare with runs beside the interrupted one (which mostly waits).
    reference = Federation(tmp_path / "reference")
    (tmp_path / "reference").mkdir()
    try:
        reference_server = start_federation(reference)
        port = free_port()
        server = start_federation(federation, port)
        wait_for(lambda: len(aggregated(federation.out)) == 3, what="round 3")
        wait_for(lambda: "round 4: training on" in federation.client_log("0"), what="round 4 training")
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        # Each client really loses the server before it comes back.
        wait_for(lambda: all("unavailable" in federation.client_log(cid) for cid in "012"),
                 what="every client finding the server gone")
        server = federation.start_server(*CRASH_ARGS, port=port)
        interrupted = finish_federation(federation, server)
        uninterrupted = finish_federation(reference, reference_server)
    finally:
        reference.stop()
    assert abs(interrupted - uninterrupted) <= 0.01, (interrupted, uninterrupted)


def test_upload_cut_midway_is_counted_exactly_once(federation):
    # cnn on digits: a 755 kB update. The proxy breaks the link after 300 kB of it.
    server = federation.start_server("--rounds", "2", "--num-clients", "2", "--clients-per-round", "2",
                                     "--model-name", "cnn")
    proxy = CuttingProxy(server.port, cut_after_upstream_bytes=300_000)
    try:
        federation.start_client("0", server=proxy.address)
        federation.start_client("1")
        assert federation.wait_clients() == {"0": 0, "1": 0}
    finally:
        proxy.close()
    assert proxy.cuts == 1
    log0 = federation.client_log("0")
    assert "SubmitUpdate: server" in log0 and "unavailable" in log0  # the cut hit the upload, which was retried
    metrics = aggregated(federation.out)
    assert [m["clients"] for m in metrics] == [["0", "1"], ["0", "1"]]
    assert all(m["num_samples"] == 1437 for m in metrics)  # 719 + 718: nobody counted twice
    server.stop()
    counted = [line for line in server.stderr_lines if "round 1: update from 0 " in line]
    assert len(counted) == 1


def test_server_restarted_between_rounds(federation):
    args = ["--rounds", "4", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp"]
    port = free_port()
    server = federation.start_server(*args, port=port)
    for i in range(2):
        federation.start_client(str(i))
    wait_for(lambda: len(aggregated(federation.out)) >= 2, what="round 2")
    assert server.stop() == 0  # graceful: SIGTERM
    server = federation.start_server(*args, port=port)
    assert federation.wait_clients() == {"0": 0, "1": 0}
    assert [m["round"] for m in aggregated(federation.out)] == [1, 2, 3, 4]
    assert server.stop() == 0


def test_sigterm_on_a_client_mid_training_leaves_cleanly(federation):
    federation.start_server("--rounds", "3", "--num-clients", "3", "--clients-per-round", "3",
                            "--min-clients", "2", "--min-fit", "2", "--heartbeat-seconds", "0.5",
                            "--local-epochs", "20", "--model-name", "cnn")
    for i in range(3):
        federation.start_client(str(i))
    leaving = federation.clients.pop("2")
    training = re.compile(r"round (\d+): training on")
    wait_for(lambda: training.search(federation.client_log("2")), what="client 2 training")
    leaving.send_signal(signal.SIGTERM)
    interrupted_round = int(training.search(federation.client_log("2")).group(1))
    assert leaving.wait(10) == 0
    assert "terminated; leaving the federation" in federation.client_log("2")
    assert "Traceback" not in federation.client_log("2")
    assert federation.wait_clients() == {"0": 0, "1": 0}
    metrics = aggregated(federation.out)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    # The round it left was closed (or re-run, if too few were left) without it, saying why: the client
    # told the server as it left, so the round did not wait for its silence.
    first_try = next(m for m in read_metrics(federation.out) if m["round"] == interrupted_round)
    assert first_try["dropped"] == ["2"]
    assert first_try["drop_reasons"]["2"] == "failed on the client: the client stopped (Terminated)"
    assert metrics[-1]["clients"] == ["0", "1"]
