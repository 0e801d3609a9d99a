"""Where the server's model comes from: its spec (the data set's sample shape and classes, or the config's
input_shape and num_classes), its first weights (random from the seed, or the initial_weights file), and
the operator's own evaluation function. Everything here runs at start-up, before the server listens, and
every error is one sentence (a ValueError) that fl-server prints as it is.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from common.datasets import ArrayData
from common.messages import ModelSpec, class_names
from common.models import build_model, import_object, is_custom
from common.settings import SettingError
from fl_server.weights import fit_to_model, read_weights

if TYPE_CHECKING:
    from fl_server.config import Config

# The operator's evaluation: (model loaded with a round's weights, device) -> {metric: value}.
EvaluationFunction = Callable[[nn.Module, torch.device], Mapping[str, float]]


def parse_shape(text: str) -> tuple[int, ...]:
    """`3,32,32` -> (3, 32, 32); "" -> () (from the data set). ValueError saying what is allowed."""
    if not text.strip():
        return ()
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"must be positive whole numbers separated by commas, such as 3,32,32, got {text!r}")
    return shape


def model_spec(cfg: Config, data: ArrayData | None) -> ModelSpec:
    """The model every client builds. From the data set when there is one (input_shape and num_classes, if
    given, must agree with it); else from the config."""
    shape = parse_shape(cfg.input_shape)
    if data is None:
        return ModelSpec(cfg.model_name, shape, cfg.effective_num_classes)
    if cfg.classes and len(class_names(cfg.classes)) != data.num_classes:
        raise SettingError(f"config key 'classes': {cfg.dataset} has {data.num_classes} classes, but `classes` "
                           f"names {len(class_names(cfg.classes))}; name each of its classes once, in label order")
    if shape and shape != data.input_shape:
        raise SettingError(f"config key 'input_shape': the samples of {cfg.dataset} have shape "
                           f"{','.join(map(str, data.input_shape))}, got {cfg.input_shape!r}; leave it empty or "
                           "make it agree")
    if cfg.num_classes and cfg.num_classes != data.num_classes:
        raise SettingError(f"config key 'num_classes': {cfg.dataset} has {data.num_classes} classes, got "
                           f"{cfg.num_classes}; leave it 0 or make it agree")
    return ModelSpec(cfg.model_name, data.input_shape, data.num_classes)


def make_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """build_model, with every failure one sentence that says where a user's class must be importable."""
    if is_custom(spec.name):
        import_object(spec.name, "model class", program="fl-server")
    try:
        return build_model(spec, seed)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - a built-in model refusing its shape: one sentence all the same
        raise ValueError(f"cannot build model {spec.name!r} for samples of shape {list(spec.input_shape)} and "
                         f"{spec.num_classes} classes ({type(e).__name__}: {str(e)[:200]}); check input_shape "
                         "and num_classes") from None


def initial_state(cfg: Config, model: nn.Module | None) -> dict[str, torch.Tensor]:
    """The global model of round 1: `model`'s own (seeded) weights, or the initial_weights file's, loaded
    into `model` when there is one, and federated as they are when there is no model class."""
    if not cfg.initial_weights:
        assert model is not None, "validate() requires initial_weights without a model class"
        return model.state_dict()
    state = read_weights(cfg.initial_weights)
    if model is None:
        return state
    return fit_to_model(cfg.initial_weights, state, model, cfg.model_name)


def load_evaluation(name: str) -> EvaluationFunction:
    """The server_evaluation function `package.module:function`, imported and checked at start-up."""
    function = import_object(name, "server_evaluation function", program="fl-server")
    if not callable(function):
        raise ValueError(f"server_evaluation {name!r} is not a function; name one taking (model, device) and "
                         "returning a dict of metrics")
    try:
        inspect.signature(function).bind(None, None)
    except TypeError:
        raise ValueError(f"server_evaluation {name!r} cannot be called as function(model, device); give it "
                         "those two parameters") from None
    except ValueError:  # no signature to inspect (a builtin): it will be called all the same
        pass
    return function
