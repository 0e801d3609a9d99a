"""The small-model workload's network, an MLP 64-128-10 (one hidden layer of 128 with ReLU), for
`make bench-peers` (bench/peers.py) and bench/small_rounds.py. PyTorch only, so that both this product (as
`model_name = "bench.small_mlp:SmallMLP"`) and the Flower processes in their own virtualenv build it."""
from __future__ import annotations

import math

from torch import nn


class SmallMLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
