"""Data-parallel local training (DDP), on the CPU with gloo and 2 processes: the same path a client with
several GPUs takes with NCCL."""
import pytest
import torch

from common.datasets import BatchLoader, load_digits, model_spec_for
from common.messages import TrainConfig
from common.models import build_model
from common.parallel import train_data_parallel
from common.training import train


def test_two_processes_take_the_steps_one_process_takes_on_the_whole_batch():
    torch.set_num_threads(1)
    train_data, _ = load_digits()
    data = train_data.subset(torch.arange(1024))  # whole batches: every step splits evenly
    spec = model_spec_for("mlp", data)
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=1, seed=0, local_epochs=2, batch_size=32,
                      lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    start = build_model(spec, seed=0).state_dict()

    parallel, result = train_data_parallel(start, data, cfg, ["cpu", "cpu"], seed=7)

    single = build_model(spec)
    single.load_state_dict(start)
    torch.manual_seed(7)
    reference = train(single, BatchLoader(data, 32, shuffle=True, seed=7), cfg, torch.device("cpu"))
    assert result.num_samples == reference.num_samples == 1024
    assert result.loss == pytest.approx(reference.loss, rel=1e-4)
    moved = False
    for name, tensor in single.state_dict().items():
        assert torch.allclose(parallel[name], tensor, atol=1e-5), name
        moved |= not torch.equal(tensor, start[name])
    assert moved


def test_one_device_is_not_data_parallel():
    train_data, _ = load_digits()
    spec = model_spec_for("mlp", train_data)
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=1, seed=0, local_epochs=1, batch_size=32,
                      lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    with pytest.raises(ValueError, match="at least 2"):
        train_data_parallel(build_model(spec).state_dict(), train_data, cfg, ["cpu"], seed=0)
