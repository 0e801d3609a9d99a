"""docker-compose.yml is valid and runs the real commands (no Docker engine needed to check that)."""
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fl_client.cli import parse_args as client_args
from fl_server.cli import parse_args as server_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (make sysdeps installs it)")
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_one_server_and_three_clients(compose):
    default = sorted(name for name, service in compose["services"].items() if not service.get("profiles"))
    assert default == ["client0", "client1", "client2", "server"]


def test_commands_are_the_real_entry_points_with_valid_flags(compose):
    services = compose["services"]
    command = services["server"]["command"]
    assert command[0] == "fl-server"
    args = server_args(command[1:])
    assert args.host == "0.0.0.0" and args.port == 50051
    for i in range(3):
        command = services[f"client{i}"]["command"]
        assert command[0] == "fl-client"
        args = client_args(command[1:])
        assert args.id == str(i) and args.server == "server:50051" and args.data == "/data"


def test_each_client_mounts_only_its_own_shard(compose):
    for i in range(3):
        volumes = compose["services"][f"client{i}"]["volumes"]
        assert len(volumes) == 1
        volume = volumes[0]
        source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
        assert source.endswith(f"shards/shard{i}") and target == "/data"


def test_gpu_profile_reserves_nvidia_devices_for_clients():
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (make sysdeps installs it)")
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "--profile", "gpu", "config"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for i in range(3):
        gpu = services[f"client{i}-gpu"]
        args = client_args(gpu["command"][1:])
        assert gpu["command"][0] == "fl-client" and args.id == str(i) and args.device == "cuda"
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
        assert [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in gpu["volumes"]][0].endswith(
            f"shards/shard{i}")
