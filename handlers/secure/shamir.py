"""Shamir's t-of-n secret sharing (Shamir 1979) over the prime field GF(p), p = 2^521 - 1.

A secret s (at most 64 bytes, read big-endian, so s < 2^512 < p) is the constant term of a
random polynomial of degree t - 1,

    f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}  (mod p),   a_j uniform in GF(p),

and holder i gets the share y_i = f(x_i). Any t shares give s back by Lagrange interpolation
at 0,

    s = sum_j y_j prod_{m != j} x_m / (x_m - x_j)  (mod p),

and any t - 1 shares are consistent with every secret (they say nothing about s).

Decision: the Mersenne prime 2^521 - 1, not a 256-bit prime, so any 32-byte secret (a seed,
an X25519 private key) fits without reduction, and a corrupt share is caught with
overwhelming probability: interpolating through a wrong y gives a near-uniform element of
GF(p), which fits the expected 32 bytes with probability 2^-265.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 66  # ceil(521 / 8): a y value, big-endian


class ShareError(ValueError):
    """Shares that cannot be made or combined (the message says why)."""


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ShareError(f"duplicate evaluation points in {sorted(xs)}")
    for x in xs:
        if not isinstance(x, int) or isinstance(x, bool) or not 1 <= x < PRIME:
            raise ShareError(f"evaluation point {x!r} is not an integer in [1, p)")


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` at the points ``xs``, any ``threshold`` of which rebuild it."""
    if len(secret) > 64:
        raise ShareError(f"a secret of {len(secret)} bytes (at most 64)")
    xs = list(xs)
    if threshold < 1:
        raise ShareError(f"threshold {threshold} < 1")
    if threshold > len(xs):
        raise ShareError(f"threshold {threshold} > {len(xs)} holders")
    _check_points(xs)
    # the coefficients come from the OS's CSPRNG (secrets), never a seeded generator
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in xs:
        y = 0
        for a in reversed(coefficients):  # Horner
            y = (y * x + a) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Mapping[int, bytes], threshold: int, length: int = 32) -> bytes:
    """The secret from the first ``threshold`` shares by sorted x, as ``length`` bytes."""
    if threshold < 1:
        raise ShareError(f"threshold {threshold} < 1")
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares, threshold {threshold}")
    points = sorted(shares)[:threshold]
    _check_points(points)
    ys = []
    for x in points:
        share = shares[x]
        if len(share) != SHARE_BYTES:
            raise ShareError(f"the share at x = {x} has {len(share)} bytes, not {SHARE_BYTES}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise ShareError(f"the share at x = {x} is not an element of the field (corrupt)")
        ys.append(y)
    secret = 0
    for j, (x_j, y_j) in enumerate(zip(points, ys)):
        numerator, denominator = 1, 1
        for m, x_m in enumerate(points):
            if m != j:
                numerator = numerator * x_m % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        secret = (secret + y_j * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 256**length:
        raise ShareError(f"the rebuilt secret does not fit {length} bytes (a corrupt share)")
    return secret.to_bytes(length, "big")
