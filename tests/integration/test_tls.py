"""TLS and mutual TLS with certificates from fl-certs; plaintext only when asked for."""
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ENV, read_metrics
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


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_encrypted_federation_trains(federation, certs, mutual):
    federation.start_server("--rounds", "3", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp",
                            *server_tls(certs, mutual))
    for i in ("0", "1"):
        flags = client_tls(certs, i) if mutual else ["--tls-ca", str(certs / "ours" / "ca.pem")]
        federation.start_client(i, *flags)
    assert federation.wait_clients() == {"0": 0, "1": 0}
    metrics = read_metrics(federation.out)
    assert len(metrics) == 3 and metrics[-1]["accuracy"] > 0.85
    assert federation.server.stop() == 0


def test_mtls_refuses_strangers_and_impostors(federation, certs):
    federation.start_server("--rounds", "1", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp",
                            *server_tls(certs, mutual=True))
    address = federation.server.address
    # With another client's certificate: the server knows who it is, and says no.
    impostor = run("fl-client", "--id", "0", "--server", address, *client_tls(certs, "1"))
    assert_clear_error(impostor, "certificate is for '1', not '0'", "PERMISSION_DENIED")
    # Without a client certificate, or with one from another CA: the server refuses the TLS handshake.
    # gRPC lets a Python server refuse a certificate only there, which the client sees as a closed
    # connection (UNAVAILABLE), so it gives up with a message that names the certificate as a suspect.
    stranger = run("fl-client", "--id", "0", "--server", address, "--give-up-after", "2",
                   "--tls-ca", str(certs / "ours" / "ca.pem"))
    assert_clear_error(stranger, "unreachable", code=3)
    stranger = run("fl-client", "--id", "0", "--server", address, "--give-up-after", "2",
                   *client_tls(certs, "0", cert_dir="other"))
    assert_clear_error(stranger, "signed this client's --tls-cert", code=3)
    # A server whose certificate our CA did not sign: refused at once, no retrying.
    fooled = run("fl-client", "--id", "0", "--server", address, *client_tls(certs, "0", ca="other", cert_dir="other"))
    assert_clear_error(fooled, "TLS handshake", code=3)
    assert "joined" not in "".join(federation.server.stderr_lines)  # none of them got in
    assert federation.server.stop() == 0


def test_plaintext_must_be_asked_for(tmp_path, certs):
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--port", "0"), "no TLS certificate", "--insecure")
    assert_clear_error(run("fl-client", "--id", "0"), "no TLS", "--tls-ca", "--insecure")
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--insecure", "--tls-cert", "x"), "choose one")
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--port", "0", "--tls-cert", str(tmp_path / "nope"),
                           "--tls-key", str(tmp_path / "nope")), "cannot read TLS")
