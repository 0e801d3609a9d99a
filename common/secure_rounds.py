"""What the server and every client of a secure round derive alike from the training config
(config secure_aggregation; the protocol is common/secagg.py, its stages fl_server/secure.py)."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import torch

from common import secagg
from common.messages import TrainConfig
from common.tensors import DTYPES, TensorSpec


def float_specs(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The tensors a secure round averages: the floating-point ones, in the model's order. Integer and
    bool buffers (BatchNorm's counters) keep their global values."""
    return [s for s in specs if DTYPES[s.dtype].is_floating_point]


def masked_length(specs: list[TensorSpec]) -> int:
    """Values in a client's encoded vector before its weight: every floating-point value of the model."""
    return sum(s.numel for s in float_specs(specs))


def default_neighbours(clients_per_round: int) -> int:
    """secagg_neighbours 0: SecAgg+'s sparse graph, each client with about 2 log2(n) + 1 neighbours, so that
    a round costs n log n rather than n squared; every other client in rounds of up to 10 (the server
    resolves it once, from clients_per_round, and sends clients the number)."""
    return min(max(clients_per_round - 1, 1), 2 * math.ceil(math.log2(max(clients_per_round, 2))) + 1)


def default_threshold(clients_per_round: int, neighbours: int) -> int:
    """secagg_threshold 0: a majority of each client's neighbourhood (the server resolves it once, from
    clients_per_round, and sends clients the number). Fewer colluding clients cannot rebuild a secret,
    and a round survives the loss of the rest."""
    degree = min(neighbours or default_neighbours(clients_per_round), clients_per_round - 1)
    return max(2, degree // 2 + 1)


def round_params(cfg: TrainConfig, length: int, round_: int) -> secagg.SecAggParams:
    """The round's parameters; the neighbour graph's seed comes from the config's seed and the round."""
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{round_}".encode()).digest()[:8], "little")
    return secagg.SecAggParams(length=length, threshold=cfg.secagg_threshold, clip=cfg.secagg_clip,
                               scale_bits=cfg.secagg_scale_bits, neighbours=cfg.secagg_neighbours, round_seed=seed)


def flatten_floats(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The floating-point tensors of `state`, in its order, as one float64 vector."""
    parts = [t.detach().reshape(-1).to(torch.float64) for t in state.values() if t.is_floating_point()]
    return torch.cat(parts).numpy() if parts else np.zeros(0)
