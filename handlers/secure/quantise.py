"""A client's float update as integers mod 2^m, and the masked sum back to floats.

Decision: a client quantises its *delta* from the round's global model, d = x_i - x (a much
smaller range than the parameters themselves), clipped to [-r, r], to the 2^b - 1 levels

    q = round((clip(d, -r, r) + r) / step),   step = 2 r / (2^b - 2),   q in 0 .. 2^b - 2,

by round to nearest, so |q step - r - clip(d)| <= step / 2. The client sends w_i q_i (its
integer weight times its levels) and the server's sum is taken mod 2^m (uint64 words wrap
at 2^64; for m < 64 they are masked with 2^m - 1). With S = sum_i w_i q_i and W = sum_i w_i,

    sum_i w_i (q_i step - r) = S step - W r,

the weighted sum of the dequantised deltas; divided by W it is the weighted mean, within
step / 2 of the exact one per coordinate when nothing was clipped. The sum is exact only if
it did not wrap: W (2^b - 2) < 2^m (:meth:`Quantisation.fits`).

The vector a client masks is its levels for each tensor in sorted name order, ravelled, then
w_i, then its count of clipped coordinates (so the server learns W and the total clipped, and
neither for any one client).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class QuantiseError(ValueError):
    """An update or sum that cannot be quantised or decoded (the message says why)."""


@dataclass(frozen=True)
class Quantisation:
    clip_range: float  # r: deltas are clipped to [-r, r]
    bits: int  # b: 2^b levels per coordinate
    modulus_bits: int  # m: the sum is taken mod 2^m

    def __post_init__(self) -> None:
        if not (np.isfinite(self.clip_range) and self.clip_range > 0):
            raise QuantiseError(f"clip_range {self.clip_range} must be a positive number")
        if not 1 <= self.modulus_bits <= 64:
            raise QuantiseError(f"modulus_bits {self.modulus_bits} must be 1..64 (uint64 words)")
        if not 2 <= self.bits < self.modulus_bits:
            raise QuantiseError(f"bits {self.bits} must be 2..modulus_bits - 1 (room for a weight)")

    @property
    def levels(self) -> int:
        """The largest level, 2^b - 2: an even number of steps puts 0 on a level (with 2^b - 1
        steps a zero delta, every coordinate nobody trains, would decode as step / 2)."""
        return 2**self.bits - 2

    @property
    def step(self) -> float:
        return 2.0 * self.clip_range / self.levels

    @property
    def error_bound(self) -> float:
        """The largest error of a coordinate of the weighted mean (nothing clipped)."""
        return self.step / 2.0

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64(2**self.modulus_bits - 1)

    def fits(self, total_weight: int) -> bool:
        """Whether a sum of weight ``total_weight`` cannot have wrapped mod 2^m."""
        return 0 <= total_weight < 2**self.modulus_bits and total_weight * self.levels < 2**self.modulus_bits


def vector_length(like: Mapping[str, np.ndarray]) -> int:
    """The words of an encoded vector: every coordinate, the weight, the clipped count."""
    return sum(int(np.size(array)) for array in like.values()) + 2


def encode(delta: Mapping[str, np.ndarray], weight: int, q: Quantisation) -> tuple[np.ndarray, int]:
    """(the uint64 vector w q_1 .. w q_n, w, clipped; the count of clipped coordinates)."""
    weight = int(weight)
    if weight < 1:
        raise QuantiseError(f"weight {weight} < 1")
    if not q.fits(weight):
        raise QuantiseError(f"weight {weight} times {q.levels} levels does not fit mod 2^{q.modulus_bits}")
    r, step = q.clip_range, q.step
    parts, clipped = [], 0
    for name in sorted(delta):
        d = np.asarray(delta[name], dtype=np.float64).ravel()
        if not np.all(np.isfinite(d)):
            raise QuantiseError(f"tensor {name!r} has NaN or infinite values")
        clipped += int(np.count_nonzero(np.abs(d) > r))
        levels = np.rint((np.clip(d, -r, r) + r) / step)
        # float rounding can put 2 r / step a hair above the largest level
        levels = np.minimum(levels, q.levels).astype(np.uint64)
        parts.append(levels * np.uint64(weight))  # < 2^m: fits(weight)
    parts.append(np.array([weight, clipped], dtype=np.uint64) & q.modulus_mask)
    return np.concatenate(parts), clipped


def decode_sum(
    total: np.ndarray, like: Mapping[str, np.ndarray], q: Quantisation
) -> tuple[dict[str, np.ndarray], int, int]:
    """(sum_i w_i dequantised delta_i per name, float64 shaped like ``like``; W; clipped)."""
    total = np.asarray(total)
    expected = vector_length(like)
    if total.ndim != 1 or total.shape[0] != expected:
        raise QuantiseError(f"a sum of shape {total.shape}, expected ({expected},)")
    total = total.astype(np.uint64, copy=False) & q.modulus_mask
    weight, clipped = int(total[-2]), int(total[-1])
    if weight == 0:
        raise QuantiseError("the total weight is 0")
    if not q.fits(weight):
        raise QuantiseError(f"total weight {weight} times {q.levels} levels may have wrapped mod 2^{q.modulus_bits}")
    out, offset = {}, 0
    for name in sorted(like):
        shape = np.shape(like[name])
        size = int(np.prod(shape, dtype=np.int64))
        s = total[offset : offset + size].astype(np.float64)
        out[name] = (s * q.step - weight * q.clip_range).reshape(shape)
        offset += size
    return out, weight, clipped
