"""Server optimizers: how a round's averaged diff moves the global model (Reddi et al., 2021)."""
from __future__ import annotations

from collections.abc import Mapping

import torch


class ServerOptimizer:
    """Turns a round's averaged diff into the step added to the global model (Reddi et al., 2021,
    "Adaptive Federated Optimization"): the averaged diff is the negative of a pseudo-gradient.

    - `fedavg`: step = lr * diff (lr is the seed's `lambda`; 1.0 is plain FedAvg);
    - `fedavgm`: server momentum (Hsu et al., 2019): m = momentum * m + diff; step = lr * m;
    - `fedadam`, `fedyogi`: m = b1 m + (1 - b1) diff; v = b2 v + (1 - b2) diff^2 (Adam) or
      v = v - (1 - b2) diff^2 sign(v - diff^2) (Yogi); step = lr * m / (sqrt(v) + tau).

    Only floating-point tensors go through it; integer and bool buffers take the rule's combination of
    the clients' values (values.py). Its state is checkpointed with the model.
    """

    KINDS = ("fedavg", "fedavgm", "fedadam", "fedyogi")

    def __init__(self, kind: str = "fedavg", lr: float = 1.0, momentum: float = 0.9, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3):
        if kind not in self.KINDS:
            raise ValueError(f"unknown server optimizer {kind!r}; use one of {', '.join(self.KINDS)}")
        self.kind, self.lr, self.momentum, self.beta1, self.beta2, self.tau = kind, lr, momentum, beta1, beta2, tau
        self.state: dict[str, torch.Tensor] = {}  # "m/NAME", "v/NAME"

    def step(self, name: str, diff: torch.Tensor) -> torch.Tensor:
        """The step for tensor `name`, computed in `diff`'s memory (float32 or float64)."""
        if self.kind == "fedavg":
            return diff.mul_(self.lr)
        m = self.state.get("m/" + name)
        if m is None:
            m = self.state["m/" + name] = torch.zeros_like(diff)
        if self.kind == "fedavgm":
            m.mul_(self.momentum).add_(diff)
            return diff.copy_(m).mul_(self.lr)
        v = self.state.get("v/" + name)
        if v is None:
            v = self.state["v/" + name] = torch.full_like(diff, self.tau ** 2)
        m.mul_(self.beta1).add_(diff, alpha=1 - self.beta1)
        squared = diff.square_()
        if self.kind == "fedadam":
            v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)
        else:
            v.sub_(torch.sign(v - squared).mul_(squared), alpha=1 - self.beta2)
        return torch.div(m, v.sqrt().add_(self.tau), out=diff).mul_(self.lr)

    def move(self, name: str, mean: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """`current` moved by the step for the round's aggregate diff `mean` (whose memory it takes), added
        in `mean`'s precision and returned in `current`'s dtype."""
        new = self.step(name, mean).add_(current)
        return new if new.dtype == current.dtype else new.to(current.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    def moments(self) -> int:
        """How many model-sized tensors its state holds (m, and v for Adam and Yogi)."""
        return {"fedavg": 0, "fedavgm": 1}.get(self.kind, 2)


class OptimizerState:
    """The checkpointed state of an aggregator whose only state across rounds is its server optimizer's."""

    optimizer: ServerOptimizer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.optimizer.load_state_dict(state)
