"""A server that holds no data, and the user's own model, initial weights, evaluation and aggregation rule:
the settings, their checks, and what fl-server builds from them at start-up (fl_server/model_source.py).
Every error a user can cause is one sentence."""
import pytest
import torch

from common.datasets import DataError, check_dataset_name, load_dataset, load_digits
from common.messages import JoinRequest, ModelSpec
from common.models import build_model
from common.tensors import specs_of
from fl_server import config, model_source
from fl_server.aggregation import ServerOptimizer, make_aggregator, parse_aggregator
from fl_server.config import ConfigError
from fl_server.errors import InvalidJoinError
from fl_server.membership import Membership
from fl_server.weights import WeightsError

NO_DATA = {"dataset": "none", "model_name": "mlp", "input_shape": "1,8,8", "num_classes": 10}


def one_sentence(error: BaseException) -> str:
    text = str(error)
    assert "\n" not in text and "Traceback" not in text
    return text


# --- dataset none ---------------------------------------------------------------------------------------

def test_none_is_a_data_set_name_that_loads_nothing():
    check_dataset_name("none")
    with pytest.raises(DataError, match="the federation names no data set: start fl-client with --data DIR holding "
                                        "your own data"):
        load_dataset("none")


def test_a_client_without_data_is_refused_when_there_is_no_data_set():
    members = Membership(2.0, clock=lambda: 0.0, dataset="none", num_shares=3)
    with pytest.raises(InvalidJoinError, match="names no data set to give it a share of; start it with --data"):
        members.register(JoinRequest(client_id="0", num_samples=0))
    assert members.register(JoinRequest(client_id="0", num_samples=120)).num_samples == 120


def test_with_no_data_set_the_model_comes_from_the_config():
    cfg = config.load(**NO_DATA)
    assert model_source.model_spec(cfg, None) == ModelSpec("mlp", (1, 8, 8), 10)
    # A regression model of the user's own may take 0 classes.
    cfg = config.load(dataset="none", model_name="tests.models.tiny:Regressor", input_shape=" 3, 4 ,5")
    assert model_source.model_spec(cfg, None) == ModelSpec("tests.models.tiny:Regressor", (3, 4, 5), 0)


def test_with_a_data_set_input_shape_and_num_classes_must_agree_with_it():
    train, _ = load_digits()
    assert model_source.model_spec(config.load(model_name="mlp"), train) == ModelSpec("mlp", (1, 8, 8), 10)
    assert model_source.model_spec(config.load(model_name="mlp", input_shape="1,8,8", num_classes=10),
                                   train) == ModelSpec("mlp", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="'input_shape': the samples of digits have shape 1,8,8, got '3,8,8'"):
        model_source.model_spec(config.load(input_shape="3,8,8"), train)
    with pytest.raises(ConfigError, match="'num_classes': digits has 10 classes, got 12"):
        model_source.model_spec(config.load(num_classes=12), train)


@pytest.mark.parametrize("values, message", [
    ({"dataset": "none", "model_name": "mlp", "num_classes": 10}, "'input_shape': must give one sample's shape"),
    ({"dataset": "none", "model_name": "cnn", "input_shape": "1,8,8"},
     "for the classifier cnn with dataset none"),
    ({"dataset": "none", "model_name": "torchvision:resnet18", "input_shape": "3,32,32"}, "'num_classes'"),
    ({"input_shape": "3x32x32"}, "'input_shape': must be positive whole numbers separated by commas"),
    ({"input_shape": "1,0,8"}, "'input_shape': must be positive whole numbers"),
    ({"num_classes": -1}, "'num_classes': must be 0 or more"),
    ({"model_name": "", "dataset": "none"}, "'initial_weights': must name the model's weights file"),
    ({"model_name": "", "initial_weights": "w.pt"}, "'dataset': must be none when model_name is empty"),
    ({"model_name": "", "initial_weights": "w.pt", "dataset": "none", "server_evaluation": "a.b:f"},
     "'server_evaluation': must be empty when model_name is empty"),
    ({"server_evaluation": "evaluate.py"}, "'server_evaluation': must be package.module:function"),
    ({"aggregator": "my rule"}, "'aggregator': unknown aggregator"),
    ({"aggregator": "tests.custom_rules:NormClippedMean", "dp_noise_multiplier": 1.0},
     "'aggregator': must be fedavg with differential privacy"),
])
def test_config_errors(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as error:
        config.load(**values)
    one_sentence(error.value)


def test_the_new_settings_enter_the_resume_hash_only_when_set():
    base = config.config_hash(config.load())
    assert base == "9d54ceb5e5cba560"  # as before they existed: older checkpoints still resume
    for change in ({"initial_weights": "w.pt"}, {"input_shape": "1,8,8"}, {"num_classes": 10}):
        assert config.config_hash(config.load(**change)) != base, change
    assert config.config_hash(config.load(server_evaluation="a.b:f")) == base  # it measures, it does not train
    assert config.config_hash(config.load(aggregator="tests.custom_rules:NormClippedMean")) != base


# --- the user's model class -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("tests.models.nowhere:Net", "cannot import model class 'tests.models.nowhere:Net' (ModuleNotFoundError"),
    ("tests.models.tiny:Nothing", "(AttributeError"),
    ("tests.models.raises_on_import:Net", "(RuntimeError: CUDA driver not found)"),
    ("tests.models.tiny:not_a_model", "is not an nn.Module class"),
    ("tests.models.tiny:Explodes", "failed to build as Explodes(input_shape=(1, 8, 8), num_classes=10) "
                                   "(RuntimeError: this model needs a GPU)"),
])
def test_a_model_class_that_cannot_be_imported_or_built_is_one_sentence(name, message):
    with pytest.raises(ValueError) as error:
        model_source.make_model(ModelSpec(name, (1, 8, 8), 10), seed=0)
    text = one_sentence(error.value)
    assert message in text
    if "cannot import" in text:
        assert "importable by fl-server: in the folder it runs in, on its PYTHONPATH, or installed" in text


