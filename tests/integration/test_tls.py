"""TLS and mutual TLS with certificates from fl-certs; plaintext only when asked for."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import ENV, Federation, read_metrics
from tests.integration.test_user_errors import assert_clear_error, run

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    done = subprocess.run([str(BIN / "fl-certs"), "--out", str(out / "ours"), "--clients", "0", "1"],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    other = subprocess.run([str(BIN / "fl-certs"), "--out", str(out / "other"), "--clients", "0"],
                           capture_output=True, text=True, env=ENV)
    assert other.returncode == 0, other.stderr
    return out


def client_tls(certs, client, ca="ours", cert_dir="ours"):
    return ["--tls-ca", str(certs / ca / "ca.pem"), "--tls-cert", str(certs / cert_dir / f"client-{client}.pem"),
            "--tls-key", str(certs / cert_dir / f"client-{client}.key")]


def server_tls(certs, mutual):
    flags = ["--tls-cert", str(certs / "ours" / "server.pem"), "--tls-key", str(certs / "ours" / "server.key")]
    return flags + (["--tls-client-ca", str(certs / "ours" / "ca.pem")] if mutual else [])


def run_federation(tmp_path, certs, transport):
    """The same seeded federation, over `transport`. Before the mutual-TLS federation's own clients start,
    strangers and impostors try its server: what they were told, and its log until then, are returned."""
    (tmp_path / transport).mkdir()
    federation = Federation(tmp_path / transport)
    result = {}
    try:
        server_flags = [] if transport == "plaintext" else server_tls(certs, transport == "mtls")
        federation.start_server("--rounds", "3", "--num-clients", "2", "--clients-per-round", "2",
                                "--model-name", "mlp", "--seed", "7", *server_flags)
        if transport == "mtls":
            address = federation.server.address
            attempts = {
                # With another client's certificate.
                "impostor": ["--id", "0", "--server", address, *client_tls(certs, "1")],
                # Without a client certificate, or with one from another CA.
                "no certificate": ["--id", "0", "--server", address, "--give-up-after", "2",
                                   "--tls-ca", str(certs / "ours" / "ca.pem")],
                "other CA's certificate": ["--id", "0", "--server", address, "--give-up-after", "2",
                                           *client_tls(certs, "0", cert_dir="other")],
                # Trusting another CA, which did not sign the server's certificate.
                "fooled": ["--id", "0", "--server", address, *client_tls(certs, "0", ca="other", cert_dir="other")],
            }
            with ThreadPoolExecutor(len(attempts)) as pool:
                result["refused"] = dict(zip(attempts, pool.map(lambda args: run("fl-client", *args),
                                                                attempts.values())))
            result["log before its clients"] = "".join(federation.server.stderr_lines)
        for i in ("0", "1"):
            flags = {"plaintext": [], "tls": ["--tls-ca", str(certs / "ours" / "ca.pem")],
                     "mtls": client_tls(certs, i)}[transport]
            federation.start_client(i, *flags)
        result["clients"] = federation.wait_clients()
        result["server"] = federation.server.stop()
        result["accuracies"] = [r["accuracy"] for r in read_metrics(federation.out)]
    finally:
        federation.stop()
    return result


@pytest.fixture(scope="module")
def transports(tmp_path_factory, certs):
    """The three federations side by side (each is mostly waiting on its processes)."""
    tmp_path = tmp_path_factory.mktemp("transports")
    names = ("plaintext", "tls", "mtls")
    with ThreadPoolExecutor(len(names)) as pool:
        return dict(zip(names, pool.map(lambda transport: run_federation(tmp_path, certs, transport), names)))


def test_tls_and_mtls_train_as_well_as_plaintext(transports):
    # The same seeded federation three times: encryption must not change what is learned. (Updates
    # are summed in arrival order, so the last bits of the floats may differ between runs.)
    for transport, result in transports.items():
        assert result["clients"] == {"0": 0, "1": 0}, transport
        assert result["server"] == 0, transport
    accuracies = {transport: result["accuracies"] for transport, result in transports.items()}
    assert len(accuracies["plaintext"]) == 3 and accuracies["plaintext"][-1] > 0.85
    for transport in ("tls", "mtls"):
        assert accuracies[transport] == pytest.approx(accuracies["plaintext"], abs=0.01), (transport, accuracies)


def test_mtls_refuses_strangers_and_impostors(transports):
    refused = transports["mtls"]["refused"]
    # With another client's certificate: the server knows who it is, and says no.
    assert_clear_error(refused["impostor"], "certificate is for '1', not '0'", "PERMISSION_DENIED")
    # Without a client certificate, or with one from another CA: the server refuses the TLS handshake.
    # gRPC lets a Python server refuse a certificate only there, which the client sees as a closed
    # connection (UNAVAILABLE), so it gives up with a message that names the certificate as a suspect.
    assert_clear_error(refused["no certificate"], "unreachable", code=3)
    assert_clear_error(refused["other CA's certificate"], "signed this client's --tls-cert", code=3)
    # A server whose certificate our CA did not sign: refused at once, no retrying.
    assert_clear_error(refused["fooled"], "TLS handshake", code=3)
    server_log = transports["mtls"]["log before its clients"]
    assert "joined" not in server_log  # none of them got in
    # gRPC logs each refused handshake: the missing certificate and the one from another CA.
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in server_log and "certificate signature failure" in server_log
    assert transports["mtls"]["server"] == 0


def test_plaintext_must_be_asked_for(tmp_path, certs):
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--port", "0"), "no TLS certificate", "--insecure")
    assert_clear_error(run("fl-client", "--id", "0"), "no TLS", "--tls-ca", "--insecure")
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--insecure", "--tls-cert", "x"), "choose one")
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--port", "0", "--tls-cert", str(tmp_path / "nope"),
                           "--tls-key", str(tmp_path / "nope")), "cannot read TLS")
