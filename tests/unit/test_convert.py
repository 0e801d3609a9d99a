import pytest
import torch

from common import convert, tensors
from common import messages as m
from common.proto import federation_pb2 as pb

SPEC = m.ModelSpec("cnn", (1, 8, 8), 10)
CONFIG = m.TrainConfig(model=SPEC, dataset="digits", num_clients=3, seed=4, local_epochs=2, batch_size=32,
                       lr=0.05, momentum=0.9, weight_decay=0.0, optimizer="sgd")


def test_join_messages_roundtrip():
    req = m.JoinRequest(client_id="hospital-7", num_samples=123, device="cuda:1")
    assert convert.join_request_from_proto(convert.join_request_to_proto(req)) == req
    decision = m.JoinDecision(m.Action.TRAIN, CONFIG, round=3, model_version=2, message="go")
    wire = pb.JoinReply.FromString(convert.join_decision_to_proto(decision).SerializeToString())
    assert convert.join_decision_from_proto(wire) == decision


def test_update_stream_roundtrip():
    state = {"w": torch.randn(300), "n": torch.tensor(5)}
    payload = tensors.encode(state)
    header = m.UpdateHeader(client_id="3", round=2, model_version=1, num_samples=40,
                            payload=convert.payload_header_of(payload, m.Encoding.DIFF, 256),
                            metrics={"train_loss": 0.5})
    stream = iter(list(convert.update_chunks_to_proto(header, payload, 256)))
    back = convert.update_header_from_proto(next(stream))
    assert back == header
    got = tensors.assemble(back.payload.specs, convert.data_chunks(stream, "update"), back.payload.crc32)
    assert torch.equal(got["w"], state["w"]) and got["n"].item() == 5


def test_model_stream_roundtrip():
    payload = tensors.encode({"w": torch.arange(10.0)})
    header = convert.model_header_of(4, 3, payload, 16)
    chunks = convert.model_chunks_to_proto(header, payload, 16)
    assert len(chunks) == 1 + 3  # 40 bytes in 16-byte chunks
    assert convert.model_header_from_proto(chunks[0]) == header


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h.payload.tensors[0].__setattr__("dtype", "complex128"), "unknown dtype"),
    (lambda h: h.payload.tensors[0].__setattr__("name", ""), "tensor name"),
    (lambda h: h.payload.tensors[0].shape.extend([1] * 20), "dimensions"),
    (lambda h: h.payload.tensors.add(name="w", dtype="float32"), "twice"),
    (lambda h: h.__setattr__("client_id", ""), "client_id"),
    (lambda h: h.__setattr__("client_id", "x" * 500), "client_id"),
    (lambda h: h.payload.__setattr__("encoding", 0), "encoding"),
])
def test_malformed_headers_are_refused(mutate, message):
    payload = tensors.encode({"w": torch.zeros(2)})
    header = m.UpdateHeader(client_id="1", round=1, model_version=0, num_samples=1,
                            payload=convert.payload_header_of(payload, m.Encoding.DIFF, 1024))
    msg = next(convert.update_chunks_to_proto(header, payload, 1024))
    mutate(msg.header)
    with pytest.raises(convert.MalformedMessage, match=message):
        convert.update_header_from_proto(msg)


def test_stream_must_start_with_header_and_have_only_one():
    with pytest.raises(convert.MalformedMessage, match="start with a header"):
        convert.update_header_from_proto(pb.UpdateChunk(data=b"x"))
    second = pb.UpdateChunk(header=pb.UpdateHeader())
    with pytest.raises(convert.MalformedMessage, match="second header"):
        list(convert.data_chunks(iter([pb.UpdateChunk(data=b"x"), second]), "update"))
