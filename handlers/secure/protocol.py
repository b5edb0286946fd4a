"""SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", after Bonawitz et al. 2017): the client's four stages and the server's unmasking.

Each client u has a vector x_u (:func:`.quantise.encode`'s), and the server learns
sum_{u in U3} x_u mod 2^m and nothing about any one x_u. The rounds, with U1 ⊇ U2 ⊇ U3 ⊇ U4
the clients still answering at each:

1. advertise: u makes two X25519 key pairs, c (encrypts shares) and s (pairwise masks), and
   a self-mask seed b_u; it sends (c_pk, s_pk, commitment(b_u)). U1: those that advertised.
2. share keys: the server sends everyone U1's keys. The neighbour graph N over U1 is a
   function of the session (:func:`graph`: no party chooses it). u Shamir-shares b_u and
   s_sk_u, threshold t, among N(u) ∪ {u}, and sends each neighbour v its two shares sealed
   with agree(c_sk_u, c_pk_v). U2: those that sent shares.
3. mask: u receives the shares its neighbours in U2 sent it, and sends

       y_u = x_u + PRG(b_u) + sum_{v in N(u) ∩ U2} sign(u, v) PRG(s_uv)   (mod 2^m),

   s_uv = agree(s_sk_u, s_pk_v) = agree(s_sk_v, s_pk_u), sign(u, v) = +1 if u < v else -1,
   so the pairwise masks of two clients that both send cancel in the sum. U3: those that sent.
4. reveal: the server names U3 and U2 \\ U3; each u in U4 returns its b shares of the peers
   that sent a vector and its s_sk shares of the peers that did not.

The server rebuilds b_v for v in U3 (removing its self mask) and s_sk_v for v in U2 \\ U3
(removing the pairwise masks its neighbours in U3 added with it); what is left is the sum.

Decisions:
- **The invariant** that keeps a vector private against a server that lies about who
  dropped: a client never reveals both the b share and the s_sk share of one peer (with b_v
  and s_sk_v the server could strip every mask from y_v). :meth:`ClientSession.reveal` is
  answered once; a repeat of the same request gets the same answer (a redelivery), any
  other is refused.
- A stage repeated with an equal request returns its first reply (messages are redelivered
  after a crash); a stage out of order, or repeated with another request, is refused.
- The graph: the ids on a ring in an order from SHA-256 of the session, each joined to the
  k/2 before and after it (Bell et al.'s random k-regular graph replaced by a random ring
  lattice: as symmetric, computable by everyone, and k-regular). Complete when k >= n - 1.
- Shares are points x = 1 + the holder's index in sorted(U1), so a share says whose it is.
- Every derived key is bound to its purpose and the session through HKDF's info; the sealed
  shares' associated data binds session, sender and receiver, so a server cannot move a
  ciphertext to another pair or session.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from brokerfl.handlers.secure import crypto, shamir
from brokerfl.handlers.secure.quantise import Quantisation

Keys = tuple[bytes, bytes, bytes]  # (c_pk, s_pk, commitment(b))
_SHARES_PLAINTEXT = 2 * shamir.SHARE_BYTES  # b share || s_sk share


class ProtocolError(ValueError):
    """A stage refused, or a sum that cannot be unmasked (the message says which rule)."""


@dataclass(frozen=True)
class Settings:
    neighbours: int  # k: each client's neighbours in the graph (rounded up to even)
    threshold: int  # t: shares needed to rebuild a client's secret
    quantisation: Quantisation

    def __post_init__(self) -> None:
        if self.neighbours < 1:
            raise ProtocolError(f"neighbours {self.neighbours} < 1")
        if self.threshold < 1:
            raise ProtocolError(f"threshold {self.threshold} < 1")


# ---------------------------------------------------------------- the graph and the infos


def _frame(*parts: str | bytes) -> bytes:
    """Parts, each length-prefixed, so no two tuples give the same bytes."""
    out = bytearray()
    for part in parts:
        raw = part.encode() if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def graph(ids: Sequence[str], session: str, neighbours: int) -> dict[str, tuple[str, ...]]:
    """Each id's neighbours (sorted, never itself), a function of the ids' set and the session."""
    ordered = sorted(ids)
    if len(set(ordered)) != len(ordered):
        raise ProtocolError("duplicate client ids in the graph")
    n = len(ordered)
    if neighbours >= n - 1:
        return {u: tuple(v for v in ordered if v != u) for u in ordered}
    seed = hashlib.sha256(_frame("brokerfl secagg graph", session)).digest()
    ring = sorted(ordered, key=lambda u: (hashlib.sha256(seed + u.encode()).digest(), u))
    half = (neighbours + 1) // 2  # odd k rounds up to even
    position = {u: p for p, u in enumerate(ring)}
    out = {}
    for u in ordered:
        p = position[u]
        near = {ring[(p + j) % n] for j in range(-half, half + 1) if j != 0}
        near.discard(u)
        out[u] = tuple(sorted(near))
    return out


def x_of(ids: Sequence[str], client_id: str) -> int:
    """A holder's Shamir point: 1 + its index in sorted(ids)."""
    ordered = sorted(ids)
    try:
        return 1 + ordered.index(client_id)
    except ValueError:
        raise ProtocolError(f"client {client_id} is not among the session's clients") from None


