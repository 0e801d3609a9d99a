"""Secure aggregation's two state machines (common/secagg.py describes the protocol): a client's session,
which makes its keys, shares, masked vector and reveals, and the server's, which relays the stages and
unmasks the sum. No network, no threads, no torch."""
from __future__ import annotations

import functools
import os
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.secagg import (
    _NONCE_BYTES,
    SecAggParams,
    _check_ids,
    _parse_advertise,
    _parse_reveal,
    _parse_share,
    check_vector,
    neighbours,
)
from common.secagg_crypto import (
    KEY_BYTES,
    VERSION,
    SecAggError,
    _add_streams,
    _agree,
    _commit,
    _pairwise_seed,
    _public,
    _reconstruct,
    _share_ad,
    _share_key,
    _split,
)

# --- client -----------------------------------------------------------------------------------------

class ClientSession:
    """One client's side of one round: advertise, share_keys, mask, reveal, in that order."""

    def __init__(self, client_id: str, params: SecAggParams):
        _check_ids([client_id])
        self.client_id, self.params = client_id, params
        self._context = params.context()
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk_raw = os.urandom(KEY_BYTES)
        self._s_sk = X25519PrivateKey.from_private_bytes(self._s_sk_raw)
        self._advertised = bytes((VERSION, ord("A"))) + _public(self._c_sk) + _public(self._s_sk)
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # U1: id -> (c_pk, s_pk)
        self._graph: dict[str, tuple[str, ...]] = {}
        self._b = b""
        self._held: dict[str, tuple[int, bytes, bytes]] = {}  # sender -> (index, share of b, share of s_sk)
        self._masked = False
        self._reveal: tuple[frozenset[str], frozenset[str], dict[str, bytes]] | None = None

    def advertise(self) -> bytes:
        """Stage 1: this client's two public keys (c_pk, s_pk)."""
        return self._advertised

    def share_keys(self, roster: Mapping[str, bytes]) -> dict[str, bytes]:
        """Stage 2: {neighbour: ciphertext of its shares of b_u and s_sk_u}, for every neighbour in `roster`."""
        if self._graph:
            raise SecAggError("share_keys was already called in this round")
        keys = {client: _parse_advertise(data, client) for client, data in roster.items()}
        if roster.get(self.client_id) != self._advertised:
            raise SecAggError("the roster does not carry this client's own advertised keys")
        graph = neighbours(list(keys), self.params)
        mine = graph[self.client_id]
        t = self.params.threshold
        if len(mine) < t:
            raise SecAggError(f"this client has {len(mine)} neighbours among those who advertised, fewer than "
                              f"the threshold {t}")
        b = os.urandom(KEY_BYTES)
        commitment = _commit(b, self.client_id, self._context)
        shares_b, shares_s = _split(b, t, len(mine)), _split(self._s_sk_raw, t, len(mine))
        out = {}
        for i, v in enumerate(mine):
            key = _share_key(self._c_sk, keys[v][0], v, self.client_id, v, self._context)
            nonce = os.urandom(_NONCE_BYTES)
            plain = struct.pack(">I", i + 1) + shares_b[i] + shares_s[i]
            sealed = AESGCM(key).encrypt(nonce, plain, _share_ad(commitment, self.client_id, v, self._context))
            out[v] = bytes((VERSION, ord("S"))) + commitment + nonce + sealed
        self._keys, self._graph, self._b = keys, graph, b
        return out

    def mask(self, vector: np.ndarray, received: Mapping[str, bytes]) -> np.ndarray:
        """Stage 3: `vector` (from `encode`) plus the self mask and the pairwise masks of the neighbours that
        sent shares (`received`: {sender: ciphertext addressed to this client}), whose shares are kept.

        `received` must be all of the server's `shares_for(this client)`: the server removes the masks of
        exactly those pairs."""
        if not self._graph:
            raise SecAggError("mask comes after share_keys")
        if self._masked:
            raise SecAggError("mask was already called: a second masked vector would reveal the difference")
        check_vector(vector, self.params)
        mine = self._graph[self.client_id]
        strangers = sorted(set(received) - set(mine))
        if strangers:
            raise SecAggError(f"shares came from clients that are not this client's neighbours: {strangers}")
        if len(received) < self.params.threshold:
            raise SecAggError(f"only {len(received)} neighbours sent shares, fewer than the threshold "
                              f"{self.params.threshold}")
        held = {}
        for sender, data in received.items():
            commitment, nonce, sealed = _parse_share(data, sender)
            key = _share_key(self._c_sk, self._keys[sender][0], sender, sender, self.client_id, self._context)
            try:
                plain = AESGCM(key).decrypt(nonce, sealed,
                                            _share_ad(commitment, sender, self.client_id, self._context))
            except InvalidTag as exc:
                raise SecAggError(f"the share ciphertext from {sender!r} does not authenticate") from exc
            (index,) = struct.unpack(">I", plain[:4])
            if index != self._graph[sender].index(self.client_id) + 1:
                raise SecAggError(f"the share from {sender!r} has index {index}, not this client's place in its "
                                  "neighbourhood")
            held[sender] = (index, plain[4:36], plain[36:68])
        seeds = [(self._b, 1)]
        for v in sorted(held):
            seed = _pairwise_seed(self._s_sk, self._keys[v][1], self.client_id, v, self._context)
            seeds.append((seed, 1 if self.client_id < v else -1))
        out = vector.copy()
        _add_streams(out, seeds)
        self._held, self._masked = held, True
        return out

    def reveal(self, survivors: Sequence[str], dropped: Sequence[str]) -> dict[str, bytes]:
        """Stage 4: {neighbour: this client's share of its b if it survived, or of its s_sk if it dropped}."""
        if not self._masked:
            raise SecAggError("reveal comes after mask")
        alive, gone = frozenset(survivors), frozenset(dropped)
        both = sorted(alive & gone)
        if both:
            raise SecAggError(f"clients listed both as survivors and as dropped: {both}")
        if self.client_id not in alive:
            raise SecAggError("this client is not among the survivors it is asked to reveal for")
        if len(alive) < self.params.threshold:
            raise SecAggError(f"only {len(alive)} survivors, fewer than the threshold {self.params.threshold}: "
                              "unmasking could expose an individual update")
        if self._reveal is not None:
            # Answering a second, different request could give both secrets of one client.
            if (alive, gone) != self._reveal[:2]:
                raise SecAggError("reveal was already answered for other lists of survivors and dropped clients")
            return dict(self._reveal[2])
        out = {}
        for v, (index, share_b, share_s) in self._held.items():
            if v in alive:
                out[v] = bytes((VERSION, ord("R"), ord("b"))) + struct.pack(">I", index) + share_b
            elif v in gone:
                out[v] = bytes((VERSION, ord("R"), ord("s"))) + struct.pack(">I", index) + share_s
        self._reveal = (alive, gone, out)
        return dict(out)


