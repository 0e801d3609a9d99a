"""Learning on real data: the FedAvg paper's CNN on MNIST, 10 IID clients, through the server's own round
state and aggregation and the clients' training loop (in one process: this is about learning, the
transport is tested elsewhere). A study of a minute: `make bench` runs it (pytest -m study), `make test`
does not."""
from pathlib import Path

import pytest

from common.datasets import load_mnist
from fl_tools import simulation

pytestmark = [pytest.mark.integration, pytest.mark.study]
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def test_ten_iid_clients_reach_95_percent_on_the_10000_mnist_test_images():
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"no MNIST copy at {SHARED_MNIST}")
    train_data, test_data = load_mnist(SHARED_MNIST)
    assert len(train_data) == 5000 and len(test_data) == 10000
    history = []
    accuracy = simulation.run(train_data, test_data, model="cnn", clients=10, rounds=4,
                              on_round=lambda r, result: history.append(result.accuracy))
    assert accuracy >= 0.95, history
    assert history[0] < history[-1]