def _share_key_info(session: str) -> bytes:
    return _frame("brokerfl secagg share encryption", session)


def _pair_key_info(session: str) -> bytes:
    return _frame("brokerfl secagg pairwise key", session)


def _shares_aad(session: str, sender: str, receiver: str) -> bytes:
    return _frame("brokerfl secagg shares", session, sender, receiver)


_SELF_MASK = b"brokerfl secagg self mask"
_PAIR_MASK = b"brokerfl secagg pairwise mask"


def _sign(u: str, v: str) -> int:
    return 1 if u < v else -1


def _pairwise_mask(
    s_private: bytes | crypto.X25519PrivateKey, s_public_peer: bytes, session: str, count: int
) -> np.ndarray:
    return crypto.prg_words(crypto.agree(s_private, s_public_peer, _pair_key_info(session)), count, _PAIR_MASK)


def _normal_keys(keys: Mapping[str, tuple[bytes, bytes, bytes]]) -> dict[str, Keys]:
    out = {}
    for client, entry in keys.items():
        if len(entry) != 3:
            raise ProtocolError(f"client {client}'s keys are not (c_pk, s_pk, commitment)")
        c_pk, s_pk, b_commitment = entry
        out[str(client)] = (bytes(c_pk), bytes(s_pk), bytes(b_commitment))
    return out


# ---------------------------------------------------------------- the client