def test_a_built_in_model_that_refuses_its_shape_is_one_sentence():
    with pytest.raises(ValueError, match="needs image inputs") as error:
        model_source.make_model(ModelSpec("cnn", (64,), 10))
    one_sentence(error.value)


# --- initial weights ------------------------------------------------------------------------------------

def test_initial_weights_replace_the_random_ones(tmp_path):
    spec = ModelSpec("mlp", (1, 8, 8), 10)
    pretrained = build_model(spec, seed=7).state_dict()
    torch.save({"state_dict": pretrained}, tmp_path / "w.pt")
    cfg = config.load(**NO_DATA, initial_weights=str(tmp_path / "w.pt"))
    state = model_source.initial_state(cfg, model_source.make_model(spec, seed=0))
    assert all(torch.equal(state[k], pretrained[k]) for k in pretrained)
    assert not torch.equal(model_source.initial_state(config.load(**NO_DATA), build_model(spec, seed=0))
                           ["net.1.weight"], pretrained["net.1.weight"])


def test_weights_of_another_model_are_one_sentence(tmp_path):
    torch.save(build_model(ModelSpec("mlp", (1, 8, 8), 3)).state_dict(), tmp_path / "w.pt")
    cfg = config.load(**NO_DATA, initial_weights=str(tmp_path / "w.pt"))
    with pytest.raises(WeightsError, match="tensor 'net.5.weight' is \\[3, 200\\] in the file but \\[10, 200\\]"):
        model_source.initial_state(cfg, build_model(model_source.model_spec(cfg, None)))


def test_without_a_model_class_the_file_is_the_model(tmp_path):
    state = {"encoder.weight": torch.randn(4, 3), "steps": torch.tensor(9), "mask": torch.tensor([True, False])}
    torch.save(state, tmp_path / "w.pt")
    cfg = config.load(dataset="none", model_name="", initial_weights=str(tmp_path / "w.pt"))
    spec = model_source.model_spec(cfg, None)
    assert spec == ModelSpec("", (), 0)
    got = model_source.initial_state(cfg, None)
    assert list(got) == list(state) and all(torch.equal(got[k], state[k]) for k in state)


# --- the operator's evaluation ------------------------------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("tests.models.nowhere:f", "cannot import server_evaluation function 'tests.models.nowhere:f'"),
    ("tests.models.tiny:TinyNet", None),  # a class is callable as (input_shape, num_classes): it binds
    ("tests.models.evaluation:one_parameter", "cannot be called as function(model, device)"),
    ("tests.models.tiny:math", "is not a function"),
])
def test_an_evaluation_function_is_checked_at_start_up(name, message):
    if message is None:
        assert model_source.load_evaluation(name)
        return
    with pytest.raises(ValueError) as error:
        model_source.load_evaluation(name)
    assert message in one_sentence(error.value)


# --- the user's aggregation rule ----------------------------------------------------------------------

SPECS = specs_of({"w": torch.zeros(2)})


def test_a_users_rule_by_name():
    assert parse_aggregator("tests.custom_rules:NormClippedMean") == ("tests.custom_rules:NormClippedMean", ())
    agg = make_aggregator(SPECS, "tests.custom_rules:NormClippedMean", 3, ServerOptimizer("fedavgm"))
    assert type(agg).__name__ == "NormClippedMean" and agg.optimizer.kind == "fedavgm"


@pytest.mark.parametrize("name, message", [
    ("tests.nowhere:Rule", "cannot import aggregator class 'tests.nowhere:Rule'"),
    ("tests.custom_rules:math", "is not a class"),
    ("tests.custom_rules:RefusesToBuild", "failed to build as RefusesToBuild(specs, optimizer, capacity) "
                                          "(RuntimeError: needs a GPU)"),
    ("tests.custom_rules:LacksFold", "does not keep the Aggregator protocol (fl_server/aggregation/base.py): it "
                                     "lacks begin_round, check, fold"),
])
def test_a_users_rule_that_cannot_be_used_is_one_sentence(name, message):
    with pytest.raises(ValueError) as error:
        make_aggregator(SPECS, name, 3, ServerOptimizer())
    assert message in one_sentence(error.value)
