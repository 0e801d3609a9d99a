"""What `fl-client` runs: an app (the user's training code, or the built-in one) over a Federation.

`--app package.module:function` names the training function (train(task) -> Result); `--evaluate
package.module:function` the evaluation (evaluate(task) -> Evaluation), called when the server asks
for federated evaluation. An app may also name a class: it is made once, with no arguments, and its
`train` and `evaluate` methods are used. The client names its own code, so nothing needs allowing.
"""
from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_client.task import EvaluateFn, TrainFn


class AppError(ValueError):
    """--app or --evaluate names something that cannot be loaded; the message says what to do."""


def _load(text: str, flag: str) -> Any:
    module_name, sep, name = text.partition(":")
    if not sep or not module_name or not name:
        raise AppError(f"{flag} {text!r} is not MODULE:NAME (e.g. {flag} train_fed:train, with train_fed.py in "
                       "the folder fl-client runs in)")
    if module_name.endswith(".py"):  # a file: its folder goes on the path, and its stem is the module
        path = Path(module_name)
        sys.path.insert(0, str(path.parent.resolve()))
        module_name = path.stem
    elif os.getcwd() not in sys.path:  # as `python -m` does: the user's own modules, where they run it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any failure importing the user's module is theirs to fix
        raise AppError(f"{flag} {text}: cannot import {module_name} ({type(e).__name__}: {e}); run fl-client in "
                       "the folder that holds it, or put it on PYTHONPATH") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise AppError(f"{flag} {text}: {module_name} has no {name!r}") from None


def load_app(app: str, evaluate: str | None = None) -> tuple[TrainFn, EvaluateFn | None]:
    """The training and evaluation functions `--app` and `--evaluate` name."""
    target = _load(app, "--app")
    evaluate_fn: EvaluateFn | None = None
    if isinstance(target, type):  # a class: one instance for the client's life, its train and evaluate
        try:
            target = target()
        except Exception as e:  # noqa: BLE001
            raise AppError(f"--app {app}: making the class raised {type(e).__name__}: {e}") from None
        evaluate_fn = getattr(target, "evaluate", None)
        target = getattr(target, "train", None)
    if not callable(target):
        raise AppError(f"--app {app} is not a function (or a class with a train method)")
    if evaluate is not None:
        evaluate_fn = _load(evaluate, "--evaluate")
        if not callable(evaluate_fn):
            raise AppError(f"--evaluate {evaluate} is not a function")
    train_fn: Callable = target
    return train_fn, evaluate_fn