class ClientSession:
    """One client's side of one session: its secrets never leave it but as shares and a
    masked vector. Stages in order, each answered once (an equal repeat: the same reply)."""

    _STAGES = ("advertise", "share_keys", "mask", "reveal")

    def __init__(self, client_id: str, session: str, settings: Settings, vector: np.ndarray) -> None:
        vector = np.asarray(vector)
        if vector.ndim != 1 or not np.issubdtype(vector.dtype, np.integer):
            raise ProtocolError(f"the vector must be 1-D integers, not {vector.dtype} {vector.shape}")
        self.client_id = client_id
        self.session = session
        self.settings = settings
        self._mask_bits = settings.quantisation.modulus_mask
        self._vector = vector.astype(np.uint64) & self._mask_bits  # a copy: the caller's may change
        self._c_sk = crypto.new_private_key()
        self._s_sk = crypto.new_private_key()
        self._c_key, self._s_key = crypto.private_key_object(self._c_sk), crypto.private_key_object(self._s_sk)
        self._b = secrets.token_bytes(crypto.KEY_BYTES)  # the OS's CSPRNG
        self._advertised: Keys = (
            crypto.public_key(self._c_sk),
            crypto.public_key(self._s_sk),
            crypto.commitment(self._b),
        )
        self._done: dict[str, tuple[Any, Any]] = {}  # stage -> (request, reply)
        self._keys: dict[str, Keys] = {}
        self._neighbours: tuple[str, ...] = ()
        self._own_shares: tuple[bytes, bytes] = (b"", b"")
        self._received: dict[str, tuple[bytes, bytes]] = {}  # sender -> (b share, s_sk share)
        self._share_keys: dict[str, bytes] = {}  # neighbour -> the key of the shares between us
        self._revealed_b: set[str] = set()
        self._revealed_s: set[str] = set()

    # the stage machine: an equal repeat answers from here, else order is enforced

    def _repeat_or_check(self, stage: str, request: Any) -> tuple[bool, Any]:
        if stage in self._done:
            first, reply = self._done[stage]
            if first == request:
                return True, reply
            raise ProtocolError(f"{stage} was already answered for another request (each stage once)")
        index = self._STAGES.index(stage)
        if index > 0 and self._STAGES[index - 1] not in self._done:
            raise ProtocolError(f"{stage} before {self._STAGES[index - 1]}")
        return False, None

    @property
    def neighbours(self) -> tuple[str, ...]:
        """This client's neighbours in the session's graph (after share_keys)."""
        return self._neighbours

    def advertise(self) -> tuple[bytes, bytes, bytes]:
        """Stage 1: (c_pk, s_pk, commitment(b))."""
        repeated, reply = self._repeat_or_check("advertise", ())
        if repeated:
            return reply
        self._done["advertise"] = ((), self._advertised)
        return self._advertised

    def share_keys(self, keys: Mapping[str, tuple[bytes, bytes, bytes]]) -> dict[str, bytes]:
        """Stage 2: U1's keys -> {neighbour: sealed (b share, s_sk share)}."""
        request = _normal_keys(keys)
        repeated, reply = self._repeat_or_check("share_keys", request)
        if repeated:
            return dict(reply)
        me = self.client_id
        if request.get(me) != self._advertised:
            raise ProtocolError(f"the keys do not hold client {me}'s own advertised keys unchanged")
        seen: dict[bytes, str] = {}
        for client, (c_pk, s_pk, b_commitment) in sorted(request.items()):
            for key in (c_pk, s_pk):
                try:
                    crypto.check_public_key(key)
                except crypto.CryptoError as error:
                    raise ProtocolError(f"client {client}'s public key: {error}") from None
                # one key under two names (or ours reflected back) would make masks cancel wrongly
                if key in seen:
                    raise ProtocolError(f"client {client} and client {seen[key]} share a public key")
                seen[key] = client
            if len(b_commitment) != 32:
                raise ProtocolError(f"client {client}'s commitment is {len(b_commitment)} bytes, not 32")
        ids = sorted(request)
        near = graph(ids, self.session, self.settings.neighbours)[me]
        t = self.settings.threshold
        if len(near) + 1 < t:
            raise ProtocolError(f"client {me} has {len(near)} neighbours + itself, fewer than threshold {t}")
        holders = [*near, me]
        points = {holder: x_of(ids, holder) for holder in holders}
        b_shares = shamir.split(self._b, list(points.values()), t)
        s_shares = shamir.split(self._s_sk, list(points.values()), t)
        info = _share_key_info(self.session)
        out = {}
        for v in near:
            try:
                key = crypto.agree(self._c_key, request[v][0], info)
            except crypto.CryptoError as error:
                raise ProtocolError(f"client {v}'s encryption key: {error}") from None
            x = points[v]
            out[v] = crypto.seal(key, b_shares[x] + s_shares[x], _shares_aad(self.session, me, v))
            self._share_keys[v] = key  # opens v's shares in stage 3: one agreement per pair, not two
        self._keys = request
        self._neighbours = near
        self._own_shares = (b_shares[points[me]], s_shares[points[me]])
        self._done["share_keys"] = (request, out)
        return dict(out)

    def mask(self, ciphertexts: Mapping[str, bytes]) -> np.ndarray:
        """Stage 3: the neighbours' sealed shares (by sender) -> the masked vector."""
        request = {str(sender): bytes(blob) for sender, blob in ciphertexts.items()}
        repeated, reply = self._repeat_or_check("mask", request)
        if repeated:
            return reply.copy()
        me, near = self.client_id, set(self._neighbours)
        for sender in sorted(request):
            if sender not in near:
                raise ProtocolError(f"shares from client {sender}, not a neighbour of client {me}")
        t = self.settings.threshold
        if len(request) + 1 < t:
            raise ProtocolError(f"client {me} got shares from {len(request)} neighbours + itself, below threshold {t}")
        info = _share_key_info(self.session)
        received = {}
        for sender in sorted(request):
            try:
                key = self._share_keys.get(sender) or crypto.agree(self._c_key, self._keys[sender][0], info)
                plaintext = crypto.open_sealed(key, request[sender], _shares_aad(self.session, sender, me))
            except crypto.CryptoError as error:
                raise ProtocolError(f"the shares from client {sender} do not open: {error}") from None
            if len(plaintext) != _SHARES_PLAINTEXT:
                raise ProtocolError(f"the shares from client {sender} are {len(plaintext)} bytes")
            received[sender] = (plaintext[: shamir.SHARE_BYTES], plaintext[shamir.SHARE_BYTES :])
        count = self._vector.shape[0]
        y = self._vector + crypto.prg_words(self._b, count, _SELF_MASK)
        for v in sorted(received):
            pairwise = _pairwise_mask(self._s_key, self._keys[v][1], self.session, count)
            y = y + pairwise if _sign(me, v) > 0 else y - pairwise  # uint64: wraps mod 2^64
        y &= self._mask_bits
        self._received = received
        self._done["mask"] = (request, y)
        return y.copy()

    def reveal(self, masked: Sequence[str], dropped: Sequence[str]) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """Stage 4: (b shares of the peers in ``masked``, s_sk shares of those in ``dropped``)."""
        u3, gone = frozenset(masked), frozenset(dropped)
        request = (u3, gone)
        me = self.client_id
        if "reveal" in self._done and self._done["reveal"][0] != request:
            both = (self._revealed_b | u3) & (self._revealed_s | gone)
            if both:
                raise ProtocolError(
                    f"client {me} will not reveal both the self-mask and the key share of client {min(both)}"
                )
        repeated, reply = self._repeat_or_check("reveal", request)
        if repeated:
            return dict(reply[0]), dict(reply[1])
        overlap = u3 & gone
        if overlap:
            raise ProtocolError(f"client {min(overlap)} is both masked and dropped")
        if me not in u3:
            raise ProtocolError(f"client {me} is not among the masked")
        for peer in sorted(u3 | gone):
            if peer != me and peer not in self._received:
                raise ProtocolError(f"client {me} holds no shares of client {peer}")
        if me in gone:
            raise ProtocolError(f"client {me} is told it dropped")
        t = self.settings.threshold
        if len(u3) < t:  # u3 is within the neighbourhood and itself, checked above
            raise ProtocolError(f"{len(u3)} of client {me}'s neighbourhood + itself masked, fewer than threshold {t}")
        # the invariant, checked again where the shares leave (not an assert: -O must not drop it)
        if (self._revealed_b | u3) & (self._revealed_s | gone):
            raise ProtocolError(f"client {me} will not reveal both shares of one peer")
        b_out = {peer: (self._own_shares[0] if peer == me else self._received[peer][0]) for peer in sorted(u3)}
        s_out = {peer: self._received[peer][1] for peer in sorted(gone)}
        self._revealed_b.update(u3)
        self._revealed_s.update(gone)
        self._done["reveal"] = (request, (b_out, s_out))
        return dict(b_out), dict(s_out)


