"""A small model for per-round overhead measurements: 64-128-10, one hidden layer (bench/small_rounds.py)."""
from __future__ import annotations

import math

import torch
from torch import nn


class SmallMLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 128), nn.ReLU(),
                                 nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
