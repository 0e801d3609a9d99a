"""Per-client tokens: a client joins, fetches and submits only as the client whose secret it holds."""
import pytest

from tests.integration.conftest import read_metrics
from tests.integration.test_user_errors import assert_clear_error, run

pytestmark = pytest.mark.integration


@pytest.fixture
def secrets(tmp_path):
    (tmp_path / "tokens.txt").write_text("# id secret\n0 alpha-secret-0000000000\n1 bravo-secret-1111111111\n")
    for client, secret in (("0", "alpha-secret-0000000000"), ("1", "bravo-secret-1111111111"),
                           ("wrong", "not-anybodys-secret-22222")):
        (tmp_path / f"{client}.token").write_text(secret + "\n")
    return tmp_path


def test_clients_with_their_tokens_train(federation, secrets):
    federation.start_server("--rounds", "2", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp",
                            "--client-tokens", str(secrets / "tokens.txt"))
    for client in ("0", "1"):
        federation.start_client(client, "--token-file", str(secrets / f"{client}.token"))
    assert federation.wait_clients() == {"0": 0, "1": 0}
    assert [m["clients"] for m in read_metrics(federation.out)] == [["0", "1"], ["0", "1"]]
    assert federation.server.stop() == 0


def test_missing_wrong_and_borrowed_tokens_are_refused(federation, secrets):
    federation.start_server("--rounds", "1", "--num-clients", "2", "--clients-per-round", "2", "--model-name", "mlp",
                            "--client-tokens", str(secrets / "tokens.txt"))
    address = federation.server.address
    assert_clear_error(run("fl-client", "--id", "0", "--server", address, "--insecure"),
                       "no valid client token", "UNAUTHENTICATED")
    assert_clear_error(run("fl-client", "--id", "0", "--server", address, "--insecure", "--token-file",
                           str(secrets / "wrong.token")), "UNAUTHENTICATED")
    assert_clear_error(run("fl-client", "--id", "0", "--server", address, "--insecure", "--token-file",
                           str(secrets / "1.token")), "belongs to another client than '0'", "PERMISSION_DENIED")
    log = "".join(federation.server.stderr_lines)
    # Refusals are logged at most once a second per status (fl_server.servicer.RefusalLog): both clients'
    # are, unless the second came within a second of the first.
    assert "joined" not in log and log.count("refused (UNAUTHENTICATED)") in (1, 2)
    assert federation.server.stop() == 0


def test_bad_token_files(tmp_path):
    (tmp_path / "short.txt").write_text("0 tooshort\n")
    assert_clear_error(run("fl-server", "--insecure", "--out", str(tmp_path), "--client-tokens",
                           str(tmp_path / "short.txt")), "16 or more characters")
    assert_clear_error(run("fl-server", "--insecure", "--out", str(tmp_path), "--client-tokens",
                           str(tmp_path / "missing.txt")), "cannot read the client token file")
