import math

import pytest
import torch

from common.datasets import ArrayData, BatchLoader, keeps_data_on_gpu, load_digits, model_spec_for
from common.messages import ModelSpec, TrainConfig
from common.models import build_model
from common.training import RoundSGD, check_autocast, evaluate, seed_torch, select_device, train


@pytest.mark.parametrize("name, shape, params", [
    ("mlp", (1, 8, 8), 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10),
    ("cnn", (1, 28, 28), 32 * 25 + 32 + 64 * 32 * 25 + 64 + 64 * 7 * 7 * 512 + 512 + 5120 + 10),
    ("resnet18", (3, 32, 32), 11_173_962),
])
def test_forward_pass_and_parameter_count(name, shape, params):
    model = build_model(ModelSpec(name, shape, 10), seed=0)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model(torch.zeros(2, *shape)).shape == (2, 10)


def test_same_seed_same_initial_weights():
    a = build_model(ModelSpec("cnn", (1, 8, 8), 10), seed=5).state_dict()
    b = build_model(ModelSpec("cnn", (1, 8, 8), 10), seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resnet18_has_integer_batchnorm_counters():
    state = build_model(ModelSpec("resnet18", (3, 32, 32), 10)).state_dict()
    assert state["bn1.num_batches_tracked"].dtype == torch.int64


def test_local_training_learns_digits():
    train_data, test_data = load_digits()
    model = build_model(model_spec_for("mlp", train_data), seed=0)
    cfg = TrainConfig(model=model_spec_for("mlp", train_data), dataset="digits", num_clients=1, seed=0,
                      local_epochs=3, batch_size=32, lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")
    device = torch.device("cpu")
    before = evaluate(model, BatchLoader(test_data, 256), device)
    result = train(model, BatchLoader(train_data, 32, shuffle=True), cfg, device)
    after = evaluate(model, BatchLoader(test_data, 256), device)
    assert result.num_samples == len(train_data)
    assert before.accuracy < 0.3 and after.accuracy > 0.9 and after.loss < before.loss


def test_bf16_autocast_computes_in_bfloat16_and_keeps_float32_weights():
    train_data, test_data = load_digits()
    spec = model_spec_for("cnn", train_data)
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=1, seed=0, local_epochs=2, batch_size=32, lr=0.05,
                      momentum=0.9, weight_decay=0.0, optimizer="sgd")
    device = torch.device("cpu")
    check_autocast(torch.bfloat16, device)  # the CPU computes bfloat16 (slowly without AMX): no error
    outputs = {}

    def trained(autocast):
        model = build_model(spec, seed=0)
        model.features[0].register_forward_hook(lambda module, args, out: outputs.__setitem__(autocast, out.dtype))
        train(model, BatchLoader(train_data, 32, shuffle=True, seed=0), cfg, device, autocast=autocast)
        return model

    mixed, full = trained(torch.bfloat16), trained(None)
    assert outputs == {torch.bfloat16: torch.bfloat16, None: torch.float32}  # the first convolution's output
    assert all(t.dtype == torch.float32 for t in mixed.state_dict().values() if t.is_floating_point())
    assert not torch.equal(mixed.features[0].weight, full.features[0].weight)  # the lower precision took other steps
    mixed_accuracy, full_accuracy = (evaluate(model, BatchLoader(test_data, 256), device).accuracy
                                     for model in (mixed, full))
    assert mixed_accuracy > 0.7 and mixed_accuracy >= full_accuracy - 0.05  # 0.84 each after these 2 epochs


def test_a_shard_stays_on_the_gpu_only_when_it_leaves_room_for_training():
    assert keeps_data_on_gpu(4 << 30, 10 << 30)
    assert not keeps_data_on_gpu(6 << 30, 10 << 30)  # pinned host memory and non-blocking copies instead
    assert BatchLoader(load_digits()[0], 32).pinned is False  # never on the CPU


def test_batch_loader_covers_every_sample_once_per_epoch():
    train_data, _ = load_digits()
    loader = BatchLoader(train_data, 100, shuffle=True, seed=1)
    ys = torch.cat([y for _, y in loader])
    assert len(loader) == 15 and torch.equal(ys.sort().values, train_data.y.sort().values)


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda:0")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu-ish")


def _distance_after_training(mu=0.0, clip_norm=0.0):
    from dataclasses import replace

    train_data, _ = load_digits()
    spec = model_spec_for("mlp", train_data)
    model = build_model(spec, seed=0)
    start = [p.detach().clone() for p in model.parameters()]
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=1, seed=0, local_epochs=2, batch_size=32, lr=0.1,
                      momentum=0.0, weight_decay=0.0, optimizer="sgd")
    torch.manual_seed(0)
    train(model, BatchLoader(train_data, 32, shuffle=True, seed=0), replace(cfg, mu=mu, clip_norm=clip_norm),
          torch.device("cpu"))
    with torch.no_grad():
        return float(sum(((p - s) ** 2).sum() for p, s in zip(model.parameters(), start)) ** 0.5)


def test_fedprox_keeps_the_local_model_near_the_global_one():
    assert _distance_after_training(mu=10.0) < 0.6 * _distance_after_training(mu=0.0)


