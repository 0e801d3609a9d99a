"""A user's own model, as `fl-server --model-name tests.models.tiny:TinyNet` would name it."""
import math

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 32), nn.ReLU(),
                                 nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


def not_a_model(input_shape, num_classes):
    return None


class Regressor(nn.Module):
    """A regression model: one output, whatever num_classes (0 with dataset none)."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 1))

    def forward(self, x):
        return self.net(x)


class Explodes(nn.Module):
    def __init__(self, input_shape, num_classes):
        raise RuntimeError("this model needs a GPU")
