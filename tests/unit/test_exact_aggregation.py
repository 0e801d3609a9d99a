"""Exact aggregation: robust rules add their step in the model's own precision (float64 models stay
float64)."""
import pytest
import torch

from common.tensors import specs_of
from fl_server.aggregation import add, make_aggregator

ROBUST = ("median", "trimmed_mean:0.34", "krum:0", "multikrum:0:2")
ALL_RULES = ("fedavg", *ROBUST)


def aggregate(rule: str, global_state, updates, weights=None):
    agg = make_aggregator(specs_of(global_state), rule, len(updates))
    agg.begin_round()
    for update, weight in zip(updates, weights or [1] * len(updates)):
        add(agg, update, weight)
    return agg.finish({k: v.clone() for k, v in global_state.items()})


# Item 8: the robust rules' step is added in float64 for a float64 model.

@pytest.mark.parametrize("rule", ROBUST)
def test_a_float64_model_takes_the_robust_step_in_float64(rule):
    g = {"w": torch.tensor([1e8 + 0.123456789, -3.0], dtype=torch.float64)}
    # Every rule's step is 0.5 (median; the middle one after cutting one at each end; Krum's and
    # multi-Krum's two closest updates).
    updates = [{"w": torch.tensor(d, dtype=torch.float64)} for d in ([0.5, 0.25], [0.5, 0.25], [1.0, 0.5])]
    new = aggregate(rule, g, updates)["w"]
    assert new.dtype == torch.float64
    expected = torch.tensor([1e8 + 0.123456789 + 0.5, -2.75], dtype=torch.float64)
    assert torch.equal(new, expected)
    assert new[0].item() == 100000000.623456789  # float64's nearest value to it
    # In float32 the step would be lost: float32's values near 1e8 are 8 apart.
    assert torch.tensor(1e8 + 0.123456789, dtype=torch.float32).add(0.5).item() == 1e8


def test_fedavg_and_the_robust_rules_agree_on_a_float64_model():
    g = {"w": torch.tensor([1e8 + 0.123456789], dtype=torch.float64)}
    updates = [{"w": torch.tensor([0.5], dtype=torch.float64)}] * 3
    results = {rule: aggregate(rule, g, updates)["w"] for rule in ALL_RULES}
    assert all(torch.equal(r, results["fedavg"]) for r in results.values()), results