# ---------------------------------------------------------------- the server


@dataclass(frozen=True)
class _Plan:
    ids: list[str]
    near: dict[str, tuple[str, ...]]
    b_shares: dict[str, dict[int, bytes]]  # u in U3 -> point -> b_u share
    s_shares: dict[str, dict[int, bytes]]  # v in U2 \ U3 -> point -> s_sk_v share
    count: int
    masked: frozenset[str]


def _plan(
    session: str,
    settings: Settings,
    keys: Mapping[str, tuple[bytes, bytes, bytes]],
    shared: Collection[str],
    masked: Collection[str],
    revealed: Mapping[str, tuple[Mapping[str, bytes], Mapping[str, bytes]]],
    count: int,
) -> _Plan:
    ids = sorted(keys)
    u1, u2, u3 = set(ids), set(shared), set(masked)
    if not u2 <= u1:
        raise ProtocolError(f"client {min(u2 - u1)} sent shares without advertising keys")
    if not u3 <= u2:
        raise ProtocolError(f"client {min(u3 - u2)} sent a masked vector without sending shares")
    if not u3:
        raise ProtocolError("no masked vectors")
    near = graph(ids, session, settings.neighbours)
    unknown = set(revealed) - u1
    if unknown:
        raise ProtocolError(f"client {min(unknown)} revealed shares without advertising keys")
    points = {r: x_of(ids, r) for r in revealed}
    b_shares: dict[str, dict[int, bytes]] = {}
    for u in sorted(u3):
        holders = {*near[u], u}
        b_shares[u] = {points[r]: bytes(b[u]) for r, (b, _) in revealed.items() if r in holders and u in b}
    s_shares: dict[str, dict[int, bytes]] = {}
    for v in sorted(u2 - u3):
        holders = set(near[v])
        s_shares[v] = {points[r]: bytes(s[v]) for r, (_, s) in revealed.items() if r in holders and v in s}
    return _Plan(ids, near, b_shares, s_shares, count, frozenset(u3))


def _vector_length(masked: Mapping[str, np.ndarray]) -> int:
    lengths = {np.shape(vector) for vector in masked.values()}
    if len(lengths) != 1 or len(next(iter(lengths))) != 1:
        raise ProtocolError(f"the masked vectors have shapes {sorted(lengths)}, not one 1-D shape")
    return next(iter(lengths))[0]


def add_masked(total: np.ndarray | None, vector: np.ndarray) -> np.ndarray:
    """``total`` + ``vector`` in uint64 (mod 2^64; :func:`unmask_sum` reduces mod 2^m): the
    server keeps this running sum, not the vectors (O(model) memory whatever the round's size)."""
    vector = np.asarray(vector).astype(np.uint64, copy=False)
    if total is None:
        return vector.copy()
    if total.shape != vector.shape:
        raise ProtocolError(f"a masked vector of shape {vector.shape}, the others' is {total.shape}")
    total += vector
    return total


