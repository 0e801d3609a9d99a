"""Secure aggregation: the server learns the weighted sum of the clients' updates and nothing else.

The protocol is SecAgg (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for Privacy-Preserving
Machine Learning") with SecAgg+'s sparse graph (Bell et al., CCS 2020, "Secure Single-Server Aggregation
with (Poly)Logarithmic Overhead"), for an honest-but-curious server. This module is its cryptographic core
only: pure functions, no network, no threads, no torch; its two state machines, the client's and the
server's session, are in common/secagg_sessions.py.

Vectors. A client's update (`length` floats) is clipped to [-clip, clip], put in fixed point
q(v) = round(v * 2**scale_bits), multiplied by the client's weight w (its sample count) and followed by w
itself: `length + 1` uint64 values, all arithmetic mod 2**64. The int64 two's-complement reading of the sum
is exact as long as it cannot overflow, which `SecAggParams` checks for up to `MAX_CLIENTS` clients. The
weight travels inside the masked vector, so the server learns the total weight and not each client's.

Graph. Each client u has neighbours N(u): a circulant (Harary) graph over a permutation of the clients
that advertised keys, seeded by `round_seed`, so every node has the same degree (`neighbours`, or all
others when it is 0: plain SecAgg). It is public: client and server compute it alike from the roster.

Rounds (U1 ⊇ U2 ⊇ U3 are the clients that completed stages 1, 2, 3):
1. Advertise: u makes two X25519 key pairs, (c_pk, c_sk) to encrypt shares and (s_pk, s_sk) for the
   pairwise masks, and sends both public keys. The server relays U1's keys to U1 (the roster).
2. Share keys: u draws a 32-byte self-mask seed b_u and Shamir-shares b_u and s_sk_u, threshold t, one
   share per neighbour. Each neighbour's shares are AES-GCM encrypted under HKDF(X25519(c_sk_u, c_pk_v)),
   with sender, receiver and round bound as associated data, so the relaying server cannot read them. The
   bundle also carries a SHA-256 commitment to b_u, so that the server can tell a reconstructed b_u is right.
3. Masked input: u adds to its encoded vector PRG(b_u) and, for each neighbour v in U2,
   +PRG(s_uv) if u < v else -PRG(s_uv), with s_uv = HKDF(X25519(s_sk_u, s_pk_v)) the same for u and v:
   the pairwise masks cancel in the sum. The server folds the masked vectors into a running sum.
4. Unmasking: each survivor (U3) sends, for each neighbour v, its share of b_v if v survived, or of
   s_sk_v if v dropped after stage 2 (U2 minus U3), never both for one v. With t shares of each, the server
   removes the survivors' self masks and the masks that survivors share with dropped clients.

Security. A client's masked vector is uniformly random to the server (self mask). Fewer than t colluding
neighbours learn nothing of u's secrets (Shamir). An honest client refuses to reveal for a client listed
both as survivor and as dropped, or when fewer than t survivors are claimed, so the server cannot unmask a
single update. Against an actively malicious server (one that tells clients different survivor lists)
this is not enough: that needs the signed consistency round of the paper, which is not here.

Parameters. `neighbours` (k) should grow like log n (Bell et al.: tens of neighbours for thousands of
clients), or be 0 for small federations. The threshold t counts shares among a client's neighbours (a
client holds no share of its own secrets), so 2 <= t <= degree: t must exceed the number of a client's
neighbours that could collude with the server, and must not exceed the number of its neighbours expected
to survive to the end of the round; about half the degree plus one balances the two.

Costs, per client of degree d, vector of L values: 2 X25519 key generations, 2d X25519 agreements,
4 Shamir splits (O(t * d) multiplications in GF(2**128), pure Python), d AES-GCM messages of 130 bytes,
and d + 1 AES-CTR keystreams of 8(L+1) bytes added to the vector, made in cache-sized blocks. Measured on
one core of the 2-core development machine: `mask` of L = 200k with d = 4 takes about 3 ms (L = 11M, a
ResNet-18: about 0.1 s), `share_keys` under 3 ms for d <= 9, `encode` about 3.5 ms for 200k values. The
server, per survivor: 2 Shamir combinations (O(t**2)) and one keystream; per client dropped after stage 2:
2 combinations and one agreement and keystream per surviving neighbour. `unmask` of 200k values: 30 ms
for 10 clients (d = 4, t = 3), 0.5 s for 100 clients (d = 8, t = 5), mostly Shamir.

Shamir (pycryptodome's `Crypto.Protocol.SecretSharing.Shamir`): secrets of exactly 16 bytes in GF(2**128),
so each 32-byte secret is shared as two halves with the same indices; share indices are the integers
1..n (0 would be the secret itself, so it is refused); `split` does not check n >= t and `combine` must be
given exactly t distinct shares, which this module ensures; the field arithmetic is pure Python, so
sharing among hundreds of neighbours with a threshold in the hundreds takes seconds, which is one more
reason for a sparse graph.

Message formats (all integers big-endian, ids UTF-8; first byte the format version, 1):
- advertise: 01 'A' | c_pk (32) | s_pk (32): 66 bytes.
- share ciphertext (one per neighbour): 01 'S' | commitment to b (32) | nonce (12) |
  AES-GCM(index u32 | share of b (32) | share of s_sk (32)) with its 16-byte tag: 130 bytes.
- reveal share: 01 'R' | 'b' or 's' | index u32 | share (32): 39 bytes.
- `pack_map`: 01 'M' | count u32 | count x (id length u16 | id | value length u32 | value), ids sorted,
  for carrying a roster, a bundle of ciphertexts or a reveal as one bytes field.
- `pack_vector`: the uint64 values, little-endian, 8(L+1) bytes.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from common.secagg_crypto import (  # noqa: F401 - SecAggError is this module's error too
    KEY_BYTES,
    VERSION,
    SecAggError,
    _id,
)

MAX_CLIENTS = 100_000  # the overflow check of SecAggParams holds for sums of up to this many clients
MAX_ID_BYTES = 1024  # a client id, UTF-8
ADVERTISE_BYTES = 2 + 2 * KEY_BYTES
_NONCE_BYTES = 12
_SHARE_PLAIN_BYTES = 4 + 2 * KEY_BYTES
SHARE_BYTES = 2 + KEY_BYTES + _NONCE_BYTES + _SHARE_PLAIN_BYTES + 16
REVEAL_BYTES = 2 + 1 + 4 + KEY_BYTES
_MAX_MAP_VALUE = 4096
_DOMAIN = b"fedgrpc secagg v1"




@dataclass(frozen=True)
class SecAggParams:
    """One round's public parameters, the same at the server and every client.

    Defaults: clip 8 leaves room for any sane update (diffs and weights are far below 8 in magnitude);
    scale_bits 16 rounds each value to 2**-16, so the weighted mean is within 2**-17 (7.6e-6) of the mean
    of the clipped floats per value, whatever the weights (each weighted rounding error is at most w/2
    units, and the sum is divided by the total weight), well below float16's resolution near 1; max_weight
    2**20 samples. Then 2**20 * 8 * 2**16 * 100,000 < 2**56: seven bits of headroom, which a larger clip,
    scale_bits (up to 23) or max_weight can use.
    """

    length: int  # values in the update vector (model floats flattened), before the weight slot
    threshold: int  # t: shares needed to reconstruct a secret; also the fewest survivors unmasked
    clip: float = 8.0  # each value clipped to [-clip, clip] before fixed-point encoding
    scale_bits: int = 16  # fixed point: q(v) = round(v * 2**scale_bits)
    neighbours: int = 0  # k: each client's neighbours in the sparse graph (0 = all others: plain SecAgg)
    round_seed: int = 0  # makes the neighbour graph (public, agreed by all from the round number/seed)
    max_weight: int = 2**20  # largest sample count a client may weigh its update by

    def __post_init__(self) -> None:
        if not _is_int(self.length) or not 1 <= self.length <= 2**40:
            raise ValueError(f"length must be an integer from 1 to 2**40, not {self.length!r}")
        if not _is_int(self.threshold) or self.threshold < 2:
            raise ValueError(f"threshold must be an integer of at least 2, not {self.threshold!r}")
        if not isinstance(self.clip, (int, float)) or not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be a positive finite number, not {self.clip!r}")
        if not _is_int(self.scale_bits) or not 0 <= self.scale_bits <= 52:
            raise ValueError(f"scale_bits must be an integer from 0 to 52, not {self.scale_bits!r}")
        if not _is_int(self.neighbours) or self.neighbours < 0:
            raise ValueError(f"neighbours must be a non-negative integer, not {self.neighbours!r}")
        if self.neighbours and self.threshold > self.neighbours:
            raise ValueError(f"threshold {self.threshold} exceeds the {self.neighbours} neighbours that hold a "
                             "client's shares")
        if not _is_int(self.round_seed) or not 0 <= self.round_seed < 2**64:
            raise ValueError(f"round_seed must be an integer from 0 to 2**64 - 1, not {self.round_seed!r}")
        if not _is_int(self.max_weight) or self.max_weight < 1:
            raise ValueError(f"max_weight must be a positive integer, not {self.max_weight!r}")
        # round() of a clipped value is at most ceil(clip * 2**s); products with Python ints are exact.
        if self.max_weight * math.ceil(self.clip * 2**self.scale_bits) * MAX_CLIENTS >= 2**63:
            raise ValueError(f"max_weight * clip * 2**scale_bits * {MAX_CLIENTS} clients reaches 2**63, so the "
                             "weighted sum could overflow int64")

    def context(self) -> bytes:
        """The bytes that bind every key derivation and ciphertext to this round's parameters."""
        return _DOMAIN + struct.pack(">QQdBQQQ", self.length, self.threshold, float(self.clip), self.scale_bits,
                                     self.neighbours, self.round_seed, self.max_weight)


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# --- fixed point ------------------------------------------------------------------------------------

