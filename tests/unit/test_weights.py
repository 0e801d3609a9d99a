"""initial_weights: the safetensors reader (written here without the safetensors package, by the format's
description), PyTorch files read with weights_only, and weights fitted to a model or federated as they are."""
import json
import struct

import pytest
import torch

from common.messages import ModelSpec
from common.models import build_model
from fl_server import weights
from fl_server.weights import WeightsError, fit_to_model, read_safetensors, read_weights

NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}


def safetensors_bytes(state, metadata=None, header=None):
    """The format by hand: 8-byte little-endian header length, the JSON header, the tensors' bytes. Bytes
    from numpy's little-endian view (bfloat16 through int16: numpy has no bfloat16)."""
    data, entries, offset = b"", {}, 0
    for name, tensor in state.items():
        t = tensor.contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        entries[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    if metadata is not None:
        entries = {"__metadata__": metadata, **entries}
    text = json.dumps(entries if header is None else header).encode()
    return struct.pack("<Q", len(text)) + text + data


def write(tmp_path, content, name="w.safetensors"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


STATE = {
    "f64": torch.tensor([1.5, -2.25], dtype=torch.float64),
    "f32": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 7,
    "f16": torch.tensor([0.5, -65504.0], dtype=torch.float16),
    "bf16": torch.tensor([[1.0, -3.140625], [2.0**100, 0.0]], dtype=torch.bfloat16),
    "i64": torch.tensor([2**40 + 1, -5]),
    "i32": torch.tensor([7], dtype=torch.int32),
    "i16": torch.tensor([-300], dtype=torch.int16),
    "i8": torch.tensor([-128, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.0),
    "empty": torch.zeros(0, 4),
}


def test_safetensors_round_trip_of_every_dtype(tmp_path):
    path = write(tmp_path, safetensors_bytes(STATE, metadata={"format": "pt"}))
    got = read_safetensors(path)
    assert list(got) == list(STATE)
    for name, tensor in STATE.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name
    assert read_weights(path).keys() == STATE.keys()


def test_a_non_contiguous_tensor_is_written_and_read_as_its_values(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    got = read_weights(write(tmp_path, safetensors_bytes({"t": t})))
    assert torch.equal(got["t"], t) and got["t"].is_contiguous()


GOOD = safetensors_bytes({"w": torch.ones(2, 2)})
HEADER = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


@pytest.mark.parametrize("content, message", [
    (b"", "fewer than the 8"),
    (b"\x05\x00\x00", "fewer than the 8"),
    (struct.pack("<Q", 1000) + b"{}", "runs past the end of the file"),
    (struct.pack("<Q", 2**62), "more than the format allows"),
    (GOOD[:-1], "truncated"),
    (GOOD[:8 + len(json.dumps(HEADER)) + 3], "truncated"),
    (struct.pack("<Q", 5) + b"{nope", "header is not JSON"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
    (safetensors_bytes({}, header={"w": [1, 2]}), "tensor 'w' is not described by a JSON object"),
    (safetensors_bytes({}, header={"w": {**HEADER["w"], "dtype": "F8_E4M3"}}) + bytes(16), "dtype 'F8_E4M3'"),
    (safetensors_bytes({}, header={"w": {**HEADER["w"], "shape": [2, -2]}}) + bytes(16), "shape [2, -2]"),
    (safetensors_bytes({}, header={"w": {**HEADER["w"], "shape": [2, True]}}) + bytes(16), "shape"),
    (safetensors_bytes({}, header={"w": {**HEADER["w"], "data_offsets": [16, 0]}}) + bytes(16), "data_offsets"),
    (safetensors_bytes({}, header={"w": {**HEADER["w"], "data_offsets": [0]}}) + bytes(16), "data_offsets"),
    (safetensors_bytes({}, header={"w": {**HEADER["w"], "data_offsets": [0, 12]}}) + bytes(16), "needs 16"),
    (safetensors_bytes({}, header={"w": HEADER["w"], "v": {**HEADER["w"], "data_offsets": [16, 32]}}) + bytes(16),
     "tensor 'v' ends at byte 32 of the data, which has 16"),
    (safetensors_bytes({}, header={"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}) + b"\x01\x07",
     "bytes other than 0 and 1"),
])
def test_a_malformed_safetensors_file_is_one_sentence(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(WeightsError, match="not a valid safetensors file") as error:
        read_weights(path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_key_twice_in_the_header_is_refused(tmp_path):
    text = b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [0, 4]}}'
    with pytest.raises(WeightsError, match="'w' appears twice"):
        read_safetensors(write(tmp_path, struct.pack("<Q", len(text)) + text + bytes(4)))


def test_a_missing_file(tmp_path):
    for name in ("nothing.safetensors", "nothing.pt"):
        with pytest.raises(WeightsError, match="cannot read initial_weights .*No such file"):
            read_weights(tmp_path / name)


# --- PyTorch files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [lambda s: s, lambda s: {"state_dict": s, "epoch": 3},
                                  lambda s: {"model": s, "optimizer": {"lr": 0.1}}])
def test_a_state_dict_or_a_checkpoint_holding_one(tmp_path, wrap):
    state = {"w": torch.arange(6.0).reshape(2, 3).t(), "n": torch.tensor(4), "h": torch.ones(2, dtype=torch.bfloat16)}
    torch.save(wrap(state), tmp_path / "w.pt")
    got = read_weights(tmp_path / "w.pt")
    assert list(got) == ["w", "n", "h"] and all(t.is_contiguous() for t in got.values())
    assert all(torch.equal(got[k], state[k]) for k in state)


@pytest.mark.parametrize("obj, message", [
    ({"w": torch.ones(2, dtype=torch.complex64)}, "tensor 'w' is torch.complex64, which the federation cannot carry"),
    ({"w": torch.ones(2), "step": 3}, "holds a dict, not a state_dict"),
    ({"model": {"w": torch.ones(1), "step": 3}}, "'step' is a int, not a tensor"),
    ([torch.ones(1)], "holds a list, not a state_dict"),
    ({}, "holds a dict, not a state_dict"),
    ({"model": {}}, "holds no tensors"),
    ({"model": {1: torch.ones(1)}}, "a tensor named '1'"),
])
def test_what_is_not_a_usable_state_dict(tmp_path, obj, message):
    torch.save(obj, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="initial_weights") as error:
        read_weights(tmp_path / "w.pt")
    assert message in str(error.value)


def test_a_pickled_module_or_garbage_is_refused_without_running_anything(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    for name in ("module.pt", "garbage.pt"):
        with pytest.raises(WeightsError, match=r"torch.load\(weights_only=True\)") as error:
            read_weights(tmp_path / name)
        assert "\n" not in str(error.value)


# --- fitting a model ----------------------------------------------------------------------------------

SPEC = ModelSpec("mlp", (1, 8, 8), 10)


def test_weights_that_fit_the_model_become_its_state(tmp_path):
    source = build_model(SPEC, seed=5).state_dict()
    half = {k: v.half() for k, v in source.items()}  # cast to the model's dtypes on loading
    path = write(tmp_path, safetensors_bytes(half))
    model = build_model(SPEC, seed=0)
    state = fit_to_model(path, read_weights(path), model, "mlp")
    assert list(state) == list(source)
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], half[k].float()) for k in state)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("net.1.bias"), "the model has tensor 'net.1.bias', which the file lacks"),
    (lambda s: s.__setitem__("net.5.weight", torch.zeros(3, 200)),
     "tensor 'net.5.weight' is [3, 200] in the file but [10, 200] in the model"),
    (lambda s: s.__setitem__("extra", torch.zeros(1)), "the file has tensor 'extra', which the model lacks"),
])
def test_weights_that_do_not_fit_name_the_first_difference(tmp_path, change, message):
    state = build_model(SPEC).state_dict()
    change(state)
    with pytest.raises(WeightsError, match="do not fit model 'mlp'") as error:
        fit_to_model(tmp_path / "w.pt", state, build_model(SPEC), "mlp")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_limits_of_the_wire_format(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "MAX_TENSORS", 2)
    torch.save({"a": torch.ones(1), "b": torch.ones(1), "c": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="3 tensors, more than the 2"):
        read_weights(tmp_path / "w.pt")
    torch.save({"x" * 1001: torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="names must be strings of 1 to 1000 characters"):
        read_weights(tmp_path / "w.pt")
