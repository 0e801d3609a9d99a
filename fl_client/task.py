"""One round as the user's training code sees it: a `Task` handed over, a `Result` given back.

The same objects reach a loop over `Federation.rounds()`, an app run by `fl-client --app`, the
built-in training (fl_client.builtin) and a simulation in one process (fl_tools.simulation); see
docs/client-api.md.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from common import messages as m
from common.settings import values_of
from common.training import seed_torch

State = dict[str, torch.Tensor]


class Result(NamedTuple):
    """What a round's training gives back."""

    weights: nn.Module | Mapping[str, torch.Tensor]  # the trained model, or its state_dict()
    num_samples: int  # the update's weight in the aggregate: usually the samples trained on
    metrics: Mapping[str, float] = {}  # anything worth recording (fl-server writes them to metrics.jsonl)


class Evaluation(NamedTuple):
    """A federated evaluation of the global model on data the client did not train on."""

    loss: float
    num_samples: int
    accuracy: float | None = None
    metrics: Mapping[str, float] = {}  # more of them, recorded as eval_NAME

    def as_metrics(self) -> dict[str, float]:
        """The names fl-server averages over the clients into each round's federated_evaluation."""
        out = {"eval_loss": float(self.loss), "eval_samples": float(self.num_samples)}
        if self.accuracy is not None and not math.isnan(self.accuracy):
            out["eval_accuracy"] = float(self.accuracy)
        out.update({f"eval_{name}": float(value) for name, value in self.metrics.items()})
        return out


TrainFn = Callable[["Task"], "Result | None"]  # None: it called task.submit itself
EvaluateFn = Callable[["Task"], "Evaluation | None"]


class TaskError(ValueError):
    """What the user's code gave back cannot be sent (wrong tensors, no samples...); says what to do."""


@dataclass
class Task:
    """One round of training for this client. Load `global_state` into your model, train it as you
    always do, then `submit` (or return a `Result` from an app)."""

    client_id: str
    round: int
    config: m.TrainConfig  # the federation's hyperparameters (config.lr, config.local_epochs...) and model spec
    global_state: State  # the global model to train from, on the CPU; yours to change
    device: torch.device  # where this client trains (fl-client --device)
    seed: int  # torch's global generator is seeded with it already: a re-run trains the same way
    data_dir: str | None = None  # fl-client --data, if given
    _should_stop: Callable[[], bool] = field(default=lambda: False, repr=False)
    _submit: Callable[[Task, Result], m.SubmitResult] | None = field(default=None, repr=False)
    evaluation: dict[str, float] = field(default_factory=dict)  # report_evaluation's, sent with the update
    result: m.SubmitResult | None = None  # the server's answer, once submitted

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The settings every client receives (common/messages.py ClientHyperparameters), by name."""
        return values_of(self.config, m.ClientHyperparameters)

    @property
    def wants_evaluation(self) -> bool:
        """The server asks clients to evaluate the global model on data they hold out (eval_fraction)."""
        return self.config.eval_fraction > 0

    def should_stop(self) -> bool:
        """True once the round is over without this client (it closed, or the server gave up on it):
        stop training early, nothing you submit now is taken."""
        return self._should_stop()

    def report_evaluation(self, loss: float, num_samples: int, accuracy: float | None = None,
                          **metrics: float) -> None:
        """The global model's quality on your held-out data, sent with this round's update."""
        evaluation = Evaluation(loss, num_samples, accuracy, metrics)
        self.evaluation = check_metrics(evaluation.as_metrics(), "report_evaluation")

    def submit(self, weights: nn.Module | Mapping[str, torch.Tensor], num_samples: int,
               metrics: Mapping[str, float] | None = None) -> m.SubmitResult:
        """Send the trained model (or its state_dict): only its difference from `global_state` travels."""
        if self.result is not None:
            raise TaskError(f"round {self.round} was submitted already; submit once per task")
        if self._submit is None:
            raise TaskError("this task has no federation to submit to")
        self.result = self._submit(self, Result(weights, num_samples, metrics or {}))
        return self.result


def check_metrics(metrics: Mapping[str, Any], what: str) -> dict[str, float]:
    """`metrics` as finite floats by name, or TaskError: the server would refuse the whole update."""
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise TaskError(f"{what}: metric names must be non-empty strings, got {name!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TaskError(f"{what}: metric {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise TaskError(f"{what}: metric {name!r} is {number}; report finite numbers only")
        out[name] = number
    return out


def state_of(weights: nn.Module | Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> State:
    """The trained tensors by the global model's names, detached, on the CPU, in the global dtypes; a
    TaskError in one sentence when they do not fit the global model."""
    if isinstance(weights, nn.Module):
        weights = weights.state_dict()
    if not isinstance(weights, Mapping):
        raise TaskError(f"submit a model (nn.Module) or its state_dict(), not {type(weights).__name__}")
    names = set(weights)
    # A model wrapped in DataParallel / DistributedDataParallel names its tensors module.NAME.
    if names and not names & set(global_state) and all(isinstance(n, str) and n.startswith("module.")
                                                        for n in names):
        weights = {n.removeprefix("module."): t for n, t in weights.items()}
    missing = [n for n in global_state if n not in weights]
    extra = [n for n in weights if n not in global_state]
    if missing or extra:
        first = (f"has no tensor {missing[0]!r}" if missing else f"has a tensor {extra[0]!r}") + \
            " that the global model " + ("has" if missing else "has not")
        raise TaskError(f"the submitted model {first} ({len(missing)} missing, {len(extra)} extra); train the same "
                        "architecture the global state was loaded into")
    state = {}
    for name, reference in global_state.items():
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor):
            raise TaskError(f"the submitted {name!r} is a {type(tensor).__name__}, not a tensor")
        if tensor.shape != reference.shape:
            raise TaskError(f"the submitted {name!r} has shape {list(tensor.shape)} but the global model's has "
                            f"{list(reference.shape)}; train the same architecture the global state was loaded into")
        if tensor.is_floating_point() != reference.is_floating_point() and reference.dtype != torch.bool:
            raise TaskError(f"the submitted {name!r} is {tensor.dtype} but the global model's is {reference.dtype}")
        state[name] = tensor.detach().to("cpu", reference.dtype)
    return state


def run_app(task: Task, train: TrainFn, evaluate: EvaluateFn | None = None) -> Result | None:
    """The user's code on one task: the evaluation of the global model first, when the server asks for
    one and there is an evaluation function, then the training."""
    seed_torch(task.seed)
    if evaluate is not None and task.wants_evaluation:
        evaluation = evaluate(task)
        if evaluation is not None:
            if not isinstance(evaluation, Evaluation):
                raise TaskError(f"an evaluation function returns an Evaluation(loss, num_samples, accuracy), "
                                f"not {type(evaluation).__name__}")
            task.evaluation = check_metrics(evaluation.as_metrics(), "evaluation")
    result = train(task)
    if result is not None and not isinstance(result, tuple):
        raise TaskError(f"a training function returns a Result(weights, num_samples, metrics) or None (after "
                        f"task.submit), not {type(result).__name__}")
    return None if result is None else Result(*result)
