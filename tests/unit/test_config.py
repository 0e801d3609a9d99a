import argparse
import json
from pathlib import Path

import pytest

from common.settings import parse_bool
from fl_server import config
from fl_server.config import Config, ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_reads_the_seeds_conf_json_as_it_is():
    cfg = config.load(CONFIGS / "seed_conf.json")
    assert cfg.model_name == "resnet18"
    assert cfg.num_clients == 10  # no_models
    assert cfg.dataset == "cifar10"  # type "cifar"
    assert cfg.rounds == 20  # global_epochs
    assert cfg.local_epochs == 3
    assert cfg.clients_per_round == 6  # k
    assert cfg.batch_size == 32
    assert cfg.lr == 0.001 and cfg.momentum == 0.0001
    assert cfg.server_lr == 0.1  # lambda
    assert cfg.effective_min_clients == 6 and cfg.effective_min_fit == 6


def test_reads_toml():
    cfg = config.load(CONFIGS / "digits.toml")
    assert (cfg.model_name, cfg.dataset, cfg.rounds, cfg.clients_per_round) == ("cnn", "digits", 10, 3)


def test_flags_override_the_file():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--config", str(CONFIGS / "seed_conf.json"), "--rounds", "3",
                              "--clients-per-round", "2", "--server-lr", "1.0", "--model-name", "cnn"])
    cfg = config.from_arguments(args)
    assert (cfg.rounds, cfg.clients_per_round, cfg.server_lr, cfg.model_name) == (3, 2, 1.0, "cnn")
    assert cfg.num_clients == 10  # untouched file value


def test_defaults_without_a_file():
    assert config.load() == Config()


def write(tmp_path, data, name="c.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'globl_epochs'"):
        config.load(write(tmp_path, {"globl_epochs": 3}))


@pytest.mark.parametrize("key, value, message", [
    ("k", 0, "'clients_per_round': must be at least 1"),
    ("global_epochs", -1, "'rounds': must be at least 1"),
    ("lr", "fast", "'lr': expected a number"),
    ("lr", 0, "'lr': must be positive"),
    ("lambda", -0.5, "'server_lr': must be positive"),
    ("no_models", 2.5, "'no_models': expected a whole number"),
    ("local_epochs", True, "'local_epochs': expected a whole number"),
    ("model_name", "vgg", "'model_name': unknown model 'vgg'"),
    ("model_name", "torchvision:vgg99", "'model_name': torchvision has no classifier 'vgg99'"),
    ("type", "imagenet", "'dataset': unknown data set 'imagenet'"),
    ("optimizer", "rmsprop", "'optimizer': must be one of"),
    ("port", 70000, "'port': must be between"),
    ("dp_noise_multiplier", -1, "'dp_noise_multiplier': must be 0"),
])
def test_bad_values_name_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config.load(write(tmp_path, {key: value}))


def test_min_fit_cannot_exceed_k(tmp_path):
    with pytest.raises(ConfigError, match="'min_fit'"):
        config.load(write(tmp_path, {"k": 2, "min_fit": 3}))


def test_alias_and_name_together_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="given twice"):
        config.load(write(tmp_path, {"k": 2, "clients_per_round": 3}))


def test_invalid_json_and_missing_file_and_extension(tmp_path):
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.load(write(tmp_path, "{nope", "bad.json"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "rounds = = 3", "bad.toml"))
    with pytest.raises(ConfigError, match="cannot read config file"):
        config.load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="must end in .toml or .json"):
        config.load(write(tmp_path, "rounds: 3", "c.yaml"))


def test_config_reference_in_docs_is_current():
    import subprocess
    import sys

    root = CONFIGS.parent
    done = subprocess.run([sys.executable, str(root / "scripts" / "gen_config_doc.py"), "--check"])
    assert done.returncode == 0, "docs/config.md is stale: run python scripts/gen_config_doc.py"


def test_differential_privacy_needs_fedavg_and_a_positive_clip(tmp_path):
    with pytest.raises(ConfigError, match="'aggregator': must be fedavg with differential privacy"):
        config.load(write(tmp_path, {"dp_noise_multiplier": 1.0, "aggregator": "median"}))
    with pytest.raises(ConfigError, match="'dp_clip': must be positive"):
        config.load(write(tmp_path, {"dp_noise_multiplier": 1.0, "dp_clip": 0}))


