import json

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
    stream = iter(list(convert.update_stream(header, payload, 256)))
    back = convert.update_opening_from_raw(next(stream))[0]
    assert back == header
    got = tensors.assemble(back.payload.specs, convert.data_chunks(stream, pb.UpdateChunk, "update"),
                           back.payload.checksum)
    assert torch.equal(got["w"], state["w"]) and got["n"].item() == 5


def test_model_stream_roundtrip():
    payload = tensors.encode({"w": torch.arange(10.0)})
    header = convert.model_header_of(4, 3, payload, 16)
    messages = convert.model_stream(header, payload, 16)
    assert len(messages) == 1 + 3  # 40 bytes in 16-byte chunks
    assert convert.model_header_from_raw(messages[0]) == header
    assert [pb.ModelChunk.FromString(msg).data for msg in messages[1:]] == list(map(bytes, payload.chunks(16)))


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
    msg = pb.UpdateChunk.FromString(next(convert.update_stream(header, payload, 1024)))
    mutate(msg.header)
    with pytest.raises(convert.MalformedMessage, match=message):
        convert.update_opening_from_raw(msg.SerializeToString())[0]


def test_stream_must_start_with_header_and_have_only_one():
    with pytest.raises(convert.MalformedMessage, match="start with a header"):
        convert.update_opening_from_raw(pb.UpdateChunk(data=b"x").SerializeToString())[0]
    with pytest.raises(convert.MalformedMessage, match="empty"):
        convert.update_opening_from_raw(None)[0]
    with pytest.raises(convert.MalformedMessage, match="not valid protobuf"):
        convert.update_opening_from_raw(b"\xff\xff\xff")[0]
    second = pb.UpdateChunk(header=pb.UpdateHeader()).SerializeToString()
    with pytest.raises(convert.MalformedMessage, match="second header"):
        list(convert.data_chunks(iter([convert.encode_data_chunk(b"x"), second]), pb.UpdateChunk, "update"))


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16383, 16384, 1 << 20, (1 << 20) + 1])
def test_hand_framed_data_chunks_are_exactly_protobufs_bytes(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    framed = convert.encode_data_chunk(memoryview(data))
    assert framed == pb.ModelChunk(data=data).SerializeToString() == pb.UpdateChunk(data=data).SerializeToString()
    assert bytes(next(convert.data_chunks(iter([framed]), pb.ModelChunk, "model"))) == data


def test_data_chunks_in_other_valid_encodings_are_still_understood():
    # A peer may write the same message differently (here, the field twice: the last one wins).
    odd = pb.UpdateChunk(data=b"first").SerializeToString() + pb.UpdateChunk(data=b"second").SerializeToString()
    assert [bytes(c) for c in convert.data_chunks(iter([odd]), pb.UpdateChunk, "update")] == [b"second"]


# --- the training config's hyperparameters: one JSON object ------------------------------------------

def _hyperparameters_reply(text: str) -> pb.JoinReply:
    return pb.JoinReply(action=pb.WAIT, config=pb.TrainConfig(model=pb.ModelSpec(name="cnn"), hyperparameters=text))


def test_every_client_hyperparameter_travels():
    from common.settings import declared

    cfg = m.TrainConfig(model=SPEC, dataset="mnist", num_clients=7, seed=11, local_epochs=3, batch_size=16, lr=0.01,
                        momentum=0.5, weight_decay=1e-4, optimizer="adam", compression="topk:0.1",
                        partition="dirichlet:0.3", mu=0.01, clip_norm=5.0, eval_fraction=0.2)
    msg = convert.train_config_to_proto(cfg)
    sent = json.loads(msg.hyperparameters)
    assert list(sent) == [d.name for d in declared(m.ClientHyperparameters)]
    assert all(sent[name] == getattr(cfg, name) for name in sent)
    assert convert.train_config_from_proto(pb.TrainConfig.FromString(msg.SerializeToString())) == cfg


def test_a_newer_servers_keys_are_ignored_and_an_older_servers_missing_ones_take_the_default():
    text = json.dumps({"lr": 0.2, "a_hyperparameter_from_the_future": [1, 2]})
    cfg = convert.join_decision_from_proto(_hyperparameters_reply(text)).config
    assert cfg.lr == 0.2 and cfg.batch_size == m.ClientHyperparameters().batch_size


@pytest.mark.parametrize("text, message", [
    ("", "no hyperparameters"),
    ("{nope", "not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ("9" * 5000, "not valid JSON"),  # more digits than Python converts
    ('["lr", 1]', "not a JSON object"),
    ('"lr"', "not a JSON object"),
    ('{"lr": "fast"}', "'lr': expected a number"),
    ('{"lr": NaN}', "'lr': expected a number"),
    ('{"lr": 1e999}', "'lr': expected a number"),
    ('{"lr": -1}', "'lr': must be positive"),
    ('{"local_epochs": 2.5}', "'local_epochs': expected a whole number"),
    ('{"local_epochs": true}', "'local_epochs': expected a whole number"),
    ('{"local_epochs": 0}', "'local_epochs': must be at least 1"),
    ('{"batch_size": null}', "'batch_size': expected a whole number"),
    ('{"dataset": {"x": 1}}', "'dataset': expected a string"),
    ('{"dataset": "imagenet"}', "'dataset': unknown data set"),
    ('{"compression": "zip"}', "'compression': unknown compression"),
    ('{"seed": 100000000000000000000000}', "'seed' is out of range"),
    ('{"eval_fraction": 0.9}', "'eval_fraction': must be between"),
])
def test_hostile_hyperparameters_are_malformed(text, message):
    with pytest.raises(convert.MalformedMessage, match=message):
        convert.join_decision_from_proto(_hyperparameters_reply(text))
