"""The Ray backend gives the in-process backend's results: the same client rounds, the same server-side
aggregation, the same seeds. The short test `make test` runs (a local Ray instance of 2 CPUs); the
cluster tests (two nodes, a node killed mid-round) are in test_ray_cluster.py, `make test-cluster`."""
import json

import pytest
import torch

from common.datasets import load_digits
from fl_tools import experiment, simulation
from fl_tools.clients import ClientData

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

STUDY = """
dataset = "digits"
model = "mlp"
rounds = 3
clients = 4
clients_per_round = 2
local_epochs = 1

[[comparison]]
title = "backends"
[[comparison.run]]
name = "FedAvg"
[[comparison.run]]
name = "FedProx, Dirichlet, federated evaluation"
strategy = "fedprox"
mu = 0.1
partition = "dirichlet:0.5"
eval_fraction = 0.2
[[comparison.run]]
name = "one client alone"
kind = "single"
single_clients = 1
"""


@pytest.fixture(scope="module")
def local_ray():
    # On the loopback address: the instance is this test's, and nothing else joins it.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def test_ray_gives_the_in_process_results(local_ray, tmp_path):
    torch.set_num_threads(1)
    (tmp_path / "study.toml").write_text(STUDY)
    results = {}
    for backend in ("inprocess", "ray"):
        out = tmp_path / backend
        assert experiment.main(["--config", str(tmp_path / "study.toml"), "--backend", backend, "--out", str(out)]) == 0
        results[backend] = json.loads((out / "results.json").read_text())["a"]
        assert (out / "comparison_a.png").read_bytes()[:4] == b"\x89PNG"
    assert "clients run on Ray" in (tmp_path / "ray" / "results.md").read_text()
    for local, remote in zip(results["inprocess"], results["ray"]):
        assert local["name"] == remote["name"] and len(local["accuracy"]) == 3
        assert local["accuracy"] == pytest.approx(remote["accuracy"], abs=1e-4), local["name"]
        assert local["loss"] == pytest.approx(remote["loss"], abs=1e-4), local["name"]

    # Top-k's error feedback lives on the driver and travels with each task: every client trains every
    # round, so a residual lost between rounds would change the model.
    train, test = load_digits()
    finals: dict[str, dict[str, torch.Tensor]] = {}
    where: list[simulation.ClientResult] = []
    for backend in ("inprocess", "ray"):
        simulation.run(ClientData("digits"), test, clients=4, rounds=3, local_epochs=1, compression="topk:0.05",
                       backend=backend, on_final=lambda s, b=backend: finals.__setitem__(b, s),
                       on_client=where.append if backend == "ray" else None)
    for name, tensor in finals["inprocess"].items():
        torch.testing.assert_close(finals["ray"][name], tensor, rtol=0, atol=1e-6)
    assert len(where) == 12 and all(w.node_id == ray.get_runtime_context().get_node_id() for w in where)


def test_the_ray_benchmark_measures_both_backends(local_ray):
    # bench.run's figure 10 on tiny sizes (the quick bench in make test leaves it out, to start Ray once).
    from bench import ray_sim  # noqa: PLC0415 - bench is not a package the product needs

    local = ray_sim.child("inprocess", 20, 5, 2, 2)
    on_ray = ray_sim.child("ray", 20, 5, 2, 2)
    assert local.rounds == on_ray.rounds == 2
    assert local.client_rounds == on_ray.client_rounds == 10
    assert on_ray.rate > 0 and local.rate > 0
    assert "20 clients, 5 a round, 2 rounds" in ray_sim.summary(local, on_ray)
