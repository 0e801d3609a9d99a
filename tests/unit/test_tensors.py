import pytest
import torch
import xxhash

from common import tensors
from common.tensors import CHUNK_SIZE, PayloadError, PayloadReceiver, TensorSpec


def roundtrip(state, chunk_size=CHUNK_SIZE):
    payload = tensors.encode(state)
    return tensors.assemble(payload.specs, payload.chunks(chunk_size), payload.checksum)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool])
def test_roundtrip_keeps_every_bit(dtype):
    source = torch.randn(7, 5) * 100
    tensor = source > 0 if dtype is torch.bool else source.to(dtype)
    back = roundtrip({"w": tensor})["w"]
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)


def test_roundtrip_empty_and_scalar_tensors():
    state = {"empty": torch.empty(0, 3), "scalar": torch.tensor(3.5), "count": torch.tensor(7, dtype=torch.int64),
             "after": torch.arange(4, dtype=torch.float32)}
    back = roundtrip(state)
    assert list(back) == list(state)
    assert back["empty"].shape == (0, 3)
    assert back["scalar"].shape == () and back["scalar"].item() == 3.5
    assert back["count"].dtype == torch.int64 and back["count"].item() == 7
    assert torch.equal(back["after"], state["after"])


def test_roundtrip_of_non_contiguous_tensor():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(roundtrip({"t": t})["t"], t)


def test_bytes_are_little_endian_raw_values():
    payload = tensors.encode({"x": torch.tensor([1, 256], dtype=torch.int32)})
    assert payload.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"
    assert payload.checksum == xxhash.xxh3_64_intdigest(payload.data)


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 127, 128, 129])
def test_chunking_at_and_around_boundaries(size):
    chunk = 64
    data = bytes(range(256)) * 1
    data = (data * 2)[:size]
    chunks = list(tensors.split(data, chunk))
    assert b"".join(chunks) == data
    assert all(len(c) == chunk for c in chunks[:-1])
    assert len(chunks) == -(-size // chunk)
    assert all(0 < len(c) <= chunk for c in chunks)


@pytest.mark.parametrize("numel", [CHUNK_SIZE // 4 - 1, CHUNK_SIZE // 4, CHUNK_SIZE // 4 + 1, CHUNK_SIZE // 2])
def test_model_sized_payload_around_the_real_chunk_size(numel):
    state = {"w": torch.randn(numel)}
    payload = tensors.encode(state)
    assert payload.num_chunks() == len(list(payload.chunks())) == -(-numel * 4 // CHUNK_SIZE)
    assert torch.equal(roundtrip(state)["w"], state["w"])


def test_any_chunking_gives_the_same_tensors():
    state = {"a": torch.randn(33), "b": torch.randint(0, 9, (5,)), "c": torch.randn(2, 2).bfloat16()}
    for chunk_size in (1, 3, 7, 1000):
        back = roundtrip(state, chunk_size)
        assert all(torch.equal(back[k], state[k]) for k in state)


def receiver_for(state):
    payload = tensors.encode(state)
    return payload, PayloadReceiver(payload.specs, payload.checksum)


def test_receiver_refuses_more_bytes_than_announced():
    payload, receiver = receiver_for({"w": torch.zeros(4)})
    receiver.add(payload.data)
    with pytest.raises(PayloadError, match="longer"):
        receiver.add(b"\x00")


def test_receiver_refuses_truncated_payload():
    payload, receiver = receiver_for({"w": torch.zeros(4)})
    receiver.add(payload.data[:-1])
    with pytest.raises(PayloadError, match="ended after 15 of the 16"):
        receiver.finish()


def test_receiver_detects_reordered_chunks():
    payload, receiver = receiver_for({"w": torch.arange(8, dtype=torch.float32)})
    chunks = list(payload.chunks(8))
    for chunk in reversed(chunks):
        receiver.add(chunk)
    with pytest.raises(PayloadError, match="checksum"):
        receiver.finish()


def test_receiver_allocates_from_specs_not_from_claims():
    spec = TensorSpec("w", "float32", (2, 3))
    assert PayloadReceiver([spec], 0).total_bytes == 24


def test_unsupported_dtype_is_refused_when_encoding():
    with pytest.raises(TypeError, match="complex64"):
        tensors.encode({"z": torch.zeros(2, dtype=torch.complex64)})


@pytest.mark.parametrize("chunk_size", [1, 5, 12, 13, 24, 25, 1000])
def test_chunks_span_tensor_boundaries_without_losing_bytes(chunk_size):
    state = {"a": torch.arange(3, dtype=torch.int32), "empty": torch.empty(0), "b": torch.arange(3.0),
             "c": torch.tensor(1, dtype=torch.int8)}  # 12 + 0 + 12 + 1 = 25 bytes
    payload = tensors.encode(state)
    chunks = list(payload.chunks(chunk_size))
    assert b"".join(chunks) == payload.data and len(payload.data) == 25
    assert [len(c) for c in chunks[:-1]] == [chunk_size] * (len(chunks) - 1)
    assert len(chunks) == payload.num_chunks(chunk_size)


def test_encoding_does_not_copy_contiguous_cpu_tensors():
    t = torch.zeros(1000)
    payload = tensors.encode({"t": t})
    t[0] = 1.0  # the payload views the tensor's own memory
    assert payload.data[:4] == torch.tensor([1.0]).numpy().tobytes()


def _mixed_state():
    # One-byte flags first, so that chunk boundaries split the float32 and int64 elements; float32
    # tensors around an empty one make one run, the int64 between them ends it, float16 starts another.
    return {"flags": torch.tensor([True, False, True]), "a": torch.tensor([1.0, -7.5, 2.0]), "empty": torch.zeros(0),
            "b": torch.tensor([3.0, 0.5]), "count": torch.arange(5, dtype=torch.int64),
            "c": torch.tensor([-4.0, 6.0]), "d": torch.tensor([1.0, -9.0], dtype=torch.float16),
            "e": torch.tensor([2.0, -3.0], dtype=torch.bfloat16)}


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 1000])
def test_receiver_finds_the_largest_magnitude_of_the_floating_point_values(chunk_size):
    payload = tensors.encode(_mixed_state())
    receiver = PayloadReceiver(payload.specs, payload.checksum, check_values=True)
    for chunk in payload.chunks(chunk_size):
        receiver.add(chunk)
    receiver.finish()
    assert receiver.largest == 9.0  # the int64 counts (up to 4) and flags are not values to scale
    assert PayloadReceiver(payload.specs, payload.checksum).largest is None  # not asked to check


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["a", "b", "c", "d", "e"])
def test_receiver_refuses_the_chunk_that_completes_a_nan_or_inf_and_names_its_tensor(name, bad):
    state = _mixed_state()
    state[name][-1] = bad
    payload = tensors.encode(state)
    bad_end = sum(s.nbytes for s in payload.specs[:list(state).index(name) + 1])  # the last byte of the bad element
    receiver = PayloadReceiver(payload.specs, payload.checksum, check_values=True)
    added = 0
    with pytest.raises(PayloadError, match=f"tensor '{name}' holds NaN or Inf"):
        for chunk in payload.chunks(3):
            receiver.add(chunk)
            added += 1
    assert added == (bad_end - 1) // 3  # refused by the chunk holding its last byte, nothing after read
