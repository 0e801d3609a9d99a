"""The seed's unsupervised task: use a federated stacked autoencoder on new data.

As Python functions (`model` is a trained `common.models.StackedAutoencoder`, e.g. the federation's
final_model.pt loaded into `build_model(ModelSpec("autoencoder", input_shape, 0))`):

    encode(model, x)          -> the codes of the samples in x
    decode(model, codes)      -> the samples those codes decode to
    anomaly_scores(model, x)  -> each sample's mean squared reconstruction error: high = unlike the
                                 data the federation trained on
    roc_auc(scores, labels)   -> how well scores separate anomalies (labels True) from normal samples

As a command:

    fl-anomaly score --model runs/latest/final_model.pt [--dataset digits | --data SHARD] [--out scores.csv]
    fl-anomaly example [--holdout 9] [--rounds 30]

`example` trains the autoencoder federated (10 clients, in one process through the server's own round
state, fl_tools.simulation) on digits none of which is a `--holdout`, then scores the test digits and
prints the ROC AUC with which the held-out digit stands out as anomalous.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from common import logs
from common.datasets import ArrayData, DataError, load_dataset, load_digits
from common.messages import ModelSpec
from common.models import build_model
from common.partition import read_shard

BATCH = 1024


@torch.no_grad()
def encode(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode(x[i:i + BATCH]) for i in range(0, len(x), BATCH)])


@torch.no_grad()
def decode(model: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model.decode(codes[i:i + BATCH]) for i in range(0, len(codes), BATCH)])


@torch.no_grad()
def anomaly_scores(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean squared error between it and its reconstruction."""
    model.eval()
    return torch.cat([((model(b) - b) ** 2).flatten(1).mean(dim=1) for b in x.split(BATCH)])


def roc_auc(scores: torch.Tensor, is_anomaly: torch.Tensor) -> float:
    """The probability that a random anomaly scores above a random normal sample (ties count half):
    the area under the ROC curve, computed from ranks (Mann-Whitney U)."""
    is_anomaly = is_anomaly.bool()
    positives, negatives = int(is_anomaly.sum()), int((~is_anomaly).sum())
    if not positives or not negatives:
        raise ValueError("the ROC AUC needs both anomalies and normal samples")
    order = scores.double().argsort()
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Tied scores share the mean of their ranks.
    values, inverse = torch.unique(scores.double(), return_inverse=True)
    mean_rank = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, ranks)
    mean_rank /= torch.bincount(inverse, minlength=len(values)).double()
    ranks = mean_rank[inverse]
    u = float(ranks[is_anomaly].sum()) - positives * (positives + 1) / 2
    return u / (positives * negatives)


def without_class(data: ArrayData, label: int) -> ArrayData:
    return data.subset(torch.nonzero(data.y != label).flatten())


def example(holdout: int = 9, rounds: int = 30, clients: int = 10, seed: int = 0) -> tuple[float, float, float]:
    """Federated training on digits without `holdout`; returns (ROC AUC, mean score of normal test digits,
    mean score of the held-out ones)."""
    from fl_tools import simulation  # noqa: PLC0415 - the server's round state: only the example needs it

    train, test = load_digits()
    model = build_model(ModelSpec("autoencoder", train.input_shape, train.num_classes))
    final = {}
    simulation.run(without_class(train, holdout), test, model="autoencoder", clients=clients, rounds=rounds,
                   local_epochs=5, seed=seed, optimizer="adam", lr=1e-3, on_final=final.update)
    model.load_state_dict(final)
    scores = anomaly_scores(model, test.x)
    anomalous = test.y == holdout
    return roc_auc(scores, anomalous), float(scores[~anomalous].mean()), float(scores[anomalous].mean())


def _load(path: Path, data: ArrayData) -> nn.Module:
    model = build_model(ModelSpec("autoencoder", data.input_shape, data.num_classes))
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except (OSError, RuntimeError, KeyError) as e:
        reason = logs.brief(e)
        raise DataError(f"cannot load an autoencoder for {data.input_shape} inputs from {path} ({reason}); "
                        "give the final_model.pt of a federation run with --model-name autoencoder") from None
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fl-anomaly", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score samples with a trained autoencoder")
    score.add_argument("--model", type=Path, required=True, help="final_model.pt of an autoencoder federation")
    score.add_argument("--dataset", default="digits", help="its test split is scored (digits, mnist, cifar10)")
    score.add_argument("--data-root", default="data")
    score.add_argument("--data", help="a shard written by fl-partition, scored instead of --dataset")
    score.add_argument("--out", type=Path, help="CSV of index,label,score (default: a summary only)")
    demo = commands.add_parser("example", help="federated training without one digit, then its ROC AUC")
    demo.add_argument("--holdout", type=int, default=9)
    demo.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "example":
        if not 0 <= args.holdout <= 9:
            return logs.fail("fl-anomaly", "--holdout must be a digit, 0 to 9")
        auc, normal, anomalous = example(args.holdout, args.rounds)
        print(f"autoencoder trained federated by 10 clients for {args.rounds} rounds on digits without {args.holdout}s;"
              f"\nmean reconstruction error on test digits: {normal:.4f} for the others, {anomalous:.4f} for "
              f"{args.holdout}s\nROC AUC of the anomaly score for {args.holdout}s: {auc:.3f}")
        return 0
    try:
        data = read_shard(args.data) if args.data else load_dataset(args.dataset, args.data_root)[1]
        model = _load(args.model, data)
    except DataError as e:
        return logs.fail("fl-anomaly", str(e))
    scores = anomaly_scores(model, data.x)
    if args.out:
        args.out.write_text("index,label,score\n" + "".join(
            f"{i},{int(label)},{float(s):.6g}\n" for i, (label, s) in enumerate(zip(data.y, scores))))
    q = torch.quantile(scores, torch.tensor([0.5, 0.9, 0.99]))
    print(f"{len(scores)} samples scored: median {q[0]:.4f}, 90th percentile {q[1]:.4f}, 99th {q[2]:.4f}, "
          f"max {float(scores.max()):.4f}" + (f"; written to {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
