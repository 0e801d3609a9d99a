"""Train a small CNN on a folder of pictures (DATA/CLASS_NAME/*.png): plain PyTorch, nothing federated.

    python train.py --data data/client0
"""
import argparse

import fl_client
import torch
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

from net import Net


def load_data(folder):
    pictures = datasets.ImageFolder(folder, transform=transforms.Compose([
        transforms.Grayscale(), transforms.Resize((16, 16)), transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,))]))
    train_set, val_set = random_split(pictures, [0.8, 0.2], generator=torch.Generator().manual_seed(0))
    return DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=256)


def train(model, loader, epochs):
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        scheduler.step()


@torch.no_grad()
def evaluate(model, loader):
    """(mean loss, samples, accuracy) on `loader`."""
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for x, y in loader:
        out = model(x)
        loss += nn.functional.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    return loss / count, count, correct / count


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", default="model.pt")
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--id", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_loader, val_loader = load_data(args.data)
    model = Net()
    with fl_client.connect(args.server, args.id, insecure=True) as federation:
        for task in federation.rounds():
            model.load_state_dict(task.global_state)
            task.report_evaluation(*evaluate(model, val_loader))
            train(model, train_loader, args.epochs)
            task.submit(model, num_samples=len(train_loader.dataset))
    loss, count, accuracy = evaluate(model, val_loader)
    print(f"validation: loss {loss:.4f}, accuracy {accuracy:.4f} on {count} pictures")
    torch.save(model.state_dict(), args.out)


if __name__ == "__main__":
    main()
