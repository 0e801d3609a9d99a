"""An operator's own server-side evaluation, as `fl-server --server-evaluation
tests.models.evaluation:digits_test` names it: function(model, device) -> {metric: value}."""
import torch
from torch.nn import functional as F

from common.datasets import load_digits


def digits_test(model, device):
    """Accuracy and loss on the digits' held-out split, and the mean confidence of the predictions."""
    _, test = load_digits()
    logits = model(test.x.to(device))
    probabilities = F.softmax(logits, dim=1)
    return {"accuracy": float((logits.argmax(1) == test.y.to(device)).float().mean()),
            "loss": float(F.cross_entropy(logits, test.y.to(device))),
            "confidence": float(probabilities.max(1).values.mean())}


def weight_norm(model, device):
    """No accuracy nor loss: what a regression or unsupervised task might measure instead."""
    return {"weight_norm": float(torch.sqrt(sum(p.square().sum() for p in model.parameters())))}


def fails(model, device):
    raise RuntimeError("the validation bucket is unreachable")


def not_metrics(model, device):
    return 0.5


def one_parameter(model):
    return {}