def encode(values: np.ndarray, weight: int, params: SecAggParams) -> np.ndarray:
    """[w * round(clip(v) * 2**s) ..., w] as uint64 (two's complement): what a client masks."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (params.length,):
        raise ValueError(f"the update has shape {values.shape}, not ({params.length},)")
    if not _is_int(weight) or not 1 <= weight <= params.max_weight:
        raise ValueError(f"weight must be an integer from 1 to max_weight={params.max_weight}, not {weight!r}")
    if not np.isfinite(values).all():
        raise ValueError("the update has a NaN or infinite value, which fixed point cannot carry")
    scaled = np.clip(values, -params.clip, params.clip)  # a new array: the caller's is left alone
    scaled *= 2.0**params.scale_bits
    np.rint(scaled, out=scaled)
    out = np.empty(params.length + 1, dtype=np.uint64)
    fixed = out[:-1].view(np.int64)
    fixed[:] = scaled
    fixed *= weight
    out[-1] = weight
    return out


def decode(total: np.ndarray, params: SecAggParams) -> tuple[np.ndarray, int]:
    """The weighted mean (float64) and the total weight of a sum of `encode` vectors."""
    check_vector(total, params)
    weight = int(total[-1:].view(np.int64)[0])
    if weight <= 0:
        raise SecAggError("the total weight is 0 or negative, so there is no mean")
    if weight > params.max_weight * MAX_CLIENTS:
        raise SecAggError(f"the total weight {weight} exceeds what {MAX_CLIENTS} clients can have: the sum is "
                          "still masked or corrupt")
    mean = total[:-1].view(np.int64).astype(np.float64) / float(weight) / 2.0**params.scale_bits
    return mean, weight


def check_vector(vector: np.ndarray, params: SecAggParams) -> None:
    """Raise SecAggError unless `vector` is a uint64 array of length + 1 values."""
    if not isinstance(vector, np.ndarray) or vector.dtype != np.uint64 or vector.shape != (params.length + 1,):
        shape = getattr(vector, "shape", None)
        dtype = getattr(vector, "dtype", type(vector).__name__)
        raise SecAggError(f"expected a uint64 vector of shape ({params.length + 1},), got {dtype} of shape {shape}")


def pack_vector(vector: np.ndarray, params: SecAggParams) -> bytes:
    """A masked vector (or sum) as little-endian bytes."""
    check_vector(vector, params)
    return vector.astype("<u8", copy=False).tobytes()


def unpack_vector(data: bytes, params: SecAggParams) -> np.ndarray:
    """The inverse of `pack_vector`; SecAggError if the size is wrong."""
    if len(data) != 8 * (params.length + 1):
        raise SecAggError(f"a masked vector is {8 * (params.length + 1)} bytes, not {len(data)}")
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


# --- neighbour graph --------------------------------------------------------------------------------

def neighbours(clients: Sequence[str], params: SecAggParams) -> dict[str, tuple[str, ...]]:
    """The public graph over `clients`: each client's neighbours, sorted by id.

    Symmetric and regular: the clients are put in a pseudo-random order fixed by (the set of clients,
    round_seed) and each is joined to the k/2 nearest on each side of the ring (Harary graph, as in
    SecAgg+); an odd k adds the opposite node when the count is even and is rounded up to k + 1 when it is
    odd (no regular graph of odd degree has an odd number of nodes). k = 0 or k >= n - 1: complete graph.
    """
    ids = _check_ids(clients)
    n, k = len(ids), params.neighbours
    if k == 0 or k >= n - 1:
        return {c: tuple(x for x in ids if x != c) for c in ids}
    seed = params.round_seed.to_bytes(8, "big")
    ring = sorted(ids, key=lambda c: (hashlib.sha256(b"secagg graph" + seed + c.encode()).digest(), c))
    offsets = list(range(1, k // 2 + 1))
    if k % 2:
        if n % 2 == 0:
            offsets.append(n // 2)  # the opposite node: +n/2 and -n/2 are the same edge
        else:
            offsets.append(k // 2 + 1)
    graph: dict[str, set[str]] = {c: set() for c in ids}
    for i, c in enumerate(ring):
        for j in offsets:
            graph[c].update((ring[(i + j) % n], ring[(i - j) % n]))
    return {c: tuple(sorted(graph[c])) for c in ids}


def _check_ids(clients: Sequence[str]) -> list[str]:
    ids = list(clients)
    for c in ids:
        try:
            size = len(c.encode("utf-8")) if isinstance(c, str) else 0
        except UnicodeEncodeError:  # a lone surrogate
            size = 0
        if not 0 < size <= MAX_ID_BYTES:
            raise SecAggError(f"a client id must be a non-empty UTF-8 string of at most {MAX_ID_BYTES} bytes, "
                              f"not {c!r}")
    if len(set(ids)) != len(ids):
        raise SecAggError("the list of clients names a client twice")
    if len(ids) > MAX_CLIENTS:
        raise SecAggError(f"{len(ids)} clients exceed the {MAX_CLIENTS} that the overflow check allows")
    return sorted(ids)


# --- message formats --------------------------------------------------------------------------------

def _parse_advertise(data: bytes, client: str) -> tuple[bytes, bytes]:
    if not isinstance(data, bytes) or len(data) != ADVERTISE_BYTES or data[:2] != bytes((VERSION, ord("A"))):
        raise SecAggError(f"client {client!r} advertised keys that are not {ADVERTISE_BYTES} bytes of format "
                          f"version {VERSION}")
    return data[2:34], data[34:66]


def _parse_share(data: bytes, sender: str) -> tuple[bytes, bytes, bytes]:
    """(commitment, nonce, ciphertext) of a share message."""
    if not isinstance(data, bytes) or len(data) != SHARE_BYTES or data[:2] != bytes((VERSION, ord("S"))):
        raise SecAggError(f"client {sender!r} sent a share ciphertext that is not {SHARE_BYTES} bytes of format "
                          f"version {VERSION}")
    return data[2:34], data[34:46], data[46:]


def _parse_reveal(data: bytes, holder: str) -> tuple[str, int, bytes]:
    """(kind 'b' or 's', index, share) of a revealed share."""
    if (not isinstance(data, bytes) or len(data) != REVEAL_BYTES or data[:2] != bytes((VERSION, ord("R")))
            or data[2] not in b"bs"):
        raise SecAggError(f"client {holder!r} revealed a share that is not {REVEAL_BYTES} bytes of format "
                          f"version {VERSION}")
    (index,) = struct.unpack(">I", data[3:7])
    return chr(data[2]), index, data[7:]


def pack_map(entries: Mapping[str, bytes]) -> bytes:
    """A roster, a bundle of share ciphertexts or a reveal as one bytes field (see the module docstring)."""
    _check_ids(list(entries))
    out = [bytes((VERSION, ord("M"))), struct.pack(">I", len(entries))]
    for key in sorted(entries):
        value = entries[key]
        if not isinstance(value, bytes) or len(value) > _MAX_MAP_VALUE:
            raise SecAggError(f"the value for {key!r} is not bytes of at most {_MAX_MAP_VALUE}")
        out += [_id(key), struct.pack(">I", len(value)), value]
    return b"".join(out)


def unpack_map(data: bytes) -> dict[str, bytes]:
    """The inverse of `pack_map`; SecAggError on any malformed, truncated or oversized input."""
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes) or len(data) < 6 or data[:2] != bytes((VERSION, ord("M"))):
        raise SecAggError(f"a packed map must start with version {VERSION} and 'M' and a count")
    (count,) = struct.unpack_from(">I", data, 2)
    if count > MAX_CLIENTS:
        raise SecAggError(f"a packed map of {count} entries exceeds the {MAX_CLIENTS} clients allowed")
    out: dict[str, bytes] = {}
    pos = 6
    for _ in range(count):
        if pos + 2 > len(data):
            raise SecAggError("a packed map is truncated in an id length")
        (size,) = struct.unpack_from(">H", data, pos)
        if not 0 < size <= MAX_ID_BYTES or pos + 2 + size + 4 > len(data):
            raise SecAggError("a packed map has an id of bad length or is truncated in one")
        try:
            key = data[pos + 2:pos + 2 + size].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SecAggError("a packed map has an id that is not UTF-8") from exc
        pos += 2 + size
        (size,) = struct.unpack_from(">I", data, pos)
        if size > _MAX_MAP_VALUE or pos + 4 + size > len(data):
            raise SecAggError(f"a packed map has a value for {key!r} that is oversized or truncated")
        if key in out:
            raise SecAggError(f"a packed map names {key!r} twice")
        out[key] = data[pos + 4:pos + 4 + size]
        pos += 4 + size
    if pos != len(data):
        raise SecAggError(f"a packed map has {len(data) - pos} bytes after its last entry")
    return out
