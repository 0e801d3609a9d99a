"""Every project in examples/ runs as its README says: a copy of its folder, its own commands, real
fl-server and client processes on a free port."""
from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fl_tools.processes import ServerProcess, command, start_client
from tests.integration.conftest import ENV, read_metrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def processes():
    started: list[ServerProcess | subprocess.Popen] = []
    yield started
    for p in started:
        proc = p.proc if isinstance(p, ServerProcess) else p
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def copy_of(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(EXAMPLES / name, tmp_path / name))


def python(folder: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, *args], cwd=folder, env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return done.stdout


def server_in(folder: Path, processes: list, *args: str) -> ServerProcess:
    server = ServerProcess(["--config", "server.toml", "--port", "0", "--out", str(folder / "runs"), *args],
                           env=ENV, cwd=folder)
    processes.append(server)
    return server


def wait_all(clients: dict[str, subprocess.Popen], folder: Path) -> None:
    for cid, proc in clients.items():
        code = proc.wait(300)
        assert code == 0, f"client {cid} exited {code}:\n" + (folder / f"client{cid}.log").read_text()[-3000:]


def fl_client(folder: Path, processes: list, cid: str, server: ServerProcess, *args: str) -> subprocess.Popen:
    proc = start_client(cid, server.address, list(args), folder / f"client{cid}.log", env=ENV, cwd=folder)
    processes.append(proc)
    return proc


def rising(values: list[float]) -> bool:
    return values[-1] > values[0] + 0.05


def test_the_readme_shows_the_whole_diff_and_it_is_about_ten_lines():
    folder = EXAMPLES / "image_classification"
    original = (folder / "train.py").read_text().splitlines(keepends=True)
    federated = (folder / "train_federated.py").read_text().splitlines(keepends=True)
    diff = list(difflib.unified_diff(original, federated, "train.py", "train_federated.py", n=3))
    added = [line for line in diff if line.startswith("+") and not line.startswith("+++")]
    removed = [line for line in diff if line.startswith("-") and not line.startswith("---")]
    assert len(added) <= 10 and len(removed) <= 1
    readme = (folder / "README.md").read_text()
    assert all(line.rstrip("\n") in readme for line in added + removed)


def test_a_plain_pytorch_script_made_federated_trains_on_three_image_folders(tmp_path, processes):
    folder = copy_of("image_classification", tmp_path)
    python(folder, "make_data.py", "--clients", "3", "--out", "data")
    server = server_in(folder, processes, "--rounds", "4")
    clients = {}
    for cid in "012":
        log = open(folder / f"client{cid}.log", "w")  # noqa: SIM115 - lives as long as the process
        clients[cid] = subprocess.Popen(
            [sys.executable, "train_federated.py", "--data", f"data/client{cid}", "--id", cid, "--server",
             server.address], cwd=folder, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        processes.append(clients[cid])
    wait_all(clients, folder)
    assert server.stop() == 0
    records = read_metrics(folder / "runs")
    assert [r["round"] for r in records] == [1, 2, 3, 4] and all(r["aggregated"] for r in records)
    # The server has no data: no accuracy of its own, each round's from the clients' evaluations.
    assert all(r["accuracy"] is None for r in records)
    evaluations = [r["federated_evaluation"] for r in records]
    assert all(e["clients"] == 3 for e in evaluations)
    assert rising([e["accuracy"] for e in evaluations]), evaluations
    assert "validation: loss" in (folder / "client0.log").read_text()  # the script's own ending ran


def test_a_tabular_federation_reads_csv_tables_with_no_code(tmp_path, processes):
    folder = copy_of("tabular_csv", tmp_path)
    python(folder, "make_data.py", "--out", "data")
    server = server_in(folder, processes, "--rounds", "4")
    clients = {cid: fl_client(folder, processes, cid, server, "--data", f"data/client{cid}") for cid in "012"}
    wait_all(clients, folder)
    assert server.stop() == 0
    records = read_metrics(folder / "runs")
    evaluations = [r["federated_evaluation"] for r in records]
    assert len(records) == 4 and all(e["clients"] == 3 for e in evaluations)
    assert rising([e["accuracy"] for e in evaluations]) and evaluations[-1]["accuracy"] > 0.8, evaluations


def test_federated_fine_tuning_starts_from_the_weights_file(tmp_path, processes):
    folder = copy_of("fine_tuning", tmp_path)
    pretrained = python(folder, "pretrain.py", "--out", "pretrained.pt")
    start = float(pretrained.split("accuracy ")[1].split()[0])
    subprocess.run([*command("fl-partition"), "--dataset", "digits", "--clients", "3", "--out", "shards"],
                   cwd=folder, env=ENV, check=True, capture_output=True, timeout=120)
    server = server_in(folder, processes, "--rounds", "3")
    clients = {cid: fl_client(folder, processes, cid, server, "--data", f"shards/shard{cid}", "--app",
                              "finetune:FineTune") for cid in "012"}
    wait_all(clients, folder)
    assert server.stop() == 0
    accuracy = [r["accuracy"] for r in read_metrics(folder / "runs")]
    # The pretrained model knows five digits of ten; the owners teach its head the others.
    assert 0.3 < start < 0.6 and accuracy[-1] > start + 0.2, (start, accuracy)


def test_a_custom_aggregation_rule_runs_the_federation(tmp_path, processes):
    folder = copy_of("custom_aggregation", tmp_path)
    server = server_in(folder, processes, "--log-level", "INFO")
    clients = {cid: fl_client(folder, processes, cid, server) for cid in "012"}
    wait_all(clients, folder)
    assert server.stop() == 0
    accuracy = [r["accuracy"] for r in read_metrics(folder / "runs")]
    assert len(accuracy) == 3 and accuracy[-1] > 0.8, accuracy
