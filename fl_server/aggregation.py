"""FedAvg over diffs, as a running weighted sum: memory is one model, not one per client.

    global <- global + server_lr * sum_i(n_i * diff_i) / sum_i(n_i)

(McMahan et al., 2017, with the server learning rate of Reddi et al., 2021, "Adaptive Federated
Optimization"; server_lr = 1 is plain FedAvg, and the seed's `lambda`.)
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Iterable, Mapping

import numpy as np

import torch

from common.tensors import DTYPES, TensorSpec, largest_abs, specs_of


class UpdateRejected(ValueError):
    """An update that must not touch the model (wrong tensors, NaN or Inf...)."""


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Integer buffers (BatchNorm's num_batches_tracked) and float64 are summed in float64 so their
    # mean is exact enough to round back; half precisions are summed in float32 to avoid overflow.
    return torch.float32 if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64


def spec_mismatch(got: list[TensorSpec], expected: list[TensorSpec]) -> str | None:
    """None when `got` is exactly `expected`; otherwise the first difference, in words."""
    if got == expected:
        return None
    wanted = {s.name: s for s in expected}
    for spec in got:
        if spec.name not in wanted:
            return f"update has tensor {spec.name!r}, which the model does not have"
        w = wanted[spec.name]
        if spec != w:
            return f"tensor {spec.name!r} is {spec.dtype}{list(spec.shape)}, the model's is {w.dtype}{list(w.shape)}"
    names = {s.name for s in got}
    missing = [s.name for s in expected if s.name not in names]
    if missing:
        return f"update lacks tensors {missing[:5]}"
    return "update lists the model's tensors in another order"


def largest_magnitude(name: str, tensor: torch.Tensor) -> float:
    """The largest absolute value of a floating-point tensor (0 for others); UpdateRejected if it holds
    NaN or Inf."""
    if not (tensor.is_floating_point() and tensor.numel()):
        return 0.0
    largest = largest_abs(tensor.detach().cpu())
    if largest == math.inf:
        raise UpdateRejected(f"tensor {name!r} holds NaN or Inf")
    return largest


def check_update(diff: Mapping[str, torch.Tensor], expected: list[TensorSpec], largest: float | None = None) -> float:
    """Raise UpdateRejected unless `diff` has exactly the expected tensors, all finite; return the
    largest magnitude among its floating-point values. `largest`, when given, is that magnitude already
    found (the values were checked as they streamed in, tensors.PayloadReceiver): they are not
    scanned again."""
    mismatch = spec_mismatch(specs_of(diff), expected)
    if mismatch:
        raise UpdateRejected(mismatch)
    if largest is not None:
        return largest
    return max((largest_magnitude(name, tensor) for name, tensor in diff.items()), default=0.0)


# A weighted value beyond this could overflow the float32 running sum (to Inf) once a million such
# updates are added: finite, yet enough to destroy the model.
MAX_WEIGHTED_MAGNITUDE = float(torch.finfo(torch.float32).max) / 1e6


class ServerOptimizer:
    """Turns a round's averaged diff into the step added to the global model (Reddi et al., 2021,
    "Adaptive Federated Optimization"): the averaged diff is the negative of a pseudo-gradient.

    - `fedavg`: step = lr * diff (lr is the seed's `lambda`; 1.0 is plain FedAvg);
    - `fedavgm`: server momentum (Hsu et al., 2019): m = momentum * m + diff; step = lr * m;
    - `fedadam`, `fedyogi`: m = b1 m + (1 - b1) diff; v = b2 v + (1 - b2) diff^2 (Adam) or
      v = v - (1 - b2) diff^2 sign(v - diff^2) (Yogi); step = lr * m / (sqrt(v) + tau).

    Only floating-point tensors go through it; integer buffers take the plain mean. Its state is
    checkpointed with the model.
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}


