"""2 of 10 clients poison their updates: plain FedAvg collapses, the robust aggregators do not.
(The full table, with more rounds, is `python -m bench.poisoning`, in docs/security.md.)"""
import pytest

from fl_tools.poisoning import simulate


@pytest.mark.parametrize("attack", ["scale:-10", "noise"])
def test_robust_aggregators_survive_what_breaks_fedavg(attack):
    # Measured (8 rounds): FedAvg 16% / 39%; median, trimmed mean and multi-Krum 88-90% under both.
    fedavg = simulate("fedavg", attack, rounds=8)
    assert fedavg < 0.6
    for aggregator in ("median", "trimmed_mean:0.2", "trimmed_mean:0.3", "multikrum:2:6"):
        robust = simulate(aggregator, attack, rounds=8)
        assert robust > 0.83 and robust > fedavg + 0.3, (aggregator, robust, fedavg)


def test_krum_loses_little_to_the_attacks():
    # Krum keeps one update a round, so it learns more slowly than FedAvg even without an attack; what
    # the attacks cost it is measured against its own clean run.
    clean = simulate("krum:2", "none", rounds=8)
    for attack in ("scale:-10", "noise"):
        attacked = simulate("krum:2", attack, rounds=8)
        assert attacked > clean - 0.03, (attack, attacked, clean)
