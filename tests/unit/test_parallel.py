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


@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_split_each_batch_and_gather_and_augment_only_their_own_samples(shuffle: bool) -> None:
    train_data, _ = load_digits()
    data = train_data.subset(torch.arange(67))  # batches of 32, 32 and 3; the 3 cannot split among 4
    whole = list(BatchLoader(data, 32, shuffle=shuffle, seed=5))
    augmented: list[int] = []

    def augment(x: torch.Tensor) -> torch.Tensor:
        augmented.append(len(x))
        return x + 1

    shards = [list(BatchLoader(data, 32, shuffle=shuffle, seed=5, augment=augment, shard=(rank, 4)))
              for rank in range(4)]
    assert [len(batches) for batches in shards] == [2, 2, 2, 2]
    assert len(BatchLoader(data, 32, shard=(0, 4))) == 2 and len(BatchLoader(data, 32, shard=(0, 3))) == 3
    assert augmented == [8] * 8  # each rank augments its 8 samples of each batch, never the whole batch
    for number, (x, y) in enumerate(whole[:2]):
        assert torch.equal(torch.cat([shards[rank][number][1] for rank in range(4)]),
                           torch.cat([y[rank::4] for rank in range(4)]))
        for rank in range(4):
            assert torch.equal(shards[rank][number][0], x[rank::4] + 1)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(data, 32, shard=(4, 4))


def test_one_device_is_not_data_parallel():
    train_data, _ = load_digits()
    spec = model_spec_for("mlp", train_data)
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=1, seed=0, local_epochs=1, batch_size=32,
                      lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    with pytest.raises(ValueError, match="at least 2"):
        train_data_parallel(build_model(spec).state_dict(), train_data, cfg, ["cpu"], seed=0)