# --- what is derived from the declarations ----------------------------------------------------------

def test_every_setting_has_a_typed_flag_and_a_line_in_the_docs():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    flags = {a.dest: a for a in parser._actions}
    docs = (CONFIGS.parent / "docs" / "config.md").read_text()
    for name, d in config.SETTINGS.items():
        assert flags[name].option_strings == ["--" + name.replace("_", "-")]
        # A bool's flag takes true or false (argparse's type=bool would read "false" as True).
        assert flags[name].type is (parse_bool if d.type is bool else d.type)
        assert d.type in (int, float, str, bool) and d.setting.help
        assert f"| `{name}` | `{d.default!r}` |" in docs
        if d.setting.alias:
            assert f"`{d.setting.alias}`" in docs


def test_the_seeds_aliases():
    assert config.ALIASES == {"type": "dataset", "no_models": "num_clients", "global_epochs": "rounds",
                              "k": "clients_per_round", "lambda": "server_lr"}
    assert config.load(dataset="cifar").dataset == "cifar10"  # the seed's name for CIFAR-10


def test_clients_receive_every_client_hyperparameter_and_nothing_else():
    from common import messages
    from common.settings import declared

    cfg = config.load(lr=0.25, batch_size=8, compression=" topk:0.50", partition="shards", eval_fraction=0.1)
    spec = messages.ModelSpec("cnn", (1, 8, 8), 10)
    train = cfg.train_config(spec)
    names = [d.name for d in declared(messages.ClientHyperparameters)]
    assert names and all(config.sent_to_clients(n) and n in config.SETTINGS for n in names)
    assert not config.sent_to_clients("port") and not config.sent_to_clients("model_name")
    for name in names:
        assert getattr(train, name) == getattr(cfg, name) or name == "compression"
    assert train.model == spec and train.compression == "topk:0.5"  # the codec's own spelling
    assert (train.lr, train.batch_size, train.partition, train.eval_fraction) == (0.25, 8, "shards", 0.1)


def test_the_resume_hash_is_the_one_checkpoints_already_hold():
    # Computed by the code before the settings were declared; a change here strands every checkpoint.
    assert config.config_hash(config.load()) == "9d54ceb5e5cba560"
    other = config.load(lr=0.5, model_name="mlp", compression="topk:0.10", dataset="cifar")
    assert config.config_hash(other) == "7f0e8df924c7244a"


@pytest.mark.parametrize("change", [
    {"lr": 0.1}, {"model_name": "mlp"}, {"dataset": "mnist"}, {"aggregator": "median"}, {"seed": 3},
    {"clients_per_round": 2}, {"server_optimizer": "fedadam"}, {"eval_fraction": 0.2}, {"dp_delta": 1e-6},
])
def test_a_run_defining_setting_changes_the_resume_hash(change):
    assert config.SETTINGS[next(iter(change))].setting.defines_run
    assert config.config_hash(config.load(**change)) != config.config_hash(config.load())


@pytest.mark.parametrize("change", [
    {"port": 1234}, {"host": "0.0.0.0"}, {"rounds": 50}, {"out": "elsewhere"}, {"round_timeout": 5.0},
    {"data_root": "/data"}, {"max_uploads": 4}, {"min_clients": 5}, {"heartbeat_seconds": 1.0},
])
def test_other_settings_leave_the_resume_hash_alone(change):
    assert not config.SETTINGS[next(iter(change))].setting.defines_run
    assert config.config_hash(config.load(**change)) == config.config_hash(config.load())


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "'batch_size': must be at least 1, got 0"),
    ("eval_fraction", 0.7, "'eval_fraction': must be between 0 (off) and 0.5, got 0.7"),
    ("compression", "zip", "'compression': unknown compression 'zip'"),
    ("partition", "stripes", "'partition': unknown partition 'stripes'"),
    ("aggregator", "mean", "'aggregator': unknown aggregator"),
    ("server_beta2", 1.0, "'server_beta2': must be at least 0 and below 1, got 1.0"),
    ("max_uploads", -1, "'max_uploads': must be 0 (automatic) or more, got -1"),
    ("heartbeat_seconds", 0.01, "'heartbeat_seconds': must be between 0.1 and 3600 seconds"),
])
def test_each_settings_own_check(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(write(tmp_path, {key: value}))
