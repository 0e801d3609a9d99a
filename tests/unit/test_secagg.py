"""Secure aggregation's cryptographic core (common/secagg.py): exact sums, dropouts, refusals, hostile bytes."""
from __future__ import annotations

import contextlib
from collections.abc import Collection

import numpy as np
import pytest

from common import secagg, secagg_crypto
from common.secagg import SecAggError, SecAggParams, decode, encode, neighbours
from common.secagg_sessions import ClientSession, ServerSession

IDS = [f"client-{i}" for i in range(10)]


class Round:
    """Drives one round of clients and server in-process, with dropouts at chosen stages."""

    def __init__(self, params: SecAggParams, ids: list[str] = IDS, seed: int = 0):
        self.params, self.ids = params, ids
        self.clients = {c: ClientSession(c, params) for c in ids}
        self.server = ServerSession(params, ids)
        self.rng = np.random.default_rng(seed)
        self.encoded: dict[str, np.ndarray] = {}
        self.masked: dict[str, np.ndarray] = {}

    def keys(self, absent: Collection[str] = ()) -> None:
        for c in self.ids:
            if c not in absent:
                self.server.add_keys(c, self.clients[c].advertise())

    def shares(self, absent: Collection[str] = ()) -> None:
        roster = self.server.roster()
        for c in roster:
            if c not in absent:
                self.server.add_shares(c, self.clients[c].share_keys(roster))

    def mask(self, absent: Collection[str] = ()) -> np.ndarray:
        total = np.zeros(self.params.length + 1, dtype=np.uint64)
        for c in sorted(set(self.server._shares) - set(absent)):
            values = self.rng.normal(scale=0.5, size=self.params.length)
            self.encoded[c] = encode(values, int(self.rng.integers(1, 1000)), self.params)
            self.masked[c] = self.clients[c].mask(self.encoded[c], self.server.shares_for(c))
            self.server.add_masked(c)
            total += self.masked[c]
        return total

    def reveal(self, absent: Collection[str] = ()) -> None:
        survivors, dropped = self.server.survivors(), self.server.dropped()
        for c in survivors:
            if c not in absent:
                self.server.add_reveal(c, self.clients[c].reveal(survivors, dropped))

    def expected(self) -> np.ndarray:
        total = np.zeros(self.params.length + 1, dtype=np.uint64)
        for vector in self.encoded.values():
            total += vector
        return total

    def run(self, keys=(), shares=(), mask=(), reveal=()) -> tuple[np.ndarray, np.ndarray]:
        self.keys(keys)
        self.shares(shares)
        total = self.mask(mask)
        self.reveal(reveal)
        return self.server.unmask(total), self.expected()


PLAIN = SecAggParams(length=300, threshold=3)
SPARSE = SecAggParams(length=300, threshold=3, neighbours=4, round_seed=11)
SPARSE_T2 = SecAggParams(length=300, threshold=2, neighbours=4, round_seed=11)


# --- fixed point ------------------------------------------------------------------------------------

def test_weighted_mean_of_encodings_is_within_the_fixed_point_bound():
    params = SecAggParams(length=1000, threshold=2, clip=4.0)
    rng = np.random.default_rng(1)
    values = [rng.uniform(-3, 3, size=1000) for _ in range(5)]
    weights = [1, 7, 300, 2**20, 55]
    total = np.sum([encode(v, w, params) for v, w in zip(values, weights)], axis=0, dtype=np.uint64)
    mean, weight = decode(total, params)
    assert weight == sum(weights)
    exact = np.average(values, axis=0, weights=weights)
    assert np.max(np.abs(mean - exact)) <= 2.0 ** -(params.scale_bits + 1) * 1.001


