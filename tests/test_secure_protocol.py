"""Secure aggregation's arithmetic (brokerfl.handlers.secure), in process, no broker:
Shamir sharing, the primitives, quantisation, the SecAgg+ stages end to end with dropouts,
the client's refusals (above all: never both shares of one peer), and what a curious server
sees (masked vectors that look uniform and do not correlate with anyone's vector)."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

from brokerfl.handlers.secure import crypto, quantise, shamir
from brokerfl.handlers.secure.protocol import (
    ClientSession,
    ProtocolError,
    Settings,
    can_unmask,
    graph,
    unmask,
    x_of,
)
from brokerfl.handlers.secure.quantise import Quantisation, QuantiseError

# ---------------------------------------------------------------- shamir


def test_shamir_any_t_of_n_rebuilds_the_secret():
    secret = crypto.new_private_key()
    shares = shamir.split(secret, range(1, 8), 4)
    assert set(shares) == set(range(1, 8)) and all(len(y) == shamir.SHARE_BYTES for y in shares.values())
    for subset in itertools.combinations(shares, 4):
        assert shamir.combine({x: shares[x] for x in subset}, 4) == secret
    assert shamir.combine(shares, 4) == secret  # more than t: the first t by x


def test_shamir_64_byte_secret_and_threshold_one():
    secret = bytes(range(64))
    shares = shamir.split(secret, [5, 9, 200], 2)
    assert shamir.combine({9: shares[9], 200: shares[200]}, 2, length=64) == secret
    single = shamir.split(b"\x01" * 32, [1, 2], 1)
    assert shamir.combine({2: single[2]}, 1) == b"\x01" * 32


def test_shamir_fewer_than_t_fails_and_reveals_nothing_obvious():
    secret = crypto.new_private_key()
    shares = shamir.split(secret, range(1, 6), 3)
    with pytest.raises(shamir.ShareError, match="2 shares, threshold 3"):
        shamir.combine({1: shares[1], 2: shares[2]}, 3)
    # t - 1 shares interpolated as if t - 1 were enough: not the secret (and almost surely too big)
    try:
        guess = shamir.combine({1: shares[1], 2: shares[2]}, 2)
    except shamir.ShareError:
        guess = None
    assert guess != secret
    assert all(shares[x] != secret.rjust(shamir.SHARE_BYTES, b"\0") for x in shares)


def test_shamir_corrupt_shares_detected():
    secret = crypto.new_private_key()
    shares = shamir.split(secret, range(1, 6), 3)
    corrupt = dict(shares)
    corrupt[2] = bytes([shares[2][0] ^ 1]) + shares[2][1:]  # a high bit: the result will not fit 32 bytes
    with pytest.raises(shamir.ShareError, match="corrupt"):
        shamir.combine(corrupt, 3)
    with pytest.raises(shamir.ShareError, match="bytes"):
        shamir.combine({**shares, 1: shares[1][:-1]}, 3)
    with pytest.raises(shamir.ShareError, match="field"):
        shamir.combine({**shares, 1: b"\xff" * shamir.SHARE_BYTES}, 3)


@pytest.mark.parametrize(
    ("secret", "xs", "threshold", "message"),
    [
        (b"s", [1, 2], 0, "< 1"),
        (b"s", [1, 2], 3, "> 2 holders"),
        (b"s", [1, 1, 2], 2, "duplicate"),
        (b"s", [0, 1], 2, r"\[1, p\)"),
        (b"s", [1, shamir.PRIME], 2, r"\[1, p\)"),
        (b"s" * 65, [1, 2], 2, "at most 64"),
    ],
)
def test_shamir_split_refuses(secret, xs, threshold, message):
    with pytest.raises(shamir.ShareError, match=message):
        shamir.split(secret, xs, threshold)


# ---------------------------------------------------------------- crypto


def test_agree_is_symmetric_and_bound_to_info():
    a, b = crypto.new_private_key(), crypto.new_private_key()
    A, B = crypto.public_key(a), crypto.public_key(b)
    assert len(A) == len(B) == crypto.KEY_BYTES
    assert crypto.agree(a, B, b"i") == crypto.agree(b, A, b"i")
    assert crypto.agree(a, B, b"i") != crypto.agree(a, B, b"j")
    assert len(crypto.agree(a, B, b"i")) == crypto.KEY_BYTES


@pytest.mark.parametrize(
    "public",
    [
        bytes(32),  # u = 0
        (1).to_bytes(32, "little"),  # u = 1, order 1
        bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),  # order 8
    ],
)
def test_low_order_public_key_refused(public):
    with pytest.raises(crypto.CryptoError):
        crypto.agree(crypto.new_private_key(), public, b"i")


def test_public_key_format_checked():
    crypto.check_public_key(crypto.public_key(crypto.new_private_key()))
    for bad in (b"", bytes(31), bytes(33)):
        with pytest.raises(crypto.CryptoError):
            crypto.check_public_key(bad)
    with pytest.raises(crypto.CryptoError):
        crypto.public_key(bytes(31))


def test_seal_opens_with_its_key_and_aad_only():
    key, other = crypto.new_private_key(), crypto.new_private_key()
    blob = crypto.seal(key, b"shares", b"aad")
    assert crypto.open_sealed(key, blob, b"aad") == b"shares"
    assert crypto.seal(key, b"shares", b"aad") != blob  # a fresh nonce each time
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    nonce_tampered = bytearray(blob)
    nonce_tampered[0] ^= 1
    for k, b, aad in [
        (other, blob, b"aad"),
        (key, bytes(tampered), b"aad"),
        (key, bytes(nonce_tampered), b"aad"),
        (key, blob, b"other aad"),
        (key, blob[:20], b"aad"),
        (key[:16], blob, b"aad"),
    ]:
        with pytest.raises(crypto.CryptoError):
            crypto.open_sealed(k, b, aad)


def test_prg_deterministic_per_key_and_info():
    key = crypto.new_private_key()
    words = crypto.prg_words(key, 1000, b"self")
    assert words.dtype == np.uint64 and words.shape == (1000,)
    assert np.array_equal(words, crypto.prg_words(key, 1000, b"self"))
    assert np.array_equal(words[:10], crypto.prg_words(key, 10, b"self"))  # a prefix: counter from block 0
    assert not np.array_equal(words, crypto.prg_words(key, 1000, b"pair"))
    assert not np.array_equal(words, crypto.prg_words(crypto.new_private_key(), 1000, b"self"))
    assert crypto.prg_words(key, 0, b"self").shape == (0,)
    words[0] = 0  # writable


def test_commitment():
    seed = crypto.new_private_key()
    assert crypto.commitment(seed) == crypto.commitment(seed) and len(crypto.commitment(seed)) == 32
    assert crypto.commitment(seed) != crypto.commitment(crypto.new_private_key())


# ---------------------------------------------------------------- quantise

Q = Quantisation(clip_range=0.5, bits=16, modulus_bits=40)
LIKE = {"b": np.zeros(5, np.float32), "a": np.zeros((3, 4), np.float32)}


def random_delta(rng, scale=0.5):
    return {name: rng.uniform(-scale, scale, np.shape(x)) for name, x in LIKE.items()}


def test_quantisation_properties():
    assert Q.step == pytest.approx(1.0 / 65534)
    assert Q.error_bound == Q.step / 2
    assert quantise.vector_length(LIKE) == 12 + 5 + 2
    most = (2**40 - 1) // (2**16 - 2)  # the largest total weight whose sum cannot wrap
    assert Q.fits(most) and not Q.fits(most + 1) and not Q.fits(2**40)
    for bad in [dict(clip_range=0.0, bits=8, modulus_bits=32), dict(clip_range=1.0, bits=32, modulus_bits=32)]:
        with pytest.raises(QuantiseError):
            Quantisation(**bad)


def test_quantised_weighted_sum_within_the_bound():
    rng = np.random.default_rng(1)  # test data, not secrets
    deltas = [random_delta(rng) for _ in range(10)]
    weights = [int(w) for w in rng.integers(1, 50, 10)]
    total = np.zeros(quantise.vector_length(LIKE), np.uint64)
    for delta, weight in zip(deltas, weights):
        vector, clipped = quantise.encode(delta, weight, Q)
        assert clipped == 0 and vector.dtype == np.uint64
        assert vector[-2] == weight and vector[-1] == 0
        total += vector
    sums, W, clipped = quantise.decode_sum(total & Q.modulus_mask, LIKE, Q)
    assert W == sum(weights) and clipped == 0
    for name, like in LIKE.items():
        exact = sum(w * d[name] for w, d in zip(weights, deltas))
        assert sums[name].shape == like.shape and sums[name].dtype == np.float64
        assert np.max(np.abs(sums[name] - exact)) <= W * Q.step / 2 + 1e-9
        assert np.max(np.abs(sums[name] / W - exact / W)) <= Q.error_bound + 1e-12


def test_a_zero_delta_is_a_level_and_decodes_as_zero():
    zero = {name: np.zeros(like.shape) for name, like in LIKE.items()}
    sums, W, _ = quantise.decode_sum(quantise.encode(zero, 7, Q)[0], LIKE, Q)
    assert W == 7 and all(not np.any(s) for s in sums.values())


def test_clipping_counted():
    delta = {"a": np.full((3, 4), 0.1), "b": np.array([2.0, -3.0, 0.5, -0.5, 0.0])}
    vector, clipped = quantise.encode(delta, 3, Q)
    assert clipped == 2 and vector[-1] == 2 and vector[-2] == 3
    sums, W, total_clipped = quantise.decode_sum(vector, LIKE, Q)
    assert (W, total_clipped) == (3, 2)
    np.testing.assert_allclose(sums["b"], [1.5, -1.5, 1.5, -1.5, 0.0], atol=3 * Q.step)


def test_quantise_refusals():
    delta = random_delta(np.random.default_rng(2))
    with pytest.raises(QuantiseError, match="does not fit"):
        quantise.encode(delta, (2**40 - 1) // (2**16 - 2) + 1, Q)  # the weighted levels would overflow 2^40
    with pytest.raises(QuantiseError, match="< 1"):
        quantise.encode(delta, 0, Q)
    with pytest.raises(QuantiseError, match="NaN"):
        quantise.encode({**delta, "a": np.full((3, 4), np.nan)}, 1, Q)
    with pytest.raises(QuantiseError, match="NaN"):
        quantise.encode({**delta, "b": np.array([np.inf, 0, 0, 0, 0])}, 1, Q)
    vector, _ = quantise.encode(delta, 1, Q)
    with pytest.raises(QuantiseError, match="shape"):
        quantise.decode_sum(vector[:-1], LIKE, Q)
    wrapped = vector.copy()
    wrapped[-2] = (2**40 - 1) // (2**16 - 2) + 1  # a total weight whose sum may have wrapped
    with pytest.raises(QuantiseError, match="wrapped"):
        quantise.decode_sum(wrapped, LIKE, Q)
    wrapped[-2] = 0
    with pytest.raises(QuantiseError, match="is 0"):
        quantise.decode_sum(wrapped, LIKE, Q)


# ---------------------------------------------------------------- the graph


def test_graph_ring_is_symmetric_regular_and_deterministic():
    ids = [f"c{i:02d}" for i in range(30)]
    g = graph(ids, "session-1", 8)
    assert set(g) == set(ids)
    for u, near in g.items():
        assert u not in near and len(near) == 8 and len(set(near)) == 8
        assert all(u in g[v] for v in near)
    assert graph(list(reversed(ids)), "session-1", 8) == g  # callers' order does not matter
    assert graph(ids, "session-2", 8) != g  # the session picks the ring
    assert graph(ids, "session-1", 7) == g  # odd rounds up
    complete = {u: tuple(v for v in ids[:9] if v != u) for u in ids[:9]}
    assert graph(ids[:9], "s", 8) == graph(ids[:9], "s", 20) == complete
    assert x_of(ids, "c00") == 1 and x_of(reversed(ids), "c29") == 30
    with pytest.raises(ProtocolError):
        x_of(ids, "nobody")


# ---------------------------------------------------------------- the protocol end to end

SESSION = "run-1/round-3/secagg"


def make_clients(n, settings, seed=0, session=SESSION):
    """n sessions with quantised random deltas; returns (sessions, plain vectors)."""
    rng = np.random.default_rng(seed)  # test data, not secrets
    q = settings.quantisation
    sessions, vectors = {}, {}
    for i in range(n):
        u = f"c{i:02d}"
        vectors[u], _ = quantise.encode(random_delta(rng, scale=q.clip_range * 1.1), int(rng.integers(1, 20)), q)
        sessions[u] = ClientSession(u, session, settings, vectors[u])
    return sessions, vectors


def run_round(sessions, settings, session=SESSION, drop_after_share=(), drop_after_mask=(), drop_before_share=()):
    """The four stages routed as a server would. drop_before_share: in U1, not U2;
    drop_after_share: in U2, not U3; drop_after_mask: in U3, not revealers. Returns the
    server's view (everything it holds) and the unmasking's keyword arguments."""
    keys = {u: s.advertise() for u, s in sessions.items()}  # U1
    sent = {u: sessions[u].share_keys(keys) for u in keys if u not in drop_before_share}  # U2
    inbox = {}
    for sender, ciphertexts in sent.items():
        for receiver, blob in ciphertexts.items():
            inbox.setdefault(receiver, {})[sender] = blob
    masked = {u: sessions[u].mask(inbox.get(u, {})) for u in sent if u not in drop_after_share}  # U3
    revealed = {}
    for u in masked:
        if u in drop_after_mask:
            continue
        holds = set(inbox.get(u, {}))  # the server says, of the peers u holds shares of, who sent a vector
        revealed[u] = sessions[u].reveal(
            masked=sorted((holds | {u}) & set(masked)), dropped=sorted(holds & (set(sent) - set(masked)))
        )
    args = dict(session=session, settings=settings, keys=keys, shared=set(sent), masked=masked, revealed=revealed)
    return args, {"ciphertexts": sent, "inbox": inbox}


def plain_sum(vectors, ids, q):
    total = np.zeros_like(next(iter(vectors.values())))
    for u in ids:
        total += vectors[u]
    return total & q.modulus_mask


@pytest.mark.parametrize(
    ("n", "neighbours", "threshold", "modulus_bits"),
    [(10, 9, 6, 64), (30, 8, 5, 32)],
)
def test_unmasked_sum_is_the_plain_sum(n, neighbours, threshold, modulus_bits):
    settings = Settings(neighbours, threshold, Quantisation(0.5, 16, modulus_bits))
    sessions, vectors = make_clients(n, settings)
    args, _ = run_round(sessions, settings)
    assert all(len(s.neighbours) == min(neighbours, n - 1) for s in sessions.values())
    assert can_unmask(**args) is None
    total = unmask(**args)
    assert np.array_equal(total, plain_sum(vectors, vectors, settings.quantisation))
    sums, W, _ = quantise.decode_sum(total, LIKE, settings.quantisation)
    assert W == sum(int(v[-2]) for v in vectors.values())


def test_dropouts_after_sharing_and_after_masking():
    settings = Settings(8, 5, Quantisation(0.5, 16, 64))
    sessions, vectors = make_clients(30, settings, seed=3)
    ids = sorted(sessions)
    g = graph(ids, SESSION, 8)
    late = ids[4]  # shares, then no vector
    silent = g[late][:2]  # vectors, then no reveal: two of its neighbours, so its key has fewer holders
    args, _ = run_round(sessions, settings, drop_after_share=[late], drop_after_mask=silent)
    assert late not in args["masked"] and all(u in args["masked"] for u in silent)
    u3 = [u for u in ids if u != late]
    assert np.array_equal(unmask(**args), plain_sum(vectors, u3, settings.quantisation))


def test_dropout_before_sharing_is_simply_absent():
    settings = Settings(4, 3, Quantisation(0.5, 16, 64))
    sessions, vectors = make_clients(10, settings, seed=4)
    args, _ = run_round(sessions, settings, drop_before_share=["c03"], drop_after_share=["c07"])
    u3 = [u for u in sorted(vectors) if u not in ("c03", "c07")]
    assert np.array_equal(unmask(**args), plain_sum(vectors, u3, settings.quantisation))


def short_of(args, t):
    """The clients of U3 with fewer than t revealers among their neighbourhood + themselves."""
    g = graph(sorted(args["keys"]), args["session"], args["settings"].neighbours)
    return {u: n for u in args["masked"] if (n := len((set(g[u]) | {u}) & set(args["revealed"]))) < t}


def test_too_many_dropped_names_the_client():
    settings = Settings(4, 4, Quantisation(0.5, 16, 64))
    sessions, _ = make_clients(10, settings, seed=5)
    g = graph(sorted(sessions), SESSION, 4)
    silent = g["c00"][:2]  # c00's neighbourhood of 5 loses 2 revealers: 3 shares, threshold 4
    args, _ = run_round(sessions, settings, drop_after_mask=silent)
    short = short_of(args, 4)
    assert "c00" in short
    with pytest.raises(ProtocolError, match=r"client (c\d\d)'s self-mask seed: (\d) shares, threshold 4") as caught:
        unmask(**args)
    named, count = re.search(r"client (c\d\d)'s self-mask seed: (\d)", str(caught.value)).groups()
    assert short[named] == int(count)
    assert can_unmask(**args) == str(caught.value)


def test_a_dropped_key_without_enough_holders_names_the_client():
    settings = Settings(4, 3, Quantisation(0.5, 16, 64))
    sessions, _ = make_clients(10, settings, seed=6)
    args, _ = run_round(sessions, settings, drop_after_share=["c05"])
    # the revealers' replies as the journal holds them, all but 2 without c05's key share (lost,
    # or withheld); silent revealers would cost some neighbour its self-mask seed first
    holders = sorted(r for r, (_, s) in args["revealed"].items() if "c05" in s)
    assert len(holders) == 4
    args["revealed"] = {
        r: (b, s if r in holders[:2] else {k: v for k, v in s.items() if k != "c05"})
        for r, (b, s) in args["revealed"].items()
    }
    assert can_unmask(**args) == "client c05's mask key: 2 shares, threshold 3"
    with pytest.raises(ProtocolError, match="client c05's mask key: 2 shares, threshold 3"):
        unmask(**args)


def test_unmask_catches_corrupt_and_forged_shares():
    settings = Settings(4, 3, Quantisation(0.5, 16, 64))
    sessions, _ = make_clients(10, settings, seed=7)
    args, _ = run_round(sessions, settings, drop_after_share=["c02"])
    # a revealer lies about c01's seed: a share of another secret at the same point
    liar = min(r for r, (b, _) in args["revealed"].items() if "c01" in b)
    x = x_of(sorted(args["keys"]), liar)
    b, s = args["revealed"][liar]
    forged = shamir.split(crypto.new_private_key(), [x], 1)[x]
    bad = {**args, "revealed": {**args["revealed"], liar: ({**b, "c01": forged}, s)}}
    with pytest.raises(ProtocolError, match="client c01's self-mask seed"):
        unmask(**bad)
    # and about the dropped c02's key
    liar = min(r for r, (_, s) in args["revealed"].items() if "c02" in s)
    x = x_of(sorted(args["keys"]), liar)
    b, s = args["revealed"][liar]
    forged = shamir.split(crypto.new_private_key(), [x], 1)[x]
    bad = {**args, "revealed": {**args["revealed"], liar: (b, {**s, "c02": forged})}}
    with pytest.raises(ProtocolError, match="client c02's mask key"):
        unmask(**bad)


# ---------------------------------------------------------------- the client's refusals


def three_staged(n=6, neighbours=5, threshold=3, drop_after_share=()):
    """Sessions through stage 3; returns (sessions, keys, inbox, masked ids)."""
    settings = Settings(neighbours, threshold, Quantisation(0.5, 8, 64))
    sessions, _ = make_clients(n, settings, seed=8)
    keys = {u: s.advertise() for u, s in sessions.items()}
    sent = {u: s.share_keys(keys) for u, s in sessions.items()}
    inbox = {v: {u: sent[u][v] for u in sent if v in sent[u]} for v in sessions}
    masked = [u for u in sessions if u not in drop_after_share]
    for u in masked:
        sessions[u].mask(inbox[u])
    return sessions, keys, inbox, masked


def test_never_both_shares_of_one_peer():
    sessions, _, _, _ = three_staged(drop_after_share=["c05"])
    u = sessions["c00"]
    first = u.reveal(masked=["c00", "c01", "c02", "c03", "c04"], dropped=["c05"])
    assert set(first[0]) == {"c00", "c01", "c02", "c03", "c04"} and set(first[1]) == {"c05"}
    assert all(len(share) == shamir.SHARE_BYTES for part in first for share in part.values())
    # the server now says c01 dropped: that would hand it c01's key share too
    with pytest.raises(ProtocolError, match="both"):
        u.reveal(masked=["c00", "c02", "c03", "c04"], dropped=["c01", "c05"])
    # a redelivery (any order) gets the same reply
    assert u.reveal(masked=["c04", "c03", "c02", "c01", "c00"], dropped=["c05"]) == first
    # and any other second request is refused, even a harmless one
    with pytest.raises(ProtocolError, match="already answered"):
        u.reveal(masked=["c00", "c01", "c02", "c03"], dropped=["c05"])


def test_reveal_refusals():
    sessions, _, _, _ = three_staged()
    u = sessions["c00"]
    with pytest.raises(ProtocolError, match="both masked and dropped"):
        u.reveal(masked=["c00", "c01", "c02"], dropped=["c01"])
    with pytest.raises(ProtocolError, match="not among the masked"):
        u.reveal(masked=["c01", "c02", "c03"], dropped=[])
    with pytest.raises(ProtocolError, match="holds no shares of client c99"):
        u.reveal(masked=["c00", "c01", "c99"], dropped=[])
    with pytest.raises(ProtocolError, match="fewer than threshold 3"):
        u.reveal(masked=["c00", "c01"], dropped=["c02", "c03", "c04", "c05"])
    assert u.reveal(masked=["c00", "c01", "c02"], dropped=[])  # the refusals revealed nothing


def test_stages_out_of_order_refused_and_equal_repeats_answered_alike():
    settings = Settings(3, 2, Quantisation(0.5, 8, 64))
    sessions, _ = make_clients(4, settings, seed=9)
    u = sessions["c00"]
    with pytest.raises(ProtocolError, match="share_keys before advertise"):
        u.share_keys({})
    with pytest.raises(ProtocolError, match="mask before share_keys"):
        u.mask({})
    with pytest.raises(ProtocolError, match="reveal before mask"):
        u.reveal(["c00"], [])
    keys = {v: s.advertise() for v, s in sessions.items()}
    assert u.advertise() == keys["c00"]
    sent = {v: s.share_keys(keys) for v, s in sessions.items()}
    assert u.share_keys(dict(reversed(list(keys.items())))) == sent["c00"]  # the same ciphertexts, not new ones
    with pytest.raises(ProtocolError, match="already answered"):
        u.share_keys({k: v for k, v in keys.items() if k != "c03"})
    with pytest.raises(ProtocolError, match="reveal before mask"):
        u.reveal(["c00"], [])
    inbox = {v: {w: sent[w][v] for w in sent if v in sent[w]} for v in sessions}
    y = u.mask(inbox["c00"])
    assert np.array_equal(u.mask(dict(inbox["c00"])), y)
    with pytest.raises(ProtocolError, match="already answered"):
        u.mask({k: b for k, b in inbox["c00"].items() if k != "c01"})
    assert u.advertise() == keys["c00"]  # a late redelivery of stage 1 is still answered alike


def test_share_keys_refusals():
    settings = Settings(5, 3, Quantisation(0.5, 8, 64))
    sessions, _ = make_clients(6, settings, seed=10)
    keys = {v: s.advertise() for v, s in sessions.items()}
    u = sessions["c00"]
    c_pk, s_pk, b_commitment = keys["c00"]
    for bad, message in [
        ({**keys, "c00": (c_pk, keys["c01"][1], b_commitment)}, "own advertised keys"),
        ({k: v for k, v in keys.items() if k != "c00"}, "own advertised keys"),
        ({**keys, "c03": (bytes(31), *keys["c03"][1:])}, "client c03's public key"),
        ({**keys, "c04": (keys["c04"][0], c_pk, keys["c04"][2])}, "share a public key"),  # ours reflected
        ({**keys, "c02": (*keys["c02"][:2], b"short")}, "client c02's commitment"),
    ]:
        with pytest.raises(ProtocolError, match=message):
            u.share_keys(bad)
    few = Settings(2, 4, settings.quantisation)  # 2 neighbours + itself < 4
    lonely = ClientSession("c00", SESSION, few, np.zeros(3, np.uint64))
    others = {v: s.advertise() for v, s in sessions.items() if v != "c00"}
    with pytest.raises(ProtocolError, match="fewer than threshold 4"):
        lonely.share_keys({**others, "c00": lonely.advertise()})


def test_mask_refusals():
    settings = Settings(4, 3, Quantisation(0.5, 8, 64))
    fresh, _ = make_clients(8, settings, seed=11)
    keys = {v: s.advertise() for v, s in fresh.items()}
    sent = {v: s.share_keys(keys) for v, s in fresh.items()}
    inbox = {v: {w: sent[w][v] for w in sent if v in sent[w]} for v in fresh}
    u = fresh["c00"]
    stranger = next(v for v in fresh if v != "c00" and v not in u.neighbours)
    with pytest.raises(ProtocolError, match=f"client {stranger}, not a neighbour"):
        u.mask({**inbox["c00"], stranger: b"x" * 200})
    sender = min(inbox["c00"])
    tampered = bytearray(inbox["c00"][sender])
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError, match=f"from client {sender} do not open"):
        u.mask({**inbox["c00"], sender: bytes(tampered)})
    # a ciphertext moved to another receiver does not open (its associated data names the pair)
    other_receiver = next(v for v in sent[sender] if v != "c00")
    with pytest.raises(ProtocolError, match="do not open"):
        u.mask({**inbox["c00"], sender: sent[sender][other_receiver]})
    with pytest.raises(ProtocolError, match="below threshold 3"):
        u.mask({sender: inbox["c00"][sender]})
    assert u.mask(inbox["c00"]).shape == (quantise.vector_length(LIKE),)  # the refusals left it able


# ---------------------------------------------------------------- a curious server


def test_a_curious_server_learns_only_the_sum():
    settings = Settings(6, 4, Quantisation(0.5, 16, 64))
    rng = np.random.default_rng(12)  # test data, not secrets
    d = 10_000
    sessions, vectors = {}, {}
    for i in range(10):
        u = f"c{i:02d}"
        delta = {"w": rng.normal(0, 0.1, d - 2)}
        vectors[u], _ = quantise.encode(delta, i + 1, settings.quantisation)
        sessions[u] = ClientSession(u, SESSION, settings, vectors[u])
    args, view = run_round(sessions, settings, drop_after_share=["c09"])
    # all the server holds: public keys, ciphertexts, masked vectors, revealed shares
    for u, y in args["masked"].items():
        top = (y >> np.uint64(60)).astype(np.int64)  # the top 4 bits: uniform, 625 per bin expected
        counts = np.bincount(top, minlength=16)
        chi_square = float(np.sum((counts - d / 16) ** 2 / (d / 16)))
        assert chi_square < 62.3, (u, chi_square)  # chi^2 with 15 degrees of freedom, p = 1e-7
        assert not np.any(vectors[u] >> np.uint64(60))  # the plain vector's top bits are all zero
        for v, x in vectors.items():
            r = np.corrcoef(y.astype(np.float64), x.astype(np.float64))[0, 1]
            assert abs(r) < 0.05, (u, v, r)
    # no revealer handed over the key share of a client that sent a vector
    assert not any(set(s) & set(args["masked"]) for _, s in args["revealed"].values())
    # the ciphertexts carry no share in the clear
    for ciphertexts in view["ciphertexts"].values():
        for blob in ciphertexts.values():
            assert len(blob) == 12 + 2 * shamir.SHARE_BYTES + 16
    # while the unmasked sum is exact
    assert np.array_equal(unmask(**args), plain_sum(vectors, [f"c{i:02d}" for i in range(9)], settings.quantisation))
