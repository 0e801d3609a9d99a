"""TLS and mutual TLS with certificates from fl-certs; plaintext only when asked for."""
import subprocess
import sys
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


def test_tls_and_mtls_train_as_well_as_plaintext(tmp_path, certs):
    # The same seeded federation three times: encryption must not change what is learned. (Updates
    # are summed in arrival order, so the last bits of the floats may differ between runs.)
    accuracies = {}
    for transport in ("plaintext", "tls", "mtls"):
        (tmp_path / transport).mkdir()
        federation = Federation(tmp_path / transport)
        try:
            server_flags = [] if transport == "plaintext" else server_tls(certs, transport == "mtls")
            federation.start_server("--rounds", "3", "--num-clients", "2", "--clients-per-round", "2",
                                    "--model-name", "mlp", "--seed", "7", *server_flags)
            for i in ("0", "1"):
                flags = {"plaintext": [], "tls": ["--tls-ca", str(certs / "ours" / "ca.pem")],
                         "mtls": client_tls(certs, i)}[transport]
                federation.start_client(i, *flags)
            assert federation.wait_clients() == {"0": 0, "1": 0}, transport
            assert federation.server.stop() == 0
            accuracies[transport] = [r["accuracy"] for r in read_metrics(federation.out)]
        finally:
            federation.stop()
    assert len(accuracies["plaintext"]) == 3 and accuracies["plaintext"][-1] > 0.85
    for transport in ("tls", "mtls"):
        assert accuracies[transport] == pytest.approx(accuracies["plaintext"], abs=0.01), (transport, accuracies)


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
    server_log = "".join(federation.server.stderr_lines)
    assert "joined" not in server_log  # none of them got in
    # gRPC logs each refused handshake: the missing certificate and the one from another CA.
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in server_log and "certificate signature failure" in server_log
    assert federation.server.stop() == 0


def test_plaintext_must_be_asked_for(tmp_path, certs):
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--port", "0"), "no TLS certificate", "--insecure")
    assert_clear_error(run("fl-client", "--id", "0"), "no TLS", "--tls-ca", "--insecure")
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--insecure", "--tls-cert", "x"), "choose one")
    assert_clear_error(run("fl-server", "--out", str(tmp_path), "--port", "0", "--tls-cert", str(tmp_path / "nope"),
                           "--tls-key", str(tmp_path / "nope")), "cannot read TLS")
