import pytest
import torch

from common import codecs, tensors
from common.codecs import CodecError, parse

MODEL = {"conv.weight": torch.randn(8, 3, 3, 3), "bias": torch.randn(8), "bn.num_batches_tracked": torch.tensor(7),
         "half": torch.randn(5).half()}
CODECS = ["none", "float16", "bfloat16", "int8", "topk:0.1", "topk:1"]


@pytest.mark.parametrize("name", CODECS)
def test_wire_tensors_are_exactly_what_the_server_expects(name):
    codec = parse(name)
    wire = codecs.encode(MODEL, codec, {})
    assert tensors.specs_of(wire) == codecs.wire_specs(tensors.specs_of(MODEL), codec)


@pytest.mark.parametrize("name, tolerance", [("none", 0), ("float16", 1e-2), ("bfloat16", 5e-2), ("int8", 0.05),
                                             ("topk:1", 0)])
def test_decode_of_encode_gives_the_diff_back(name, tolerance):
    codec = parse(name)
    back = codecs.decode(codecs.encode(MODEL, codec, {}), tensors.specs_of(MODEL), codec)
    assert tensors.specs_of(back) == tensors.specs_of(MODEL)
    for key, value in MODEL.items():
        assert torch.allclose(back[key].float(), value.float(), atol=tolerance, rtol=0), key
    assert back["bn.num_batches_tracked"].item() == 7  # integers travel untouched


def test_compression_shrinks_the_bytes():
    size = {name: tensors.encode(codecs.encode(MODEL, parse(name), {})).total_bytes for name in CODECS}
    assert size["float16"] < 0.6 * size["none"] and size["int8"] < 0.35 * size["none"]
    assert size["topk:0.1"] < 0.3 * size["none"]


def test_topk_error_feedback_delays_but_never_loses_change():
    codec = parse("topk:0.25")
    specs = [tensors.TensorSpec("w", "float32", (8,))]
    residual, total_sent = {}, torch.zeros(8)
    diffs = [torch.randn(8) for _ in range(30)]
    for d in diffs:
        total_sent += codecs.decode(codecs.encode({"w": d}, codec, residual), specs, codec)["w"]
    # What was sent plus what is still held back is exactly what was produced.
    assert torch.allclose(total_sent + residual["w"], sum(diffs), atol=1e-5)


def test_hostile_wire_tensors_are_refused():
    specs = [tensors.TensorSpec("w", "float32", (4,))]
    bad_index = {"w#values": torch.ones(1), "w#indices": torch.tensor([9], dtype=torch.int32)}
    with pytest.raises(CodecError, match="outside"):
        codecs.decode(bad_index, specs, parse("topk:0.25"))
    bad_scale = {"w": torch.ones(4, dtype=torch.int8), "w#scale": torch.tensor(float("nan"))}
    with pytest.raises(CodecError, match="scale"):
        codecs.decode(bad_scale, specs, parse("int8"))


@pytest.mark.parametrize("text", ["gzip", "topk:0", "topk:2", "topk:x", "int4"])
def test_unknown_codecs_are_clear_errors(text):
    with pytest.raises(ValueError, match="unknown compression"):
        parse(text)
