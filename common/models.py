"""The models a federation can train, built by name from a `ModelSpec` on both sides.

The server and every client must build exactly the same architecture, since only weights travel;
`build_model` is the one place that maps a spec to a module.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from common.logs import brief
from common.messages import ModelSpec


class MLP(nn.Module):
    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 200):
        super().__init__()
        # Two hidden layers of 200, as the FedAvg paper's "2NN" (McMahan et al., 2017).
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """The FedAvg paper's CNN: two 5x5 conv layers (32, 64 channels) each followed by 2x2 max-pooling,
    a 512-unit dense layer and the classifier. Padding 2 keeps it usable on 8x8 digits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18 (He et al., 2016): a 3x3 stem and no max-pool, since 32x32 inputs would
    lose most of their resolution to ImageNet's 7x7 stride-2 stem."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(input_shape[0], 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._layer(64, 2, 1)
        self.layer2 = self._layer(128, 2, 2)
        self.layer3 = self._layer(256, 2, 2)
        self.layer4 = self._layer(512, 2, 2)
        self.linear = nn.Linear(512, num_classes)

    def _layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class StackedAutoencoder(nn.Module):
    """The seed's federated stacked autoencoder: an encoder stack down to a small code and a mirrored
    decoder stack back to the input, trained to reconstruct its input (MSE). `num_classes` is unused:
    labels play no part. The reconstruction error of a sample is its anomaly score (common.anomaly)."""

    reconstructs = True  # trained and evaluated on reconstruction (common.training), not on labels

    def __init__(self, input_shape: tuple[int, ...], num_classes: int = 0, hidden: tuple[int, ...] = (128, 32),
                 code: int = 8):
        super().__init__()
        self.input_shape = tuple(input_shape)
        sizes = [math.prod(input_shape), *hidden, code]
        encoder: list[nn.Module] = [nn.Flatten()]
        decoder: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            encoder += [nn.Linear(a, b), nn.ReLU()]
        for a, b in zip(sizes[::-1], sizes[-2::-1]):
            decoder += [nn.Linear(a, b), nn.ReLU()]
        self.encoder = nn.Sequential(*encoder[:-1])  # the code is linear
        self.decoder = nn.Sequential(*decoder[:-1])  # so is the reconstruction

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        return self.decoder(code).reshape(-1, *self.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class ThreeChannels(nn.Module):
    """Feeds images of any channel count to a torchvision classifier, which expects 3: grey images are
    repeated, other counts mixed by a learned 1x1 convolution."""

    def __init__(self, channels: int, model: nn.Module):
        super().__init__()
        self.mix = nn.Conv2d(channels, 3, kernel_size=1) if channels not in (1, 3) else None
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.mix is not None:
            x = self.mix(x)
        return self.model(x)


MODELS = {"mlp": MLP, "cnn": CNN, "resnet18": ResNet18, "autoencoder": StackedAutoencoder}
TORCHVISION = "torchvision:"  # prefix of torchvision's classifiers by name, e.g. torchvision:mobilenet_v3_small
CUSTOM_MODEL = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")  # package.module:ClassName


def torchvision_classifiers() -> list[str]:
    import torchvision  # noqa: PLC0415 - only for these models

    return torchvision.models.list_models(module=torchvision.models)


def is_custom(name: str) -> bool:
    return not name.startswith(TORCHVISION) and CUSTOM_MODEL.match(name) is not None


def check_model_name(name: str) -> None:
    """ValueError unless `name` is a model build_model can make (custom classes are imported later)."""
    if name in MODELS or is_custom(name):
        return
    if name.startswith(TORCHVISION):
        if name[len(TORCHVISION):] not in torchvision_classifiers():
            raise ValueError(f"torchvision has no classifier {name[len(TORCHVISION):]!r}; see "
                             "torchvision.models.list_models(module=torchvision.models)")
        return
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, torchvision:NAME (a "
                     "torchvision classifier) or package.module:ClassName (your own nn.Module)")


def _make(spec: ModelSpec) -> nn.Module:
    if spec.name in MODELS:
        # num_classes 0 is a regression: one output per sample (common.training uses MSE for float targets).
        return MODELS[spec.name](spec.input_shape, spec.num_classes or (0 if spec.name == "autoencoder" else 1))
    if spec.name.startswith(TORCHVISION):
        import torchvision  # noqa: PLC0415

        if len(spec.input_shape) != 3:
            raise ValueError(f"torchvision models need image inputs (channels, height, width), got {spec.input_shape}")
        model = torchvision.models.get_model(spec.name[len(TORCHVISION):], weights=None, num_classes=spec.num_classes)
        return ThreeChannels(spec.input_shape[0], model)
    cls = import_object(spec.name, "model")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"model {spec.name!r} is not an nn.Module class; name your model's class, which "
                         "subclasses torch.nn.Module")
    try:
        model = cls(*_constructor_arguments(cls, spec))
    except Exception as e:  # noqa: BLE001 - the user's code: whatever it raises is one sentence
        raise ValueError(f"model {spec.name!r} failed to build as {spec.name.split(':')[1]}"
                         f"(input_shape={spec.input_shape}, num_classes={spec.num_classes}) "
                         f"({type(e).__name__}: {brief(e)}); fix the class or the input_shape and num_classes "
                         "it is given") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec.name!r} built something that is not an nn.Module")
    return model


def _constructor_arguments(cls: type, spec: ModelSpec) -> tuple:
    """How a user's class is built: `ClassName(input_shape, num_classes)` when its constructor takes those
    two (by any names); `ClassName()` when it needs no argument, as a model written for one task usually
    does (`Net()`, or `Net(num_classes=10)` with a default), whose own defaults then hold."""
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):  # no signature to read: the documented contract
        return spec.input_shape, spec.num_classes
    required = [p for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                                               p.POSITIONAL_OR_KEYWORD)]
    return () if not required else (spec.input_shape, spec.num_classes)


def import_object(name: str, what: str, program: str = "this program") -> object:
    """The object `package.module:attribute` names; ValueError, in one sentence saying where the module
    must be, if it cannot be imported. Whatever the module raises while it is imported counts: it is the
    user's code."""
    module_name, attribute = name.split(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, or whatever the module's code raises
        raise ValueError(f"cannot import {what} {name!r} ({type(e).__name__}: {brief(e)}); the module must be "
                         f"importable by {program}: in the folder it runs in, on its PYTHONPATH, or installed "
                         "in its Python environment") from None


def build_model(spec: ModelSpec, seed: int | None = None) -> nn.Module:
    """The architecture named by `spec`; with a seed, the same initial weights on every machine.

    Names: mlp, cnn, resnet18, autoencoder; `torchvision:NAME` for any torchvision classifier (random
    weights: nothing is downloaded); `package.module:ClassName` for your own nn.Module, constructed as
    `ClassName(input_shape, num_classes)`, or as `ClassName()` when its constructor needs no argument."""
    check_model_name(spec.name)
    if spec.name in ("cnn", "resnet18") and len(spec.input_shape) != 3:
        raise ValueError(f"model {spec.name!r} needs image inputs (channels, height, width), "
                         f"got shape {spec.input_shape}")
    if seed is None:
        return _make(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _make(spec)
