"""Weights to start from: the federation's MLP pretrained on the digits 0 to 4 only, saved as a plain
state_dict (pretrained.pt). Real users bring weights trained elsewhere (a .pt state_dict, or a
.safetensors file).

    python pretrain.py --out pretrained.pt
"""
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

from common.datasets import load_digits, model_spec_for
from common.models import build_model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="pretrained.pt")
    args = parser.parse_args()
    torch.manual_seed(0)
    train, test = load_digits()
    seen = train.y < 5
    model = build_model(model_spec_for("mlp", train))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        for x, y in DataLoader(TensorDataset(train.x[seen], train.y[seen]), batch_size=32, shuffle=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}: accuracy {accuracy:.3f} on all ten digits (it has seen five)")


if __name__ == "__main__":
    main()