# --- server -----------------------------------------------------------------------------------------

class ServerSession:
    """The server's side of one round. Each stage closes when the next one's first call is made (roster()
    closes stage 1, shares_for() stage 2, survivors()/dropped() stage 3), so every client sees the same
    U1, U2 and U3; a late message for a closed stage raises SecAggError."""

    def __init__(self, params: SecAggParams, selected: Sequence[str]):
        self.params = params
        self.selected = frozenset(_check_ids(selected))
        self._context = params.context()
        self._stage = 1
        self._keys: dict[str, tuple[bytes, bytes]] = {}  # U1: id -> (c_pk, s_pk)
        self._advertised: dict[str, bytes] = {}
        self._graph: dict[str, tuple[str, ...]] = {}
        self._shares: dict[str, dict[str, bytes]] = {}  # U2: sender -> {receiver: ciphertext}
        self._commitments: dict[str, bytes] = {}
        self._masked: set[str] = set()  # U3
        self._revealers: set[str] = set()
        self._revealed: dict[str, dict[int, bytes]] = {}  # owner of the secret -> {index: share}

    def _advance(self, stage: int) -> None:
        names = {1: "advertise", 2: "share keys", 3: "masked input", 4: "unmasking"}
        if self._stage > stage:
            raise SecAggError(f"the {names[stage]} stage of this round is closed")
        if self._stage < 2 <= stage:
            graph = neighbours(list(self._keys), self.params)
            low = min((len(v) for v in graph.values()), default=0)
            if low < self.params.threshold:
                raise SecAggError(f"{len(graph)} clients advertised keys, too few for each to have "
                                  f"threshold={self.params.threshold} neighbours")
            self._graph = graph
        self._stage = max(self._stage, stage)

    def add_keys(self, client_id: str, advertised: bytes) -> None:
        """Stage 1: a selected client's public keys."""
        self._advance(1)
        if client_id not in self.selected:
            raise SecAggError(f"client {client_id!r} was not selected for this round")
        if client_id in self._keys:
            raise SecAggError(f"client {client_id!r} already advertised keys")
        c_pk, s_pk = _parse_advertise(advertised, client_id)
        probe = X25519PrivateKey.generate()
        for key in (c_pk, s_pk):
            _agree(probe, key, client_id)  # refuse a low-order key now, not in every client's share_keys
        self._keys[client_id], self._advertised[client_id] = (c_pk, s_pk), advertised

    def roster(self) -> dict[str, bytes]:
        """U1's advertised keys, to send to each client of U1; closes stage 1."""
        if self._stage < 2:
            self._advance(2)
        return dict(self._advertised)

    def add_shares(self, client_id: str, ciphertexts: Mapping[str, bytes]) -> None:
        """Stage 2: a client's share ciphertexts, which must be addressed to exactly its neighbours."""
        self._advance(2)
        if client_id not in self._keys:
            raise SecAggError(f"client {client_id!r} did not advertise keys in this round")
        if client_id in self._shares:
            raise SecAggError(f"client {client_id!r} already sent its shares")
        expected, got = set(self._graph[client_id]), set(ciphertexts)
        if got != expected:
            raise SecAggError(f"client {client_id!r} addressed shares to {sorted(got - expected)} and not to "
                              f"{sorted(expected - got)}; they must go to exactly its neighbours")
        commitments = {_parse_share(data, client_id)[0] for data in ciphertexts.values()}
        if len(commitments) != 1:
            raise SecAggError(f"client {client_id!r} sent its neighbours different commitments to its seed")
        self._shares[client_id] = dict(ciphertexts)
        self._commitments[client_id] = commitments.pop()

    def shares_for(self, client_id: str) -> dict[str, bytes]:
        """The ciphertexts addressed to `client_id` by its neighbours in U2; closes stage 2."""
        if self._stage < 3:
            self._advance(3)
        if client_id not in self._shares:
            raise SecAggError(f"client {client_id!r} did not send shares, so it takes no part in masking")
        return {v: self._shares[v][client_id] for v in self._graph[client_id] if v in self._shares}

    def add_masked(self, client_id: str) -> None:
        """Stage 3: records that `client_id`'s masked vector was folded into the sum (U3)."""
        self._advance(3)
        if client_id not in self._shares:
            raise SecAggError(f"client {client_id!r} did not send shares, so its masked vector cannot be unmasked")
        if client_id in self._masked:
            raise SecAggError(f"client {client_id!r} already sent its masked vector")
        self._masked.add(client_id)

    def survivors(self) -> list[str]:
        """U3: the clients whose masked vectors are in the sum; closes stage 3."""
        if self._stage < 4:
            self._advance(4)
        return sorted(self._masked)

    def dropped(self) -> list[str]:
        """U2 minus U3: clients that shared keys but sent no masked vector; closes stage 3."""
        if self._stage < 4:
            self._advance(4)
        return sorted(set(self._shares) - self._masked)

    def add_reveal(self, client_id: str, shares: Mapping[str, bytes]) -> None:
        """Stage 4: a survivor's shares of its neighbours' secrets ({owner: share})."""
        self._advance(4)
        if client_id not in self._masked:
            raise SecAggError(f"client {client_id!r} is not a survivor, so it has nothing to reveal")
        if client_id in self._revealers:
            raise SecAggError(f"client {client_id!r} already revealed its shares")
        parsed = {}
        for owner, data in shares.items():
            if owner not in self._graph[client_id] or owner not in self._shares:
                raise SecAggError(f"client {client_id!r} revealed a share of {owner!r}, which sent it none")
            kind, index, share = _parse_reveal(data, client_id)
            if kind != ("b" if owner in self._masked else "s"):
                raise SecAggError(f"client {client_id!r} revealed the wrong secret of {owner!r}")
            if index != self._graph[owner].index(client_id) + 1:
                raise SecAggError(f"client {client_id!r} revealed a share of {owner!r} with the wrong index {index}")
            parsed[owner] = (index, share)
        for owner, (index, share) in parsed.items():
            self._revealed.setdefault(owner, {})[index] = share
        self._revealers.add(client_id)

    def unmask(self, masked_sum: np.ndarray) -> np.ndarray:
        """The exact sum of U3's encode() vectors, from the sum of their masked vectors."""
        if self._stage < 4:
            self._advance(4)
        check_vector(masked_sum, self.params)
        t = self.params.threshold
        alive = self._masked
        if len(alive) < t:
            raise SecAggError(f"only {len(alive)} clients sent masked vectors, fewer than the threshold {t}")
        seeds = [(self._secret(u, "b"), -1) for u in sorted(alive)]
        for d in sorted(set(self._shares) - alive):
            partners = [v for v in self._graph[d] if v in alive]
            if not partners:
                continue
            s_sk = X25519PrivateKey.from_private_bytes(self._secret(d, "s"))
            for v in partners:
                seed = _pairwise_seed(s_sk, self._keys[v][1], d, v, self._context)
                seeds.append((seed, -1 if v < d else 1))  # v added this mask if v < d
        # Every secret is reconstructed before the sum is touched, so an error leaves nothing half done.
        total = masked_sum.copy()
        _add_streams(total, seeds)
        return total

    def _secret(self, owner: str, kind: str) -> bytes:
        """The self-mask seed b (kind 'b') or mask key s_sk ('s') of `owner`, checked against its commitment
        or its advertised s_pk."""
        what = "self-mask seed" if kind == "b" else "mask key"
        shares = self._revealed.get(owner, {})
        t = self.params.threshold
        if len(shares) < t:
            raise SecAggError(f"the {what} of {owner!r} has {len(shares)} revealed shares, fewer than the "
                              f"threshold {t}")
        secret = _reconstruct(shares, t, functools.partial(self._is_secret, owner, kind))
        if secret is None:
            raise SecAggError(f"the revealed shares of {owner!r}'s {what} do not reconstruct it (a share is bad)")
        return secret

    def _is_secret(self, owner: str, kind: str, secret: bytes) -> bool:
        if kind == "b":
            return _commit(secret, owner, self._context) == self._commitments[owner]
        return _public(X25519PrivateKey.from_private_bytes(secret)) == self._keys[owner][1]
