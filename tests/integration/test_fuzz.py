"""Hostile input thrown at a running fl-server: every message is refused with a precise status, the
server's memory stays bounded, and an honest round afterwards gives bit for bit the result it would have
given without the attack."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import convert, tensors
from common import messages as m
from common.proto import federation_pb2 as pb
from fl_client.connection import ServerConnection
from fl_tools.processes import ServerProcess
from tests.integration.conftest import ENV

pytestmark = pytest.mark.integration

REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Target:
    """A server in round 1 with one selected client, "0", whose honest update is held back."""

    def __init__(self, tmp: Path):
        self.server = ServerProcess(["--port", "0", "--out", str(tmp / "run"), "--rounds", "1", "--num-clients", "1",
                                     "--clients-per-round", "1", "--model-name", "mlp", "--round-timeout", "3600"],
                                    env=ENV)
        self.conn = ServerConnection(self.server.address)
        self.decision = self.conn.join(m.JoinRequest(client_id="0", num_samples=10))
        assert self.decision.action is m.Action.TRAIN
        header, state = self.conn.fetch_model(m.ModelRequest(client_id="0"))
        self.global_state = {k: v.clone() for k, v in state.items()}
        self.specs = header.payload.specs
        generator = torch.Generator().manual_seed(0)
        self.diff = {k: (torch.randn(v.shape, generator=generator) * 0.01).to(v.dtype) for k, v in state.items()}
        self.channel = grpc.insecure_channel(self.server.address)
        self.submit_raw = self.channel.stream_unary(convert.SUBMIT_UPDATE, request_serializer=convert.raw,
                                                    response_deserializer=pb.SubmitReply.FromString)
        self.join_raw = self.channel.unary_unary(convert.JOIN_ROUND, request_serializer=convert.raw,
                                                 response_deserializer=pb.JoinReply.FromString)
        self.model_raw = self.channel.unary_stream(convert.GET_GLOBAL_MODEL, request_serializer=convert.raw,
                                                   response_deserializer=convert.raw)

    def header(self, data: tensors.Payload, **changes) -> m.UpdateHeader:
        fields = dict(client_id="0", round=self.decision.round, model_version=self.decision.model_version,
                      num_samples=10, payload=convert.payload_header_of(data, m.Encoding.DIFF, tensors.CHUNK_SIZE))
        fields.update(changes)
        return m.UpdateHeader(**fields)

    def honest_messages(self, diff=None, chunk_size=tensors.CHUNK_SIZE, **changes) -> list[bytes]:
        payload = tensors.encode(diff if diff is not None else self.diff)
        header = self.header(payload, **changes)
        if chunk_size != tensors.CHUNK_SIZE:
            header = m.UpdateHeader(**{**header.__dict__, "payload": convert.payload_header_of(
                payload, m.Encoding.DIFF, chunk_size)})
        return list(convert.update_stream(header, payload, chunk_size))

    def refused(self, messages: list[bytes]) -> grpc.StatusCode:
        try:
            reply = self.submit_raw(iter(messages), timeout=30)
        except grpc.RpcError as e:
            return e.code()
        raise AssertionError(f"hostile update was answered {reply}")

    def close(self) -> None:
        self.channel.close()
        self.conn.close()
        self.server.stop()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    t = Target(tmp_path_factory.mktemp("fuzz"))
    t.rss_before = rss(t.server.proc.pid)
    yield t
    t.close()


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=4))
def test_random_bytes_as_update_streams(target, messages):
    assert target.refused(messages) in REFUSALS


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_join_and_model_requests(target, request_bytes):
    for call in (lambda: target.join_raw(request_bytes, timeout=0.5),
                 lambda: list(target.model_raw(request_bytes, timeout=30))):
        try:
            call()
        except grpc.RpcError as e:
            # Garbage is refused; what happens to parse as a request is answered or refused precisely.
            assert e.code() in REFUSALS | {grpc.StatusCode.DEADLINE_EXCEEDED}, e


LIES = {
    "100 GB claimed": lambda t, p: dict(payload=m.PayloadHeader(
        [tensors.TensorSpec(t.specs[0].name, "float32", (25_000_000_000,)), *t.specs[1:]], 100 << 30, 1, 0,
        m.Encoding.DIFF)),
    "zero-length": lambda t, p: dict(payload=m.PayloadHeader([], 0, 0, 0, m.Encoding.DIFF)),
    "wrong dtype": lambda t, p: dict(payload=m.PayloadHeader(
        [tensors.TensorSpec(s.name, "float64", s.shape) for s in t.specs], p.total_bytes * 2, 1, 0, m.Encoding.DIFF)),
    "wrong shape": lambda t, p: dict(payload=m.PayloadHeader(
        [tensors.TensorSpec(t.specs[0].name, "float32", (1,)), *t.specs[1:]], p.total_bytes, 1, 0, m.Encoding.DIFF)),
    "extra tensor": lambda t, p: dict(payload=m.PayloadHeader(
        [*t.specs, tensors.TensorSpec("evil", "float32", (1,))], p.total_bytes + 4, 1, 0, m.Encoding.DIFF)),
    "bytes mismatch": lambda t, p: dict(payload=m.PayloadHeader(t.specs, p.total_bytes + 1, 1, 0, m.Encoding.DIFF)),
    "full weights": lambda t, p: dict(payload=m.PayloadHeader(t.specs, p.total_bytes, 1, p.checksum,
                                                                m.Encoding.FULL_WEIGHTS)),
    "other codec": lambda t, p: dict(payload=m.PayloadHeader(t.specs, p.total_bytes, 1, p.checksum, m.Encoding.DIFF,
                                                               "int8")),
    "no samples": lambda t, p: dict(num_samples=0),
    "absurd samples": lambda t, p: dict(num_samples=10**15),
    "old round": lambda t, p: dict(round=99),
    "old model": lambda t, p: dict(model_version=7),
    "someone else": lambda t, p: dict(client_id="stranger"),
    "protocol": lambda t, p: dict(protocol_version=9),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_headers(target, lie):
    payload = tensors.encode(target.diff)
    messages = target.honest_messages(**LIES[lie](target, payload))
    assert target.refused(messages) in REFUSALS


def test_broken_streams(target):
    chunks = target.honest_messages(chunk_size=4096)
    header, data = chunks[0], chunks[1:]
    assert len(data) > 3
    cases = {
        "truncated": [header, *data[:-1]],
        "reordered": [header, data[1], data[0], *data[2:]],
        "duplicated chunk": [header, *data, data[-1]],
        "second header": [header, data[0], header, *data[1:]],
        "header only": [header],
        "empty chunk inserted": [header, convert.encode_data_chunk(b""), *data],
        "flipped bit": [header, *data[:-1], data[-1][:-1] + bytes([data[-1][-1] ^ 1])],
    }
    for name, messages in cases.items():
        assert target.refused(messages) in REFUSALS, name
    # One message past the server's 8 MiB limit: gRPC itself refuses it before our code sees it.
    oversized = [header, convert.encode_data_chunk(bytes(9 << 20))]
    assert target.refused(oversized) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 3e37])
def test_non_finite_or_overflowing_values_with_a_correct_checksum(target, bad):
    diff = {k: v.clone() for k, v in target.diff.items()}
    first = next(k for k, v in diff.items() if v.is_floating_point())
    diff[first].view(-1)[0] = bad
    messages = target.honest_messages(diff=diff, num_samples=10**6)
    assert target.refused(messages) == grpc.StatusCode.INVALID_ARGUMENT


@FUZZ
@given(st.data())
def test_random_corruption_of_the_data_chunks(target, data):
    # Corrupt one byte of one data chunk (its framing or its payload); header corruption is covered by the
    # random bytes and lying headers above (a flipped bit there can also make another valid header).
    messages = target.honest_messages(chunk_size=8192)
    index = data.draw(st.integers(1, len(messages) - 1))
    message = bytearray(messages[index])
    position = data.draw(st.integers(0, len(message) - 1))
    message[position] ^= data.draw(st.integers(1, 255))
    messages[index] = bytes(message)
    assert target.refused(messages) in REFUSALS


def test_zz_after_all_that_an_honest_round_is_exact(target):
    # Runs last (zz): the server is still in round 1, nothing was counted.
    grown = rss(target.server.proc.pid) - target.rss_before
    assert grown < 64 << 20, f"server memory grew by {grown / 2**20:.0f} MiB under attack"
    reply = target.conn.submit(target.header(tensors.encode(target.diff)), tensors.encode(target.diff))
    assert reply.accepted and not reply.duplicate
    deadline = time.monotonic() + 60
    while target.conn.join(m.JoinRequest(client_id="0", num_samples=10)).action is not m.Action.FINISHED:
        assert time.monotonic() < deadline
    _, final = target.conn.fetch_model(m.ModelRequest(client_id="0"))
    # What the server computes for one update of weight 10: ((0 + 10 * d) / 10) * 1 + global.
    for name, g in target.global_state.items():
        d = target.diff[name]
        if g.is_floating_point():
            expected = torch.zeros_like(g).add_(d, alpha=10).div_(10).mul_(1.0).add_(g)
        else:
            expected = (torch.zeros(g.shape, dtype=torch.float64).add_(d.double(), alpha=10).div_(10)
                        .add_(g).round_().to(g.dtype))
        assert torch.equal(final[name], expected), name