def test_gradient_clipping_limits_each_step():
    # 90 steps of lr 0.1 with gradient norm at most 0.01 cannot move the weights further than 0.09.
    assert _distance_after_training(clip_norm=0.01) <= 0.09 + 1e-6 < _distance_after_training()


def test_autoencoder_stacks_shapes_and_parameter_count():
    model = build_model(ModelSpec("autoencoder", (1, 8, 8), 10), seed=0)
    layers = [(64, 128), (128, 32), (32, 8), (8, 32), (32, 128), (128, 64)]
    assert sum(p.numel() for p in model.parameters()) == sum(a * b + b for a, b in layers)
    x = torch.randn(3, 1, 8, 8)
    assert model.encode(x).shape == (3, 8)
    assert model.decode(model.encode(x)).shape == model(x).shape == (3, 1, 8, 8)


def test_autoencoder_trains_on_reconstruction_and_reports_its_error():
    train_data, test_data = load_digits()
    spec = model_spec_for("autoencoder", train_data)
    model = build_model(spec, seed=0)
    cfg = TrainConfig(model=spec, dataset="digits", num_clients=1, seed=0, local_epochs=5, batch_size=32,
                      lr=1e-3, momentum=0.0, weight_decay=0.0, optimizer="adam")
    device = torch.device("cpu")
    before = evaluate(model, BatchLoader(test_data, 256), device)
    train(model, BatchLoader(train_data, 32, shuffle=True), cfg, device)
    after = evaluate(model, BatchLoader(test_data, 256), device)
    assert after.loss < 0.5 * before.loss  # mean squared reconstruction error per value
    assert after.accuracy != after.accuracy  # NaN: an autoencoder has no accuracy


@pytest.mark.parametrize("name, shape, params", [
    ("torchvision:mobilenet_v3_small", (3, 32, 32), 1_528_106),
    ("torchvision:resnet18", (1, 28, 28), 11_181_642),  # grey images repeated to 3 channels
    ("torchvision:squeezenet1_0", (2, 64, 64), 740_554 + 3 * 2 + 3),  # 2 channels mixed by a 1x1 conv
    ("tests.models.tiny:TinyNet", (1, 8, 8), 64 * 32 + 32 + 32 * 10 + 10),
])
def test_torchvision_and_custom_models_by_name(name, shape, params):
    model = build_model(ModelSpec(name, shape, 10), seed=0)
    assert sum(p.numel() for p in model.parameters()) == params
    model.eval()
    assert model(torch.zeros(2, *shape)).shape == (2, 10)
    again = build_model(ModelSpec(name, shape, 10), seed=0).state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name, message", [
    ("tests.models.tiny:Missing", "cannot import model"),
    ("no_such_package.models:Net", "cannot import model"),
    ("tests.models.tiny:not_a_model", "not an nn.Module class"),
    ("torchvision:not_a_model", "torchvision has no classifier"),
])
def test_bad_model_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        build_model(ModelSpec(name, (1, 8, 8), 10))


def test_regression_trains_on_float_targets_with_one_output():
    """num_classes 0 is a regression: the built-in models give one output and train on MSE."""
    torch.manual_seed(0)
    x = torch.randn(512, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1
    data = ArrayData(x, y, 0)
    spec = ModelSpec("mlp", (4,), 0)
    model = build_model(spec, seed=0)
    assert model(x[:2]).shape == (2, 1)
    cfg = TrainConfig(model=spec, local_epochs=5, batch_size=32, lr=0.01, momentum=0.9)
    before = evaluate(model, BatchLoader(data, 128), torch.device("cpu"))
    train(model, BatchLoader(data, 32, shuffle=True), cfg, torch.device("cpu"))
    after = evaluate(model, BatchLoader(data, 128), torch.device("cpu"))
    assert math.isnan(after.accuracy) and after.num_samples == 512
    assert after.loss < before.loss / 10


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 0.0), (0.0, 0.0), (0.9, 1e-3), (0.5, 0.1)])
def test_round_sgd_takes_torch_sgds_steps_bit_for_bit(momentum, weight_decay):
    """The built-in training's SGD does torch.optim.SGD's arithmetic: the same weights after several steps,
    a parameter that gets no gradient in some steps included."""
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    extra_a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())
    extra_b = torch.nn.Parameter(extra_a.detach().clone())
    ours = RoundSGD([*a.parameters(), extra_a], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    theirs = torch.optim.SGD([*b.parameters(), extra_b], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for step in range(6):
        x, y = torch.randn(5, 8), torch.randint(0, 3, (5,))
        for model, extra, opt in ((a, extra_a, ours), (b, extra_b, theirs)):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step % 3 == 2:  # the extra parameter only takes part in some steps
                loss = loss + (extra ** 2).sum()
            loss.backward()
            opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert torch.equal(extra_a, extra_b)


def test_seed_torch_seeds_as_torch_manual_seed():
    seed_torch(123)
    first = torch.rand(5)
    torch.manual_seed(123)
    assert torch.equal(first, torch.rand(5))


def test_on_device_moves_a_model_only_when_it_is_elsewhere():
    from common.training import on_device

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    assert on_device(model, torch.device("cpu")) is model
    assert on_device(model, torch.device("meta")) is model
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
