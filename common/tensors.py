"""Tensors to raw bytes and back, and the chunking of those bytes for streaming.

A payload is the raw little-endian bytes of each tensor of a state dict, concatenated in a fixed
order and described by a list of `TensorSpec`s. Received bytes are only ever reinterpreted as numbers
(`torch.frombuffer`), never unpickled, so a hostile peer can send wrong numbers but never code.
"""
from __future__ import annotations

import math
import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

CHUNK_SIZE = 1 << 20  # 1 MiB: far below gRPC's 4 MiB message limit, large enough to stream at wire speed

if sys.byteorder != "little":  # the wire format is little-endian; so far no big-endian host has needed it
    raise ImportError("fedgrpc's tensor wire format needs a little-endian machine")

# The dtypes a payload may carry, by wire name. Anything else is refused on arrival.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_WIRE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class PayloadError(ValueError):
    """Received bytes do not match what their header announced."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        if tensor.dtype not in _WIRE_NAMES:
            raise TypeError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire format does not carry")
        return cls(name, _WIRE_NAMES[tensor.dtype], tuple(tensor.shape))


def specs_of(state: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec.of(name, t) for name, t in state.items()]


@dataclass(frozen=True)
class Payload:
    """A state dict as one contiguous byte buffer, ready to stream."""

    specs: list[TensorSpec]
    data: bytes
    crc32: int

    @property
    def total_bytes(self) -> int:
        return len(self.data)

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        yield from split(self.data, chunk_size)

    def num_chunks(self, chunk_size: int = CHUNK_SIZE) -> int:
        return math.ceil(len(self.data) / chunk_size)


def _as_bytes_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's own bytes, without a copy when it is already contiguous on the CPU."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # bfloat16 has no numpy dtype; a uint8 view of the same memory sidesteps that for every dtype.
    return memoryview(flat.view(torch.uint8).numpy())


def encode(state: Mapping[str, torch.Tensor]) -> Payload:
    """Concatenate the tensors' bytes once; every chunk handed out later is a slice of this."""
    specs = specs_of(state)
    data = b"".join(_as_bytes_view(t) for t in state.values())
    return Payload(specs, data, zlib.crc32(data))


def split(data: bytes, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for start in range(0, len(data), chunk_size):
        yield data[start:start + chunk_size]


class PayloadReceiver:
    """Reassembles a streamed payload into one buffer allocated up front from the expected specs.

    The caller checks the specs against what it expects *before* creating the receiver, so a header
    that lies about its size cannot make us allocate more than the model we already hold.
    """

    def __init__(self, specs: list[TensorSpec], expected_crc32: int):
        self.specs = specs
        self.expected_crc32 = expected_crc32
        self.total_bytes = sum(s.nbytes for s in specs)
        self._buffer = bytearray(self.total_bytes)
        self._view = memoryview(self._buffer)
        self._received = 0
        self._crc = 0

    def add(self, chunk: bytes) -> None:
        end = self._received + len(chunk)
        if end > self.total_bytes:
            raise PayloadError(f"payload is longer than the {self.total_bytes} bytes its header announced")
        self._view[self._received:end] = chunk
        self._crc = zlib.crc32(chunk, self._crc)
        self._received = end

    def finish(self) -> dict[str, torch.Tensor]:
        if self._received != self.total_bytes:
            raise PayloadError(f"payload ended after {self._received} of the {self.total_bytes} bytes "
                               "its header announced")
        if self._crc != self.expected_crc32:
            raise PayloadError("payload checksum does not match its header (corrupted or reordered chunks)")
        return decode(self.specs, self._buffer)


def decode(specs: Iterable[TensorSpec], data: bytes | bytearray) -> dict[str, torch.Tensor]:
    """Tensors that share `data`'s memory (no copy); `data` must be exactly the specs' total size."""
    if isinstance(data, bytes):  # torch only wraps writable memory without a warning
        data = bytearray(data)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        dtype = DTYPES[spec.dtype]
        if spec.nbytes == 0:
            tensor = torch.empty(spec.shape, dtype=dtype)
        else:
            tensor = torch.frombuffer(data, dtype=dtype, count=spec.numel, offset=offset).reshape(spec.shape)
        out[spec.name] = tensor
        offset += spec.nbytes
    if offset != len(data):
        raise PayloadError(f"payload has {len(data)} bytes but its tensors need {offset}")
    return out


def assemble(specs: list[TensorSpec], chunks: Iterable[bytes], crc32: int) -> dict[str, torch.Tensor]:
    receiver = PayloadReceiver(specs, crc32)
    for chunk in chunks:
        receiver.add(chunk)
    return receiver.finish()
