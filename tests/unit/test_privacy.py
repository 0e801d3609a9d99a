import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from common.tensors import specs_of
from fl_server.aggregation import DPFedAvg, UpdateRejected, epsilon, make_aggregator

GLOBAL = {"w": torch.zeros(20_000), "n": torch.tensor(3)}
SPECS = specs_of(GLOBAL)


def update(value, n=0):
    return {"w": torch.full((20_000,), float(value)), "n": torch.tensor(n)}


def test_updates_are_clipped_equally_weighted_and_divided_by_the_fixed_round_size():
    dp = DPFedAvg(SPECS, noise_multiplier=1e-9, clip=1.0, clients_per_round=4)
    big = update(1.0)  # norm sqrt(20000) = 141: clipped to 1
    small = update(0.001)  # norm 0.14: kept as it is
    for diff, samples in ((big, 1000), (small, 1)):
        dp.check(diff, samples)
        dp.fold(diff, samples)
    new = dp.finish(GLOBAL)
    expected = (1.0 / 20_000 ** 0.5 + 0.001) / 4  # sample counts ignored; 4 = clients per round, not 2 arrived
    assert torch.allclose(new["w"], torch.full((20_000,), expected), atol=1e-6)
    assert int(new["n"]) == 3  # integer buffers are not published through DP


def test_noise_has_the_calibrated_standard_deviation_and_is_not_reproducible():
    results = []
    for _ in range(2):
        dp = DPFedAvg(SPECS, noise_multiplier=2.0, clip=0.5, clients_per_round=5)
        dp.fold(update(0.0), 1)
        results.append(dp.finish(GLOBAL)["w"])
    assert results[0].std().item() == pytest.approx(2.0 * 0.5 / 5, rel=0.05)
    assert not torch.equal(results[0], results[1])  # seeded by the OS, never by the run's seed


def test_non_finite_updates_are_refused_before_touching_the_sum():
    dp = DPFedAvg(SPECS, noise_multiplier=1.0, clip=1.0, clients_per_round=2)
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        dp.check({"w": torch.full((20_000,), float("nan")), "n": torch.tensor(0)}, 1)


def test_epsilon_is_what_the_accountant_says_and_grows_with_rounds():
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
        1000, 100, dp_accounting.GaussianDpEvent(0.5)), 10)
    assert epsilon(1.0, [(1000, 100)] * 10, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    spent = [epsilon(1.0, [(1000, 100)] * r, 1e-5) for r in (1, 5, 20)]
    assert spent == sorted(spent) and spent[0] > 0
    assert epsilon(2.0, [(1000, 100)] * 5, 1e-5) < spent[1]  # more noise, less spent


def test_the_aggregator_factory_makes_dp_fedavg_and_refuses_it_with_a_robust_rule():
    specs = specs_of({"w": torch.zeros(3)})
    assert isinstance(make_aggregator(specs, "fedavg", 5, dp_noise_multiplier=1.0, dp_clip=0.5), DPFedAvg)
    assert not isinstance(make_aggregator(specs, "fedavg", 5), DPFedAvg)
    with pytest.raises(ValueError, match="fedavg"):
        make_aggregator(specs, "median", 5, dp_noise_multiplier=1.0)


def test_epsilon_of_repeated_rounds_is_their_composition():
    rounds = [(100, 10)] * 3 + [(80, 10)] * 2
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for population, sampled in rounds:  # one event at a time, as the accountant is usually driven
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(
            population, sampled, dp_accounting.GaussianDpEvent(0.5)))
    assert epsilon(1.0, rounds, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
