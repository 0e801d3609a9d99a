import itertools

import pytest
import torch

from fl_tools import anomaly


def brute_force_auc(scores, labels):
    pairs = [(a, n) for a, n in itertools.product(scores[labels], scores[~labels])]
    return sum(1.0 if a > n else 0.5 if a == n else 0.0 for a, n in pairs) / len(pairs)


def test_roc_auc_extremes_and_ties():
    labels = torch.tensor([False, False, True, True])
    assert anomaly.roc_auc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert anomaly.roc_auc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert anomaly.roc_auc(torch.tensor([0.5, 0.5, 0.5, 0.5]), labels) == 0.5
    with pytest.raises(ValueError, match="both"):
        anomaly.roc_auc(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))


def test_roc_auc_matches_counting_pairs():
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (200,), generator=generator).float()  # many ties
    labels = torch.rand(200, generator=generator) < 0.3
    assert anomaly.roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels))


def test_digits_no_client_trained_on_score_as_anomalies():
    torch.set_num_threads(1)
    auc, normal, anomalous = anomaly.example(holdout=7, rounds=10)
    assert anomalous > normal
    assert auc > 0.85
