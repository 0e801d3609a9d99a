"""A Ray cluster of two nodes on this one machine (Ray's own ray.cluster_utils.Cluster: a head and a
worker node, each its own raylet and object store): the clients' rounds land on both nodes, and a node
killed mid-round drops its clients from that round (drop_reasons) while the study finishes.

Slow (a cluster's start-up, about a minute on 2 cores): not in `make test`; `make test-cluster` runs it."""
import threading
import time

import pytest
import torch

from common.datasets import load_digits
from fl_tools import simulation
from fl_tools.clients import ClientData, ClientResult

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE = {"num_cpus": 1, "object_store_memory": 100 * 2**20}
SLOW_SECONDS = 3.0


def slow_client(index: int, diff: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sends the honest diff, late: a client round long enough to lose its node in the middle of it."""
    time.sleep(SLOW_SECONDS)
    return diff


@pytest.fixture(scope="module")
def cluster():
    made = cluster_utils.Cluster(initialize_head=True, head_node_args=NODE)
    made.add_node(**NODE)
    made.wait_for_nodes()
    yield made
    ray.shutdown()
    made.shutdown()


def test_clients_run_on_both_nodes_of_a_cluster_joined_by_address(cluster):
    torch.set_num_threads(1)
    _, test = load_digits()
    where: list[ClientResult] = []
    accuracy = simulation.run(ClientData("digits"), test, clients=4, rounds=2, local_epochs=1, backend="ray",
                              ray=simulation.RayOptions(address=cluster.address), on_client=where.append)
    assert accuracy > 0.2 and len(where) == 8
    assert len({w.node_id for w in where}) == 2, where


def late_clients(index: int, diff: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Clients 2 and 3 send their update after the round's deadline."""
    if index >= 2:
        time.sleep(SLOW_SECONDS)
    return diff


def test_clients_late_for_the_deadline_are_dropped_and_the_round_is_aggregated_without_them(cluster):
    torch.set_num_threads(1)
    _, test = load_digits()
    outcomes = []
    started = time.monotonic()
    simulation.run(ClientData("digits"), test, clients=4, rounds=1, local_epochs=1, backend="ray",
                   tamper=late_clients, round_timeout=SLOW_SECONDS / 2,
                   ray=simulation.RayOptions(address=cluster.address), on_outcome=outcomes.append)
    (outcome,) = outcomes
    assert outcome.aggregated and outcome.contributors == ["0", "1"]
    late = "no update by the round's deadline"
    assert outcome.drop_reasons == {"2": late, "3": late}
    assert time.monotonic() - started < 2 * SLOW_SECONDS + 10  # the round did not wait for them


def test_a_node_killed_mid_round_drops_its_clients_and_the_study_finishes(cluster):
    torch.set_num_threads(1)
    _, test = load_digits()
    doomed = cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    doomed_id = doomed.node_id
    outcomes, where = [], []

    def kill_during_round_2(outcome) -> None:
        outcomes.append(outcome)
        if outcome.round == 1:  # round 2's clients start in a moment and each takes SLOW_SECONDS
            threading.Timer(SLOW_SECONDS / 2 + 0.5, cluster.remove_node, (doomed,),
                            {"allow_graceful": False}).start()

    accuracy = simulation.run(ClientData("digits"), test, clients=6, rounds=3, local_epochs=1, backend="ray",
                              tamper=slow_client, ray=simulation.RayOptions(address=cluster.address),
                              on_outcome=kill_during_round_2, on_client=where.append)
    assert accuracy > 0.2
    assert [o.round for o in outcomes if o.aggregated] == [1, 2, 3]
    lost = {c: why for o in outcomes if o.round == 2 for c, why in o.drop_reasons.items()}
    assert lost and all("Ray worker was lost" in why for why in lost.values()), lost
    assert doomed_id in {w.node_id for w in where if w.round == 1}
    assert doomed_id not in {w.node_id for w in where if w.round == 3}