def test_values_are_clipped_and_the_weight_rides_in_the_last_slot():
    params = SecAggParams(length=4, threshold=2, clip=1.0, scale_bits=8)
    vector = encode(np.array([5.0, -5.0, 0.5, -0.25]), 3, params)
    assert vector.dtype == np.uint64 and vector.shape == (5,)
    assert vector[:-1].view(np.int64).tolist() == [3 * 256, -3 * 256, 3 * 128, -3 * 64]
    assert int(vector[-1]) == 3
    mean, weight = decode(vector, params)
    assert mean.tolist() == [1.0, -1.0, 0.5, -0.25] and weight == 3


def test_encode_and_decode_refuse_what_they_cannot_carry():
    params = SecAggParams(length=3, threshold=2)
    with pytest.raises(ValueError, match="NaN"):
        encode(np.array([0.0, np.nan, 1.0]), 1, params)
    with pytest.raises(ValueError, match="weight"):
        encode(np.zeros(3), params.max_weight + 1, params)
    with pytest.raises(ValueError, match="shape"):
        encode(np.zeros(4), 1, params)
    with pytest.raises(SecAggError, match="total weight is 0"):
        decode(np.zeros(4, dtype=np.uint64), params)
    with pytest.raises(SecAggError, match="still masked"):
        decode(np.full(4, 2**62, dtype=np.uint64), params)


def test_parameters_that_could_overflow_or_leak_are_refused():
    with pytest.raises(ValueError, match="overflow"):
        SecAggParams(length=10, threshold=2, scale_bits=24)
    with pytest.raises(ValueError, match="threshold"):
        SecAggParams(length=10, threshold=1)
    with pytest.raises(ValueError, match="exceeds the 4 neighbours"):
        SecAggParams(length=10, threshold=5, neighbours=4)
    SecAggParams(length=10, threshold=2, scale_bits=23)  # the defaults leave this much headroom


# --- the whole protocol -----------------------------------------------------------------------------

@pytest.mark.parametrize("params", [PLAIN, SPARSE, SecAggParams(length=300, threshold=5, neighbours=0),
                                    SecAggParams(length=300, threshold=4, neighbours=5, round_seed=3)])
def test_unmasked_sum_is_exactly_the_sum_of_encodings(params):
    got, expected = Round(params).run()
    assert np.array_equal(got, expected)
    mean, weight = decode(got, params)
    assert weight == int(expected[-1])


@pytest.mark.parametrize("params, gone", [(PLAIN, ["client-3"]), (PLAIN, ["client-3", "client-7"]),
                                          (SPARSE, ["client-3"]), (SPARSE_T2, ["client-3", "client-7"])])
def test_clients_dropping_after_sharing_keys_leave_the_exact_sum_of_the_rest(params, gone):
    r = Round(params)
    got, expected = r.run(mask=gone)
    assert r.server.dropped() == gone
    assert len(r.encoded) == 10 - len(gone) and np.array_equal(got, expected)


def test_clients_dropping_before_sharing_keys_are_simply_left_out():
    r = Round(SPARSE_T2)
    got, expected = r.run(keys=["client-0"], shares=["client-5"])
    assert "client-0" not in r.server.roster() and r.server.dropped() == []
    assert np.array_equal(got, expected)


@pytest.mark.parametrize("params", [PLAIN, SPARSE_T2])
def test_survivors_that_do_not_reveal_are_covered_by_the_others_shares(params):
    got, expected = Round(params).run(mask=["client-1"], reveal=["client-2", "client-8"])
    assert np.array_equal(got, expected)


def test_fewer_survivors_than_the_threshold_give_an_error_not_a_sum():
    r = Round(PLAIN)
    r.keys()
    r.shares()
    total = r.mask(absent=IDS[2:])
    survivors, dropped = r.server.survivors(), r.server.dropped()
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        r.clients[survivors[0]].reveal(survivors, dropped)
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        r.server.unmask(total)


def test_a_secret_with_too_few_revealed_shares_gives_an_error():
    r = Round(SPARSE)
    r.keys()
    r.shares()
    total = r.mask()
    r.reveal(absent=IDS[:6])
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        r.server.unmask(total)


