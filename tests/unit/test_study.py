"""fl-experiment's study files (fl_tools/study.py): the CIFAR-10 study in configs/ reads as written, the
flags' default study is the seed's comparisons, and a file that cannot be run is one sentence naming
the key."""
from pathlib import Path

import pytest

from fl_tools import experiment
from fl_tools.study import StudyError, load_study

ROOT = Path(__file__).resolve().parents[2]


def test_the_cifar10_study_reads_as_a_100_client_study_for_a_gpu_cluster():
    study = load_study(ROOT / "configs" / "cifar10_resnet18_study.toml")
    assert study.backend == "ray" and study.ray.address == "auto" and study.ray.gpus_per_client == 0.25
    assert [c.key for c in study.comparisons] == ["a", "b", "c"]
    runs = [r for c in study.comparisons for r in c.runs]
    assert all(r.dataset == "cifar10" and r.model == "resnet18" and r.clients == 100 for r in runs)
    assert [r.kind for r in study.comparisons[0].runs] == ["federated", "centralized", "single"]
    assert [r.k for r in study.comparisons[1].runs] == [5, 10, 20]
    prox = [r for r in study.comparisons[2].runs if r.strategy == "fedprox"]
    assert len(prox) == 3 and all(r.mu == 0.1 for r in prox)
    # (b)'s k = 10 and (c)'s iid FedAvg are (a)'s federated run: a study runs it once.
    assert len({r.same_run() for r in runs}) == len(runs) - 2


def test_flags_override_the_file(tmp_path):
    study = load_study(ROOT / "configs" / "cifar10_resnet18_study.toml",
                       {"rounds": 2, "backend": "inprocess", "address": "", "gpus_per_client": 0.0})
    assert study.backend == "inprocess" and study.ray.address == "" and study.ray.gpus_per_client == 0
    assert all(r.rounds == 2 for c in study.comparisons for r in c.runs)


STUDY = """
rounds = 2
[[comparison]]
title = "t"
[[comparison.run]]
name = "r"
"""


@pytest.mark.parametrize(("text", "message"), [
    ("roundz = 3\n" + STUDY, "at the top level: unknown key 'roundz'"),
    (STUDY + "lrr = 0.1\n", "in [[comparison]] 1, run 1: unknown key 'lrr'"),
    (STUDY.replace('title = "t"', 'title = "t"\ncolour = "red"'), "in [[comparison]] 1: unknown key 'colour'"),
    ("[ray]\ngpus = 1\n" + STUDY, "in [ray]: unknown key 'gpus'"),
    (STUDY + 'strategy = "fedprox"\n', "fedprox needs mu > 0"),
    (STUDY + "rounds = 1.5\n", "rounds must be a whole number, not 1.5"),
    (STUDY + 'partition = "zipf"\n', "unknown partition 'zipf'"),
    ('backend = "spark"\n' + STUDY, "backend must be inprocess or ray"),
    ("rounds = 2\n", "has no [[comparison]]"),
    ("rounds = \n", "is not valid TOML"),
])
def test_a_study_that_cannot_run_is_one_sentence(tmp_path, text, message):
    path = tmp_path / "study.toml"
    path.write_text(text)
    with pytest.raises(StudyError, match="^" + str(path)) as error:
        load_study(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_command_says_what_is_wrong_in_the_file(tmp_path, capsys):
    path = tmp_path / "study.toml"
    path.write_text("roundz = 3\n" + STUDY)
    assert experiment.main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fl-experiment: error: ") and "unknown key 'roundz'" in err and "\n" not in err
    assert experiment.main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read the study file" in capsys.readouterr().err


def test_without_a_file_the_flags_give_the_seeds_comparisons():
    from fl_tools.study import RunSpec, default_study

    study = default_study(RunSpec(clients=10))
    names = [[r.name for r in c.runs] for c in study.comparisons]
    assert names[0] == ["federated, 5 of 10 per round", "centralized (all data, one client)",
                        "single client (mean of 10)"]
    assert names[1] == ["k = 3 of 10", "k = 5 of 10", "k = 6 of 10"]
    assert "shards, FedProx mu=0.1" in names[2]
    assert [c.title for c in study.comparisons] == list(experiment.TITLES.values())
