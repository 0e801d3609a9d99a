"""Server and clients on separate test hosts (network namespaces joined by veth pairs), so traffic
really crosses an interface; a client's link goes down mid-round and comes back."""
import os
import shutil
import subprocess

import pytest

from tests.integration.conftest import read_metrics
from tests.integration.test_reliability import wait_for

pytestmark = pytest.mark.integration

# Addresses of this test's own hosts, inside namespaces it creates and removes.
SUBNETS = {"a": "10.231.1", "b": "10.231.2"}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = f"fl{os.getpid() % 100000}"
    names = {"server": f"{tag}s", "a": f"{tag}a", "b": f"{tag}b"}
    try:
        ip("netns", "add", names["server"])
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
    try:
        for side in ("a", "b"):
            ip("netns", "add", names[side])
            server_end, client_end = f"{tag}s{side}", f"{tag}{side}s"
            ip("link", "add", server_end, "type", "veth", "peer", "name", client_end)
            ip("link", "set", server_end, "netns", names["server"])
            ip("link", "set", client_end, "netns", names[side])
            ip("-n", names["server"], "addr", "add", f"{SUBNETS[side]}.1/24", "dev", server_end)
            ip("-n", names[side], "addr", "add", f"{SUBNETS[side]}.2/24", "dev", client_end)
            ip("-n", names["server"], "link", "set", server_end, "up")
            ip("-n", names[side], "link", "set", client_end, "up")
            ip("-n", names[side], "link", "set", "lo", "up")
        ip("-n", names["server"], "link", "set", "lo", "up")
        yield {**names, "link_a": f"{tag}as"}
    finally:
        for name in names.values():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_link_down_and_up_mid_round(federation, hosts):
    netns = lambda name: ["ip", "netns", "exec", hosts[name]]  # noqa: E731
    server = federation.start_server("--host", "0.0.0.0", "--rounds", "4", "--num-clients", "2",
                                     "--clients-per-round", "2", "--min-fit", "1", "--heartbeat-seconds", "0.5",
                                     "--local-epochs", "100", "--model-name", "mlp", prefix=netns("server"))
    federation.start_client("0", server=f"{SUBNETS['a']}.1:{server.port}", prefix=netns("a"))
    federation.start_client("1", server=f"{SUBNETS['b']}.1:{server.port}", prefix=netns("b"))

    # A round's training takes about a second, so the link goes down while client 0 trains and heartbeats
    # (once its update goes, it sends none: the upload itself is what the server hears).
    wait_for(lambda: "round 2: training on" in federation.client_log("0"), what="client 0 training round 2")
    ip("-n", hosts["a"], "link", "set", hosts["link_a"], "down")
    # The link stays down until the server, after the 3.5 s silence limit, has closed the round without client 0.
    wait_for(lambda: any(m["round"] == 2 for m in read_metrics(federation.out)), what="round 2 closing")
    ip("-n", hosts["a"], "link", "set", hosts["link_a"], "up")

    assert federation.wait_clients() == {"0": 0, "1": 0}
    metrics = [m for m in read_metrics(federation.out) if m["aggregated"]]
    by_round = {m["round"]: m for m in metrics}
    assert sorted(by_round) == [1, 2, 3, 4]
    assert by_round[1]["clients"] == ["0", "1"]
    # Round 2 closed without the cut-off client, well before its deadline, and said why.
    assert by_round[2]["clients"] == ["1"] and "silent" in by_round[2]["drop_reasons"]["0"]
    # Back on the network, client 0 rejoined and contributed again.
    assert "0" in by_round[4]["clients"]
    log0 = federation.client_log("0")
    assert "heartbeat not delivered" in log0
    assert server.stop() == 0