def test_a_bad_revealed_share_is_outvoted_when_there_are_more_than_t_and_caught_when_there_are_t():
    r = Round(PLAIN)
    r.keys()
    r.shares()
    total = r.mask(absent=["client-9"])
    survivors, dropped = r.server.survivors(), r.server.dropped()
    for c in survivors:
        shares = r.clients[c].reveal(survivors, dropped)
        if c == "client-0":  # its shares of client-1's seed and of client-9's mask key are wrong
            shares = {o: s[:-1] + bytes([s[-1] ^ 1]) if o in ("client-1", "client-9") else s for o, s in shares.items()}
        r.server.add_reveal(c, shares)
    assert np.array_equal(r.server.unmask(total), r.expected())

    r = Round(SecAggParams(length=20, threshold=2, neighbours=2))
    r.keys()
    r.shares()
    total = r.mask()
    survivors = r.server.survivors()
    victim = survivors[0]
    for c in survivors:
        shares = r.clients[c].reveal(survivors, [])
        if victim in shares and c == r.server._graph[victim][0]:
            shares[victim] = shares[victim][:-1] + bytes([shares[victim][-1] ^ 1])
        r.server.add_reveal(c, shares)
    with pytest.raises(SecAggError, match="do not reconstruct"):
        r.server.unmask(total)


def test_a_masked_vector_alone_looks_random_while_the_sum_is_exact():
    params = SecAggParams(length=10_000, threshold=3, neighbours=4, round_seed=5)
    update = np.sin(np.arange(params.length) / 50.0)  # far from random
    first, second = Round(params, seed=1), Round(params, seed=1)
    for r in (first, second):
        r.keys()
        r.shares()
    vector = encode(update, 10, params)
    masked = first.clients["client-0"].mask(vector, first.server.shares_for("client-0"))
    again = second.clients["client-0"].mask(vector, second.server.shares_for("client-0"))
    assert not np.array_equal(masked, again)
    assert np.mean(masked == again) < 0.001

    r_coef = np.corrcoef(masked.astype(np.float64), vector.view(np.int64).astype(np.float64))[0, 1]
    assert abs(r_coef) < 0.05
    raw = masked.view(np.uint8)
    bits = np.unpackbits(raw).reshape(-1, 64).mean(axis=0)  # each bit position of the uint64s
    assert np.all(np.abs(bits - 0.5) < 0.02)
    counts = np.bincount(raw, minlength=256)
    expected = raw.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 255 + 6 * np.sqrt(2 * 255)  # 255 degrees of freedom: mean 255, sd 22.6

    first.server.add_masked("client-0")
    first.encoded["client-0"] = vector
    total = masked + first.mask(absent=["client-0"])
    first.reveal()
    assert np.array_equal(first.server.unmask(total), first.expected())


# --- refusals ---------------------------------------------------------------------------------------

def _masked_round(params: SecAggParams = PLAIN) -> Round:
    r = Round(params)
    r.keys()
    r.shares()
    r.mask()
    return r


def test_reveal_refuses_requests_that_could_expose_an_update():
    r = _masked_round()
    client = r.clients["client-0"]
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        client.reveal(IDS, ["client-4"])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        client.reveal(IDS[:2], IDS[2:])
    with pytest.raises(SecAggError, match="not among the survivors"):
        client.reveal(IDS[1:], [])
    first = client.reveal(IDS[:5], IDS[5:])
    assert client.reveal(IDS[:5], IDS[5:]) == first  # a retry gets the same answer
    with pytest.raises(SecAggError, match="already answered"):
        client.reveal(IDS, [])


def test_a_client_masks_once_and_only_after_sharing_keys():
    params = SecAggParams(length=5, threshold=2)
    with pytest.raises(SecAggError, match="after share_keys"):
        ClientSession("a", params).mask(np.zeros(6, dtype=np.uint64), {})
    with pytest.raises(SecAggError, match="after mask"):
        ClientSession("a", params).reveal(["a", "b"], [])
    r = _masked_round()
    with pytest.raises(SecAggError, match="already called"):
        r.clients["client-0"].mask(r.encoded["client-0"], r.server.shares_for("client-0"))