def _shortage(plan: _Plan, threshold: int) -> str | None:
    for u, shares in plan.b_shares.items():
        if len(shares) < threshold:
            return f"client {u}'s self-mask seed: {len(shares)} shares, threshold {threshold}"
    for v, shares in plan.s_shares.items():
        if len(shares) < threshold:
            return f"client {v}'s mask key: {len(shares)} shares, threshold {threshold}"
    return None


def can_unmask(
    *,
    session: str,
    settings: Settings,
    keys: Mapping[str, tuple[bytes, bytes, bytes]],
    shared: Collection[str],
    masked: Mapping[str, np.ndarray],
    revealed: Mapping[str, tuple[Mapping[str, bytes], Mapping[str, bytes]]],
) -> str | None:
    """None if every secret :func:`unmask` needs has ``threshold`` shares, else the reason it
    would give (counts only: a corrupt share shows only in :func:`unmask`)."""
    try:
        plan = _plan(session, settings, keys, shared, masked, revealed, _vector_length(masked) if masked else 0)
    except ProtocolError as error:
        return str(error)
    return _shortage(plan, settings.threshold)


def unmask(
    *,
    session: str,
    settings: Settings,
    keys: Mapping[str, tuple[bytes, bytes, bytes]],
    shared: Collection[str],
    masked: Mapping[str, np.ndarray],
    revealed: Mapping[str, tuple[Mapping[str, bytes], Mapping[str, bytes]]],
) -> np.ndarray:
    """sum_{u in U3} x_u mod 2^m from the masked vectors and the revealed shares
    (:func:`unmask_sum` of their sum)."""
    total = None
    for u in sorted(masked):
        total = add_masked(total, masked[u])
    if total is None:
        raise ProtocolError("no masked vectors")
    _vector_length(masked)
    return unmask_sum(
        session=session, settings=settings, keys=keys, shared=shared, masked=set(masked), total=total, revealed=revealed
    )


def unmask_sum(
    *,
    session: str,
    settings: Settings,
    keys: Mapping[str, tuple[bytes, bytes, bytes]],
    shared: Collection[str],
    masked: Collection[str],
    total: np.ndarray,
    revealed: Mapping[str, tuple[Mapping[str, bytes], Mapping[str, bytes]]],
) -> np.ndarray:
    """sum_{u in U3} x_u mod 2^m from ``total``, the sum of U3's (``masked``) vectors
    (:func:`add_masked`), and the revealed shares.

    y sums to x + sum_{u in U3} PRG(b_u) + sum_{v in U2\\U3} sum_{u in N(v) ∩ U3} sign(u, v) PRG(s_uv)
    (the pairs within U3 cancel); both terms are rebuilt and subtracted. ``total`` is
    changed in place.
    """
    keys = _normal_keys(keys)
    plan = _plan(session, settings, keys, shared, masked, revealed, int(np.shape(total)[0]))
    t = settings.threshold
    reason = _shortage(plan, t)
    if reason:
        raise ProtocolError(reason)
    count = plan.count
    for u, shares in plan.b_shares.items():
        try:
            b = shamir.combine(shares, t, crypto.KEY_BYTES)
        except shamir.ShareError as error:
            raise ProtocolError(f"client {u}'s self-mask seed: {error}") from None
        if crypto.commitment(b) != keys[u][2]:
            raise ProtocolError(f"client {u}'s self-mask seed: the rebuilt seed does not match its commitment")
        total -= crypto.prg_words(b, count, _SELF_MASK)
    for v, shares in plan.s_shares.items():
        try:
            s_sk = shamir.combine(shares, t, crypto.KEY_BYTES)
            matches = crypto.public_key(s_sk) == keys[v][1]
        except (shamir.ShareError, crypto.CryptoError) as error:
            raise ProtocolError(f"client {v}'s mask key: {error}") from None
        if not matches:
            raise ProtocolError(f"client {v}'s mask key: the rebuilt key does not match its public key")
        s_key = crypto.private_key_object(s_sk)
        for u in plan.near[v]:
            if u in plan.masked:  # u added sign(u, v) PRG(s_uv): take it away
                try:
                    pairwise = _pairwise_mask(s_key, keys[u][1], session, count)
                except crypto.CryptoError as error:
                    raise ProtocolError(f"client {u}'s mask key with client {v}: {error}") from None
                if _sign(u, v) > 0:
                    total -= pairwise
                else:
                    total += pairwise
    return total & settings.quantisation.modulus_mask
