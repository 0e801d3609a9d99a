"""fl-experiment: the seed's comparisons, and the accuracy they must show on the built-in digits."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.datasets import load_digits
from fl_tools import experiment
from tests.integration.conftest import ENV

pytestmark = pytest.mark.integration


def test_federated_training_on_digits_is_close_to_centralized_and_beats_single_clients():
    torch.set_num_threads(1)
    train, test = load_digits()
    # The MLP: the same comparison as with the CNN (fl-experiment's default), in a sixth of the time.
    s = experiment.Settings(train, test, "mlp", rounds=20, clients=10, local_epochs=5, seed=0)
    federated = experiment.federated("federated", s, per_round=5)
    centralized = experiment.federated("centralized", s, per_round=1, clients=1)
    single = experiment.single_clients(s)
    assert federated.first_round_reaching(0.95) is not None and federated.final >= 0.95
    assert centralized.final - federated.final <= 0.015
    assert federated.final - single.final >= 0.04


def test_the_command_writes_tables_and_plots(tmp_path):
    done = subprocess.run([str(Path(sys.executable).parent / "fl-experiment"), "--rounds", "2", "--clients", "4",
                           "--local-epochs", "1", "--model", "mlp", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "results.md").read_text()
    for title in experiment.TITLES.values():
        assert title in text
    assert "shards, FedProx mu=0.1" in text and "centralized" in text
    for key in "abc":
        assert (tmp_path / f"comparison_{key}.png").read_bytes()[:4] == b"\x89PNG"