def test_stages_close_so_every_client_sees_the_same_sets():
    r = Round(PLAIN)
    r.keys(absent=["client-9"])
    roster = r.server.roster()
    with pytest.raises(SecAggError, match="advertise stage"):
        r.server.add_keys("client-9", r.clients["client-9"].advertise())
    for c in IDS[:8]:
        r.server.add_shares(c, r.clients[c].share_keys(roster))
    r.server.shares_for("client-0")
    with pytest.raises(SecAggError, match="share keys stage"):
        r.server.add_shares("client-8", r.clients["client-8"].share_keys(roster))
    with pytest.raises(SecAggError, match="did not send shares"):
        r.server.add_masked("client-8")


def test_too_few_clients_for_the_threshold_are_refused_before_any_share():
    r = Round(SecAggParams(length=5, threshold=3, neighbours=4), ids=IDS[:3])
    r.keys()
    with pytest.raises(SecAggError, match="too few"):
        r.server.roster()
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        r.clients["client-0"].share_keys({c: r.clients[c].advertise() for c in IDS[:3]})


# --- hostile bytes ----------------------------------------------------------------------------------

def test_malformed_advertisements_are_refused():
    server = ServerSession(PLAIN, IDS)
    good = ClientSession("client-0", PLAIN).advertise()
    for bad in (good[:-1], good + b"\0", b"\x02" + good[1:], b"", bytes(66), b"\x01A" + bytes(64)):
        with pytest.raises(SecAggError):
            server.add_keys("client-0", bad)
    with pytest.raises(SecAggError, match="not selected"):
        server.add_keys("stranger", good)
    server.add_keys("client-0", good)
    with pytest.raises(SecAggError, match="already"):
        server.add_keys("client-0", good)


def test_shares_must_go_to_exactly_the_neighbours_and_be_well_formed():
    r = Round(SPARSE)
    r.keys()
    roster = r.server.roster()
    bundle = r.clients["client-0"].share_keys(roster)
    stranger = next(c for c in IDS if c != "client-0" and c not in bundle)
    one = next(iter(bundle))
    for bad in ({**bundle, stranger: bundle[one]},
                {k: v for k, v in bundle.items() if k != one},
                {**bundle, one: bundle[one][:-1]},
                {**bundle, one: b"\x01S" + bytes(32) + bundle[one][34:]}):  # another commitment
        with pytest.raises(SecAggError):
            r.server.add_shares("client-0", bad)
    r.server.add_shares("client-0", bundle)


def test_tampered_or_misaddressed_share_ciphertexts_are_refused_by_the_receiver():
    r = Round(PLAIN)
    r.keys()
    r.shares()
    received = r.server.shares_for("client-0")
    vector = encode(np.zeros(PLAIN.length), 1, PLAIN)
    sender = "client-1"
    data = received[sender]
    for bad in (data[:-1] + bytes([data[-1] ^ 1]), data[:2] + bytes([data[2] ^ 1]) + data[3:], data[:100]):
        with pytest.raises(SecAggError):
            r.clients["client-0"].mask(vector, {**received, sender: bad})
    with pytest.raises(SecAggError, match="does not authenticate"):  # addressed to client-2, not client-0
        r.clients["client-0"].mask(vector, {**received, sender: r.server.shares_for("client-2")[sender]})
    with pytest.raises(SecAggError, match="not this client's neighbours"):
        r.clients["client-0"].mask(vector, {**received, "client-0": data})
    r.clients["client-0"].mask(vector, received)  # the failures changed nothing