class FedAvg:
    """Sample-weighted mean of diffs, folded in one update at a time."""

    def __init__(self, specs: list[TensorSpec], server_lr: float = 1.0, optimizer: ServerOptimizer | None = None):
        self.specs = specs
        self.optimizer = optimizer or ServerOptimizer("fedavg", server_lr)
        self._sums: dict[str, torch.Tensor] = {}
        self.total_weight = 0
        self.count = 0

    def reset(self) -> None:
        self._sums = {}
        self.total_weight = 0
        self.count = 0

    def empty_sums(self, recycle: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Zeroed sums; tensors of `recycle` (a global state nobody reads any more) are zeroed and reused
        where their dtype is the accumulator's, so that rounds do not keep asking the allocator for a
        fresh model's worth of memory (which, across threads, it tends to hold on to rather than reuse)."""
        sums = {}
        for s in self.specs:
            dtype = _accumulator_dtype(DTYPES[s.dtype])
            old = recycle.get(s.name) if recycle is not None else None
            if old is not None and old.dtype == dtype and old.shape == s.shape and old.is_contiguous():
                sums[s.name] = old.zero_()
            else:
                sums[s.name] = torch.zeros(s.shape, dtype=dtype)
        return sums

    def install(self, sums: dict[str, torch.Tensor]) -> None:
        """Use `sums` (from empty_sums, allocated ahead of time) unless an update already arrived."""
        if not self._sums:
            self._sums = sums

    def add(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        """Fold in one diff. Checks everything first, so a rejected diff leaves the sum untouched."""
        self.check(diff, weight)
        self.fold(diff, weight)

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        """Raise UpdateRejected unless `diff` can be folded in; a diff that passes cannot fail to fold.
        `largest`: the diff's largest magnitude, when its values were already checked for NaN and Inf
        (as they streamed in, tensors.PayloadReceiver), which saves a second pass over them."""
        largest = check_update(diff, self.specs, largest)
        if weight <= 0:
            raise UpdateRejected(f"update weight (num_samples) must be positive, got {weight}")
        if largest * weight > MAX_WEIGHTED_MAGNITUDE:
            raise UpdateRejected(f"update values up to {largest:.3g} weighted by {weight} samples would overflow "
                                 "the aggregate")

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        """Add a diff that passed `check`."""
        self._accumulate(diff.items(), weight)
        self.total_weight += weight
        self.count += 1

    def _accumulate(self, tensors: Iterable[tuple[str, torch.Tensor]], alpha: float) -> None:
        """sums[name] += alpha * tensor, in the accumulator's dtype."""
        if not self._sums:
            self._sums = self.empty_sums()
        for name, tensor in tensors:
            acc = self._sums[name]
            acc.add_(tensor.to(acc.dtype), alpha=alpha)

    def _stepped(self, name: str, mean: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """`current` moved by the server optimizer's step for the mean diff `mean` (whose memory it takes)."""
        new = self.optimizer.step(name, mean).add_(current)
        return new if new.dtype == current.dtype else new.to(current.dtype)

    def apply(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global state; the old one is not modified. The new state is computed in the sums'
        own memory (no second model-sized allocation), so the aggregator is empty afterwards."""
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        new_state = {}
        for name, current in global_state.items():
            mean = self._sums[name].div_(self.total_weight)
            if current.is_floating_point():
                new_state[name] = self._stepped(name, mean, current)
            else:
                # Counters take the plain mean. Round, not truncate: a mean step of 0.99 must not become 0.
                new_state[name] = mean.add_(current).round_().to(current.dtype)
        self.reset()
        return new_state


ROBUST_RULES = ("median", "trimmed_mean", "krum", "multikrum")


def parse_aggregator(text: str) -> tuple[str, tuple[float, ...]]:
    """`fedavg`, `median`, `trimmed_mean:BETA` (fraction cut at each end), `krum:F` or `multikrum:F:M`
    (F = Byzantine clients tolerated, M = updates averaged)."""
    name, *params = text.split(":")
    try:
        values = tuple(float(p) for p in params)
    except ValueError:
        values = (-1.0,)
    ok = {"fedavg": lambda v: not v, "median": lambda v: not v,
          "trimmed_mean": lambda v: len(v) == 1 and 0 <= v[0] < 0.5,
          "krum": lambda v: len(v) == 1 and v[0] >= 0 and v[0] == int(v[0]),
          "multikrum": lambda v: len(v) == 2 and all(x >= 0 and x == int(x) for x in v) and v[1] >= 1}
    if name not in ok or not ok[name](values):
        raise ValueError(f"unknown aggregator {text!r}; use fedavg, median, trimmed_mean:BETA (0 <= BETA < 0.5), "
                         "krum:F or multikrum:F:M")
    return name, values


class RobustAggregator:
    """Byzantine-robust rules, which need every update of the round at once: coordinate-wise median,
    trimmed mean (Yin et al., 2018), Krum and multi-Krum (Blanchard et al., 2017). Updates are spilled to
    a `numpy.memmap` on disk, one float32 row per client, so the server holds one model in RAM whatever
    the number of clients. Sample counts do not weight these rules: a weight is what a liar would inflate.

    Same interface as FedAvg: add (check, then fold), apply, reset, empty_sums, install."""

    COLUMNS = 1 << 20  # columns processed at a time: bounds the memory of sorting and distances

    def __init__(self, specs: list[TensorSpec], rule: str, params: tuple[float, ...], capacity: int,
                 optimizer: ServerOptimizer | None = None):
        self.specs, self.rule, self.params, self.capacity = specs, rule, params, capacity
        self.optimizer = optimizer or ServerOptimizer("fedavg", 1.0)
        self.offsets, total = [], 0
        for spec in specs:
            self.offsets.append(total)
            total += spec.numel
        self.total = total
        self._rows: np.memmap | None = None
        self.count = 0
        self.total_weight = 0

    def empty_sums(self, recycle: Mapping[str, torch.Tensor] | None = None) -> np.memmap:
        if self._rows is None:
            # An anonymous temporary file: deleted when closed, never left behind by a crash.
            self._file = tempfile.TemporaryFile(prefix="fl-updates-")
            self._rows = np.memmap(self._file, dtype=np.float32, mode="w+", shape=(max(self.capacity, 1), max(self.total, 1)))
        return self._rows

    def install(self, rows: np.memmap) -> None:
        self._rows = rows

    def reset(self) -> None:
        self.count = 0
        self.total_weight = 0

    def add(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        self.check(diff, weight)
        self.fold(diff, weight)

    def check(self, diff: Mapping[str, torch.Tensor], weight: int, largest: float | None = None) -> None:
        largest = check_update(diff, self.specs, largest)
        if weight <= 0:
            raise UpdateRejected(f"update weight (num_samples) must be positive, got {weight}")
        if largest > MAX_WEIGHTED_MAGNITUDE:
            raise UpdateRejected(f"update values up to {largest:.3g} would overflow the aggregate")
        if self.count >= self.capacity:
            raise UpdateRejected(f"this round already holds {self.capacity} updates")

    def fold(self, diff: Mapping[str, torch.Tensor], weight: int) -> None:
        rows = self.empty_sums()
        row = rows[self.count]
        for spec, offset in zip(self.specs, self.offsets):
            row[offset:offset + spec.numel] = diff[spec.name].reshape(-1).to(torch.float32).numpy()
        self.count += 1
        self.total_weight += weight

    def _aggregate(self) -> np.ndarray:
        rows, n = self._rows, self.count
        if self.rule in ("krum", "multikrum"):
            f = int(self.params[0])
            gram = np.zeros((n, n))
            for start in range(0, self.total, self.COLUMNS):
                block = np.asarray(rows[:n, start:start + self.COLUMNS], dtype=np.float64)
                gram += block @ block.T
            norms = np.diag(gram)
            distances = np.maximum(norms[:, None] + norms[None, :] - 2 * gram, 0)
            neighbours = max(n - f - 2, 1)
            scores = [np.sort(np.delete(distances[i], i))[:neighbours].sum() for i in range(n)]
            keep = 1 if self.rule == "krum" else min(int(self.params[1]), n)
            chosen = np.argsort(scores)[:keep]
            return np.asarray(rows[np.sort(chosen)], dtype=np.float64).mean(axis=0).astype(np.float32)
        out = np.empty(self.total, dtype=np.float32)
        cut = int(self.params[0] * n) if self.rule == "trimmed_mean" else 0
        for start in range(0, self.total, self.COLUMNS):
            block = np.asarray(rows[:n, start:start + self.COLUMNS])
            if self.rule == "median":
                out[start:start + block.shape[1]] = np.median(block, axis=0)
            else:
                ordered = np.sort(block, axis=0)
                out[start:start + block.shape[1]] = ordered[cut:n - cut].mean(axis=0)
        return out

    def apply(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        aggregate = torch.from_numpy(self._aggregate())
        new_state = {}
        for spec, offset in zip(self.specs, self.offsets):
            current = global_state[spec.name]
            step = aggregate[offset:offset + spec.numel].reshape(spec.shape).clone()
            if current.is_floating_point():
                new_state[spec.name] = self.optimizer.step(spec.name, step).add_(current).to(current.dtype)
            else:
                new_state[spec.name] = step.double().add_(current).round_().to(current.dtype)
        self.reset()
        return new_state


def make_aggregator(specs: list[TensorSpec], text: str, capacity: int, optimizer: ServerOptimizer | None = None,
                    dp_noise_multiplier: float = 0.0, dp_clip: float = 1.0) -> FedAvg | RobustAggregator:
    """The aggregator for the config's `aggregator`; with `dp_noise_multiplier` > 0, DP-FedAvg, which
    only fedavg supports. `capacity`: the most updates a round folds (clients per round)."""
    rule, params = parse_aggregator(text)
    if dp_noise_multiplier > 0:
        if rule != "fedavg":
            raise ValueError(f"differential privacy needs the fedavg aggregator, not {text!r}: the robust rules' "
                             "outputs have no bounded sensitivity to add noise to")
        from fl_server.privacy import DPFedAvg  # noqa: PLC0415 - privacy builds on this module

        return DPFedAvg(specs, dp_noise_multiplier, dp_clip, capacity, optimizer)
    if rule == "fedavg":
        return FedAvg(specs, optimizer=optimizer)
    return RobustAggregator(specs, rule, params, capacity, optimizer)
