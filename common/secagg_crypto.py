"""Secure aggregation's cryptographic primitives (common/secagg.py is the protocol built on them): key
agreement and derivation (X25519, HKDF-SHA256), the masks' generator (AES-CTR), commitments, and Shamir
sharing of 32-byte secrets as two 16-byte halves in GF(2**128) (pycryptodome)."""
from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from Crypto.Protocol.SecretSharing import Shamir
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

VERSION = 1
KEY_BYTES = 32
_BLOCK = 1 << 15  # uint64 values of keystream made at a time (256 KiB: fits in L2)
_MAX_TRIES = 16  # subsets of t shares tried when a reconstructed secret fails its check (a bad share)


class SecAggError(ValueError):
    """A secure-aggregation message or request that is malformed, out of turn or unsafe to answer."""


def _id(client: str) -> bytes:
    raw = client.encode("utf-8")
    return struct.pack(">H", len(raw)) + raw


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def _agree(private: X25519PrivateKey, public: bytes, whose: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point gives an all-zero secret, which OpenSSL refuses
        raise SecAggError(f"client {whose!r} advertised a public key that gives no shared secret") from exc


def _pairwise_seed(s_sk: X25519PrivateKey, s_pk: bytes, me: str, other: str, context: bytes) -> bytes:
    low, high = sorted((me, other))  # u and v derive the same seed
    return _hkdf(_agree(s_sk, s_pk, other), b"secagg pairwise" + context + _id(low) + _id(high))


def _share_key(c_sk: X25519PrivateKey, c_pk: bytes, whose: str, sender: str, receiver: str, context: bytes) -> bytes:
    # A key per direction, so that u -> v and v -> u never share a (key, nonce).
    return _hkdf(_agree(c_sk, c_pk, whose), b"secagg shares" + context + _id(sender) + _id(receiver))


def _share_ad(commitment: bytes, sender: str, receiver: str, context: bytes) -> bytes:
    return bytes((VERSION, ord("S"))) + commitment + context + _id(sender) + _id(receiver)


def _commit(b: bytes, client: str, context: bytes) -> bytes:
    return hashlib.sha256(b"secagg commit" + context + _id(client) + b).digest()


def prg(seed: bytes, count: int) -> np.ndarray:
    """`count` uint64 values of AES-256-CTR keystream under `seed` (zero IV: each seed is used once)."""
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(8 * count)), dtype="<u8")


def _add_streams(out: np.ndarray, seeds: Sequence[tuple[bytes, int]]) -> None:
    """out += sign * prg(seed) for each (seed, sign), in place: the same values as `prg`, made a block at a
    time so that the keystream stays in cache (3-5 times faster than whole keystreams for large vectors)."""
    encryptors = [(Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor(), sign) for seed, sign in seeds]
    zeros = memoryview(bytes(8 * _BLOCK))
    buffer = bytearray(8 * _BLOCK + 16)  # update_into wants room for one more AES block
    stream = np.frombuffer(buffer, dtype="<u8", count=_BLOCK)
    for start in range(0, out.size, _BLOCK):
        part = out[start:start + _BLOCK]
        size = part.size
        for encryptor, sign in encryptors:
            encryptor.update_into(zeros[:8 * size], buffer)
            if sign > 0:
                part += stream[:size]
            else:
                part -= stream[:size]


def _split(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """`count` 32-byte shares (indices 1..count) of a 32-byte secret, as two 16-byte Shamir halves."""
    high = Shamir.split(threshold, count, secret[:16])
    low = Shamir.split(threshold, count, secret[16:])
    return [first + second for (_, first), (_, second) in zip(high, low)]


def _combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    return (Shamir.combine([(i, s[:16]) for i, s in shares]) +
            Shamir.combine([(i, s[16:]) for i, s in shares]))


def _reconstruct(shares: Mapping[int, bytes], threshold: int, valid: Callable[[bytes], bool]) -> bytes | None:
    """The secret from `threshold` of `shares` that passes `valid`, or None.

    The lowest indices first (one try when all shares are good); then random subsets, which avoid a few
    bad shares among many with good odds, where subsets in order would keep the first bad one."""
    items = sorted(shares.items())
    subsets = [tuple(items[:threshold])]
    if len(items) > threshold:
        chooser = random.Random(0)  # which subsets are tried is no secret
        subsets += [tuple(sorted(chooser.sample(items, threshold))) for _ in range(_MAX_TRIES - 1)]
    for subset in dict.fromkeys(subsets):  # each distinct subset once
        secret = _combine(subset)
        if valid(secret):
            return secret
    return None


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
