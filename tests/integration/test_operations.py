"""What an operator sees: Prometheus metrics, gRPC health, the status command, fl-report's pictures."""
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ENV, read_metrics

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_short_federation_seen_from_outside(federation):
    server = federation.start_server("--rounds", "3", "--num-clients", "2", "--clients-per-round", "2",
                                     "--model-name", "mlp", "--metrics-port", "0", "--report")
    assert server.metrics_port
    for i in range(2):
        federation.start_client(str(i), "--quiet")
    assert federation.wait_clients() == {"0": 0, "1": 0}
    records = read_metrics(federation.out)

    # Prometheus: the values agree with metrics.jsonl.
    metrics = scrape(server.metrics_port)
    assert metrics["fl_rounds_completed_total"] == 3 == len(records)
    assert metrics["fl_accuracy"] == pytest.approx(records[-1]["accuracy"])
    assert metrics["fl_loss"] == pytest.approx(records[-1]["loss"])
    assert metrics["fl_model_version"] == 3
    assert metrics["fl_clients_known"] == 2
    assert metrics["fl_bytes_received_total"] == sum(r["bytes_in"] for r in records) > 0
    assert metrics["fl_bytes_sent_total"] >= 6 * records[0]["bytes_in"] / 2  # 2 clients x 3 rounds of the model
    assert metrics["fl_round_seconds_count"] == 3
    assert metrics["fl_round_seconds_sum"] == pytest.approx(sum(r["seconds"] for r in records))
    assert metrics["fl_clients_dropped_total"] == 0

    # The standard gRPC health check.
    with grpc.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fl.v1.Federation"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # The status command.
    done = subprocess.run([str(BIN / "fl-server"), "status", "--server", f"127.0.0.1:{server.metrics_port}"],
                          capture_output=True, text=True, env=ENV, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("finished: round 3, model version 3, ")
    assert "  0 " in done.stdout and "  1 " in done.stdout and "719 samples" in done.stdout
    assert f"latest round 3: accuracy {records[-1]['accuracy']:.4f}" in done.stdout

    assert server.stop() == 0
    # --report wrote the pictures at the end; fl-report writes them again from metrics.jsonl alone.
    for writer in ("server", "fl-report"):
        if writer == "fl-report":
            for png in federation.out.glob("*.png"):
                png.unlink()
            done = subprocess.run([str(BIN / "fl-report"), str(federation.out)], capture_output=True, text=True,
                                  env=ENV, timeout=120)
            assert done.returncode == 0, done.stderr
        for name in ("accuracy", "loss", "participation"):
            data = (federation.out / f"{name}.png").read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    behind = json.loads((federation.out / "report_data.json").read_text())
    assert behind["rounds"] == [1, 2, 3]
    assert behind["accuracy"] == [r["accuracy"] for r in records]
    assert behind["loss"] == [r["loss"] for r in records]
    assert behind["clients"] == ["0", "1"] and behind["participation"] == [[1.0] * 3, [1.0] * 3]
    assert f"final accuracy: {records[-1]['accuracy']:.4f}" in (federation.out / "report.md").read_text()


def test_status_of_a_server_that_is_not_there():
    from tests.integration.conftest import free_port

    done = subprocess.run([str(BIN / "fl-server"), "status", "--server", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, env=ENV, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is fl-server running there with --metrics-port?" in done.stderr


def test_fl_report_on_a_folder_without_metrics(tmp_path):
    done = subprocess.run([str(BIN / "fl-report"), str(tmp_path)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "metrics.jsonl does not exist" in done.stderr
