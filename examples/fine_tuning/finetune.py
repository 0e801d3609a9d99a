"""Federated fine-tuning, the client's side: an app for `fl-client --app finetune:FineTune`.

The pretrained feature layers stay frozen; only the classifier head learns, from this owner's data
(`fl-client --data DIR`, read as the built-in training reads it). A class app is made once, so the
model and the data stay loaded across rounds.
"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fl_client
from common.local_data import load_client_data
from common.models import build_model

HEAD = "net.5."  # the federation's MLP: its last Linear layer


class FineTune:
    def __init__(self):
        self.model = None
        self.loader = None

    def train(self, task: fl_client.Task) -> fl_client.Result:
        if self.model is None:  # the first round: the federation's model, and this owner's data
            self.model = build_model(task.config.model)
            data = load_client_data(task.data_dir, task.config)
            self.loader = DataLoader(TensorDataset(data.x, data.y), batch_size=task.config.batch_size, shuffle=True)
        self.model.load_state_dict(task.global_state)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad = name.startswith(HEAD)
        head = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(head, lr=task.config.lr, momentum=task.config.momentum)
        self.model.train()
        total, count = 0.0, 0
        for _ in range(task.config.local_epochs):
            for x, y in self.loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(self.model(x), y)
                loss.backward()
                optimizer.step()
                total, count = total + loss.item() * len(y), count + len(y)
        # Only the head moved: the update's other tensors are zero, and compress to almost nothing.
        return fl_client.Result(self.model, num_samples=len(self.loader.dataset),
                                metrics={"train_loss": total / count})
