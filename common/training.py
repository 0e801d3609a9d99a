"""Local training and evaluation loops, shared by the client (training) and the server (evaluation)."""
from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common.messages import TrainConfig


class TrainingStopped(Exception):
    """Training was asked to stop (its round is over); the partial result is thrown away."""


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last local epoch
    num_samples: int  # samples in the shard (the FedAvg weight)
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    num_samples: int


def select_device(requested: str = "auto") -> torch.device:
    """`auto` takes the first GPU when CUDA is usable, else the CPU; `cuda`/`cuda:N` insist on a GPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ValueError(f"unknown device {requested!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r} asked for, but CUDA is not available on this machine; "
                             "use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {requested!r} asked for, but this machine has "
                             f"{torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {requested!r}; use auto, cpu, cuda or cuda:N")
    return device


def seed_torch(seed: int) -> None:
    """`torch.manual_seed(seed)`, at a hundredth of its cost on a machine without an accelerator.

    torch.manual_seed also queues the seed for CUDA, XPU and MTIA generators, which records the caller's
    stack each time a device is not initialized yet (0.1-0.6 ms a call here, twice in each client
    round). With no accelerator visible none of those generators can ever be used, so seeding the CPU's
    default generator is all it does."""
    if torch.accelerator.is_available():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


class RoundSGD:
    """SGD with momentum and weight decay for one round's local epochs: the same arithmetic as
    torch.optim.SGD's foreach implementation (its default on GPUs; on the CPU it gives the same bits as
    the default per-tensor loop), without torch.optim's per-step wrappers (profiler hooks, grad-mode and
    compiler guards, parameter groups), which cost 0.15-0.25 ms a step: a quarter of a small model's
    round. Sparse gradients take torch's per-tensor path, which handles them."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        index = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not index:
            return
        params = [self.params[i] for i in index]
        grads: list[torch.Tensor] = [p.grad for p in params if p.grad is not None]
        if any(g.is_sparse for g in grads):
            self._step_per_tensor(index)
            return
        if self.weight_decay != 0:
            grads = list(torch._foreach_add(grads, params, alpha=self.weight_decay))
        if self.momentum != 0:
            held = [self.momentum_buffers[i] for i in index]
            buffers: list[torch.Tensor] = [b for b in held if b is not None]
            if len(buffers) == len(index):
                torch._foreach_mul_(buffers, self.momentum)
                torch._foreach_add_(buffers, grads, alpha=1)
            else:  # the first step of some: their buffers start as their gradients
                buffers = []
                for i, b, g in zip(index, held, grads):
                    if b is None:
                        b = self.momentum_buffers[i] = torch.clone(g).detach()
                    else:
                        b.mul_(self.momentum).add_(g, alpha=1)
                    buffers.append(b)
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-self.lr)

    def _step_per_tensor(self, index: list[int]) -> None:
        for i in index:  # torch.optim.SGD's _single_tensor_sgd, without nesterov, dampening or maximize
            param = self.params[i]
            grad = param.grad
            assert grad is not None
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = self.momentum_buffers[i] = torch.clone(grad).detach()
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1)
                grad = buf
            param.add_(grad, alpha=-self.lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | RoundSGD:
    """A fresh optimizer for a round, as FedAvg has it: Adam from torch.optim, or RoundSGD."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return RoundSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """`model.to(device)`, skipped when every parameter and buffer is there already (each round after the
    first): Module.to walks every submodule and assigns every tensor back even then (70 us a call for a
    64-128-10 MLP, against 20 us for looking)."""
    if any(t.device != device for t in itertools.chain(model.parameters(), model.buffers())):
        model.to(device)
    return model


def reconstructs(model: nn.Module) -> bool:
    """An autoencoder learns to reproduce its input (MSE); every other model classifies (cross-entropy)."""
    return getattr(getattr(model, "module", model), "reconstructs", False)  # through a DDP wrapper too


AUTOCAST = {"off": None, "bf16": torch.bfloat16}  # fl-client --autocast


def check_autocast(dtype: torch.dtype | None, device: torch.device) -> None:
    """ValueError unless `device` can train under autocast to `dtype`."""
    if dtype is torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{torch.cuda.get_device_name(device)} cannot compute in bfloat16; drop --autocast bf16")


def train(model: nn.Module, loader: Iterable, cfg: TrainConfig, device: torch.device,
          should_stop: Callable[[], bool] | None = None,
          on_epoch: Callable[[int, float], None] | None = None, autocast: torch.dtype | None = None) -> TrainResult:
    """`cfg.local_epochs` epochs of mini-batch training; a fresh optimizer each round, as in FedAvg.

    `should_stop` is asked before every batch; when it says yes, TrainingStopped is raised.
    `on_epoch(epoch, mean_loss)` is called after each epoch (progress bars).
    `autocast=torch.bfloat16`: the forward pass and loss in bfloat16 where PyTorch's autocast deems it
    safe (matrix products, convolutions). The weights, their gradients and the optimizer stay float32,
    so the diff sent back is float32 like any other; bfloat16 has float32's range, so no loss scaling."""
    start = time.perf_counter()
    on_device(model, device).train()
    optimizer = make_optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    # FedProx (Li et al., 2020): pull the local model towards the round's global one, which limits
    # client drift when shards differ.
    anchor = [p.detach().clone() for p in params] if cfg.mu > 0 else None
    unsupervised = reconstructs(model)
    mixed_precision = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    epoch_loss, num_samples = 0.0, 0
    for epoch in range(cfg.local_epochs):
        total, num_samples = torch.zeros((), device=device), 0
        for x, y in loader:
            if should_stop is not None and should_stop():
                raise TrainingStopped
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            with mixed_precision:
                loss = _loss(model(x), x, y, unsupervised)
            objective = loss
            if anchor is not None:
                objective = loss + cfg.mu / 2 * sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchor))
            objective.backward()
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
            optimizer.step()
            # Accumulate on the device: a .item() per batch would stall the GPU every step.
            total += loss.detach() * len(y)
            num_samples += len(y)
        epoch_loss = float(total) / max(num_samples, 1)
        if on_epoch is not None:
            on_epoch(epoch, epoch_loss)
    return TrainResult(loss=epoch_loss, num_samples=num_samples, seconds=time.perf_counter() - start)


def _loss(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor, unsupervised: bool,
          reduction: str = "mean") -> torch.Tensor:
    """Reconstruction error for an autoencoder; mean squared error for float targets (regression, the
    model's one output per sample); cross-entropy for class labels."""
    if unsupervised:
        return F.mse_loss(out, x, reduction=reduction)
    if y.is_floating_point():
        return F.mse_loss(out.reshape(y.shape), y, reduction=reduction)
    return F.cross_entropy(out, y, reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device) -> EvalResult:
    """Cross-entropy and accuracy; for an autoencoder, the mean squared reconstruction error and NaN; for
    regression (float targets), the mean squared error and NaN."""
    on_device(model, device).eval()
    unsupervised = reconstructs(model)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count, regression = 0, False
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        if unsupervised:
            loss_sum += F.mse_loss(out, x, reduction="sum").double() / x[0].numel()
        elif y.is_floating_point():  # regression: the mean squared error, and no accuracy
            loss_sum += _loss(out, x, y, False, reduction="sum").double()
            regression = True
        else:
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            correct += (out.argmax(dim=1) == y).sum()
        count += len(y)
    if count == 0:
        return EvalResult(loss=float("nan"), accuracy=float("nan"), num_samples=0)
    accuracy = float("nan") if unsupervised or regression else float(correct) / count
    return EvalResult(loss=float(loss_sum) / count, accuracy=accuracy, num_samples=count)