def test_hostile_reveals_are_refused():
    r = _masked_round(SPARSE)
    survivors = r.server.survivors()
    holder = "client-0"
    shares = r.clients[holder].reveal(survivors, [])
    owner = next(iter(shares))
    stranger = next(c for c in IDS if c != holder and c not in r.server._graph[holder])
    s_kind = shares[owner][:2] + b"s" + shares[owner][3:]
    wrong_index = shares[owner][:3] + (999).to_bytes(4, "big") + shares[owner][7:]
    for bad in ({stranger: shares[owner]}, {owner: s_kind}, {owner: wrong_index}, {owner: shares[owner][:-1]}):
        with pytest.raises(SecAggError):
            r.server.add_reveal(holder, bad)
    r.server.add_reveal(holder, shares)
    with pytest.raises(SecAggError, match="already revealed"):
        r.server.add_reveal(holder, shares)


def test_low_order_public_keys_are_refused():
    server = ServerSession(PLAIN, IDS)
    with pytest.raises(SecAggError, match="no shared secret"):
        server.add_keys("client-0", b"\x01A" + bytes(32) + bytes(32))


def test_packed_maps_and_vectors_round_trip_and_refuse_every_truncation():
    entries = {"b": b"\x01\x02", "a": b"", "é": b"x" * 130}
    packed = secagg.pack_map(entries)
    assert secagg.unpack_map(packed) == entries
    for cut in range(len(packed)):
        with pytest.raises(SecAggError):
            secagg.unpack_map(packed[:cut])
    rng = np.random.default_rng(3)
    for _ in range(300):
        noise = bytes(rng.integers(0, 256, size=int(rng.integers(0, 40)), dtype=np.uint8))
        for data in (noise, b"\x01M" + noise):
            with contextlib.suppress(SecAggError):  # anything else fails the test
                secagg.unpack_map(data)
    with pytest.raises(SecAggError, match="twice"):
        secagg.unpack_map(b"\x01M\0\0\0\x02" + 2 * b"\0\x01a\0\0\0\0")
    params = SecAggParams(length=3, threshold=2)
    vector = np.array([1, 2**64 - 1, 0, 5], dtype=np.uint64)
    assert np.array_equal(secagg.unpack_vector(secagg.pack_vector(vector, params), params), vector)
    with pytest.raises(SecAggError):
        secagg.unpack_vector(b"\0" * 31, params)
    with pytest.raises(SecAggError):
        ServerSession(params, ["a", "b"]).unmask(np.zeros(4, dtype=np.int64))


# --- the graph --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, k, degree", [(10, 4, 4), (10, 3, 3), (11, 3, 4), (11, 4, 4), (30, 6, 6), (7, 6, 6),
                                          (7, 9, 6), (10, 0, 9), (5, 8, 4)])
def test_graph_is_symmetric_regular_and_deterministic(n, k, degree):
    params = SecAggParams(length=1, threshold=2, neighbours=k, round_seed=42) if k else \
        SecAggParams(length=1, threshold=2)
    ids = [f"c{i}" for i in range(n)]
    graph = neighbours(ids, params)
    assert set(graph) == set(ids)
    for c, near in graph.items():
        assert len(near) == degree and c not in near and list(near) == sorted(set(near))
        assert all(c in graph[v] for v in near)
    assert neighbours(list(reversed(ids)), params) == graph


def test_graph_depends_on_the_round_seed():
    ids = [f"c{i}" for i in range(40)]
    graphs = [neighbours(ids, SecAggParams(length=1, threshold=2, neighbours=4, round_seed=s)) for s in range(3)]
    assert graphs[0] != graphs[1] != graphs[2]
    with pytest.raises(SecAggError, match="twice"):
        neighbours(["a", "a"], SecAggParams(length=1, threshold=2))


def test_masks_made_block_by_block_are_the_aes_ctr_keystream():
    seeds = [(bytes(range(32)), 1), (bytes(32), -1)]
    count = 2 * secagg_crypto._BLOCK + 3  # blocks and a ragged end
    out = np.arange(count, dtype=np.uint64)
    secagg_crypto._add_streams(out, seeds)
    assert np.array_equal(out, np.arange(count, dtype=np.uint64) + secagg_crypto.prg(seeds[0][0], count)
                          - secagg_crypto.prg(seeds[1][0], count))
