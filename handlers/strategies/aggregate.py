"""The arithmetic of aggregation, as plain functions that are easy to test alone.

Updates are folded into a float64 running sum as they arrive, so the server holds
O(model) memory however many clients answer, and float64 keeps the result independent of
arrival order to far below float32 precision.

**Reproducible whatever the arrival order.** The RabbitMQ server folds updates in arrival
order, ``simulate`` in client order, ``replay`` in the recorded order; the model version's
sha256 should not depend on which. For float32 (and float16) tensors a float64 sum is
enough: its rounding errors (about 2^-53 relative) are some 2^29 times below what the
final cast to float32 keeps. For **float64** tensors it is not: a float64 sum's last bit
depends on the order of its terms. Their sums are kept in *double-double* (a float64 ``hi``
and a float64 ``lo`` per element, about 106 bits), each update added exactly:

    p + e = w * x            exactly (Dekker's TwoProduct: w and x split in 26-bit halves)
    s + t = hi + p           exactly (Knuth's TwoSum)
    hi, lo = s, t + (lo + e) renormalised (FastTwoSum: |lo| <= ulp(hi) / 2)

so the sum differs between orders only by about n * 2^-106 of its magnitude, and ``hi``
(the float64 nearest to it) is the same for every order unless the exact sum lies within
that of a float64 rounding boundary: some 2^-45 per element and round in practice, never
seen. The mean is then ``hi / W`` as for the other dtypes. The cost: two float64 arrays per
float64 tensor instead of one, and a fold about 6 times a plain float64 sum's time (see
``docs/benchmarks/fold-double-double.md``); float32 models fold as before, hash for hash.

What is and is not order-independent: FedAvg, FedProx, the server optimisers (FedAvgM,
FedAdagrad, FedAdam, FedYogi: their pseudo-gradient is the mean above, then the same
arithmetic whatever the order), clipping and DP-FedAvg (the noise comes from a seeded RNG)
fold through :class:`RunningSum`: order-independent for every dtype as above. The median and
trimmed mean (``robust.py``) sort each coordinate's values first: order-independent. Krum,
multi-Krum and Bulyan (``krum.py``) break ties (equal scores or distances) by arrival and
average the chosen values in arrival order: for a float64 model their last bit may follow
the order. The asynchronous strategies (FedAsync, FedBuff) depend on arrival order by design:
which updates a version mixes is decided by when they came; ``replay`` reproduces them from
the recorded order.

Every result keeps the global model's dtype (:func:`cast_like`): float16 tensors fold in
float64 and are cast back (a torch app's bfloat16 tensors travel as float32, which holds
every bfloat16 exactly, and are cast back when loaded into the model). Integer tensors,
such as BatchNorm's ``num_batches_tracked``, get the sample-weighted mean **rounded to the
nearest integer** (halves to even), never a float average truncated by a cast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from brokerfl.runtime.handler_table import Rejected

Tensors = Mapping[str, np.ndarray]


def cast_like(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A float64 result in ``like``'s dtype; integers (and booleans) rounded half to even."""
    if not np.issubdtype(like.dtype, np.inexact):
        value = np.rint(value)
    return np.asarray(value).astype(like.dtype, copy=False)  # 0-d stays an array, not a scalar


class BadUpdate(Rejected):
    """An update that must not be folded (wrong names, shapes, dtypes, non-finite values)."""


SCRATCH_ELEMENTS = 1 << 17  # float64 scratch of a fold: 1 MiB, however large the model


class RunningSum:
    """Per-name float64 sums of folded updates, their total weight and count.

    Zeroing a reused sum (a float64 model: 80 MB at 10M parameters) is deferred to the first
    access of ``sums``: a round starts (and its task goes out) without waiting for it, and it
    happens when the first update is folded, while the server waits for the others anyway."""

    def __init__(
        self,
        sums: dict[str, np.ndarray],
        total_weight: float = 0.0,
        count: int = 0,
        lows: dict[str, np.ndarray] | None = None,
    ) -> None:
        self._sums = sums
        # the low words of the double-double sums of float64 tensors (see the module's docstring)
        self._lows = lows or {}
        self.total_weight = total_weight
        self.count = count
        self._zero_pending = False
        self._scratch = np.empty(SCRATCH_ELEMENTS, np.float64)
        self._dd_scratch = np.empty((6, SCRATCH_ELEMENTS), np.float64) if self._lows else None

    @property
    def sums(self) -> dict[str, np.ndarray]:
        """The float64 sums; a double-double one rounded to its float64 (its ``hi``), from
        which further folds go on exactly."""
        sums = self._zeroed()
        for low in self._lows.values():
            low.fill(0.0)  # ``hi`` already is the sum rounded to float64: ``lo`` is what it dropped
        return sums

    def _zeroed(self) -> dict[str, np.ndarray]:
        if self._zero_pending:
            for total in [*self._sums.values(), *self._lows.values()]:
                total.fill(0.0)
            self._zero_pending = False
        return self._sums

    def __repr__(self) -> str:
        return f"RunningSum(names={list(self._sums)}, total_weight={self.total_weight}, count={self.count})"


def new_running_sum(like: Tensors, reuse: RunningSum | None = None) -> RunningSum:
    """A zeroed running sum shaped like ``like``; ``reuse`` an old one's memory when it fits
    (zeroing warm memory is much cheaper than faulting in fresh pages every round; it is
    done at the first use of the sums, see :class:`RunningSum`)."""
    doubled = sorted(name for name, array in like.items() if array.dtype == np.float64)
    if (
        reuse is not None
        and reuse._sums.keys() == like.keys()
        and all(reuse._sums[k].shape == like[k].shape for k in like)
        and sorted(reuse._lows) == doubled
    ):
        reuse._zero_pending = True
        reuse.total_weight, reuse.count = 0.0, 0
        return reuse
    return RunningSum(
        {name: np.zeros(array.shape, np.float64) for name, array in like.items()},
        lows={name: np.zeros(like[name].shape, np.float64) for name in doubled},
    )


def check_update(
    parameters: Tensors, reference: Tensors, *, max_distance_ratio: float | None = None, max_weight: float = 1.0
) -> None:
    """Raise :class:`BadUpdate` saying what is wrong unless ``parameters`` matches
    ``reference`` (the global model it was trained on) name for name, shape for shape and
    dtype for dtype, and its numbers are ones a fold can take:

    - **finite**: no NaN or infinity;
    - **within the fold's range** (always checked): no floating value beyond
      :func:`magnitude_limit` of its dtype (for ``max_weight``, the largest weight an update
      may get: ``strategy.max_num_samples``), no integer beyond 2**53 (the float64 fold holds
      every integer up to there exactly);
    - **near the model it was trained on** (with ``max_distance_ratio`` r, the run's
      ``strategy.max_update_ratio``)::

          ||w_client - w||_2  <=  r * (||w||_2 + sqrt(N))

      over the N values of the floating tensors, in float64. The bound scales with the
      model's own norm (a step of local SGD moves a model by a fraction of its size), and
      ``sqrt(N)``, the norm of a model with every value 1, keeps it from collapsing for a
      model near zero (a zero-initialised model's first updates). An honest update stays far
      below it: the repository's apps at their configs' settings move by at most 0.3 of
      ``||w|| + sqrt(N)`` in a round, the first included, and the digits MLP at 10 times its
      learning rate by 0.34 (``docs/how-to/robust-aggregation.md``); a finite update of 1e30 by ~1e29.

    One pass, block by block through float64 scratch (``SCRATCH_ELEMENTS``): memory O(1)
    beyond the update, whatever the model's size."""
    missing = sorted(set(reference) - set(parameters))
    extra = sorted(set(parameters) - set(reference))
    if missing or extra:
        raise BadUpdate(f"parameter names differ from the global model: missing {missing}, unexpected {extra}")
    distance2 = norm2 = 0.0
    elements = 0
    scratch = np.empty(SCRATCH_ELEMENTS, np.float64)
    for name, ref in reference.items():
        value = parameters[name]
        if value.shape != ref.shape:
            raise BadUpdate(f"{name}: shape {value.shape}, the global model has {ref.shape}")
        if value.dtype != ref.dtype:
            raise BadUpdate(f"{name}: dtype {value.dtype}, the global model has {ref.dtype}")
        if np.issubdtype(value.dtype, np.floating):
            if not all_finite(value):
                raise BadUpdate(f"{name}: holds NaN or infinite values")
            largest, d2, r2 = _magnitude_and_distance(value, ref, scratch)
            limit = magnitude_limit(value.dtype, max_weight)
            if largest > limit:
                raise BadUpdate(
                    f"{name}: a value of magnitude {largest:.3g}, beyond the {limit:.3g} a fold of {value.dtype} takes "
                    "(it could overflow the model)"
                )
            distance2, norm2, elements = distance2 + d2, norm2 + r2, elements + value.size
        elif (
            np.issubdtype(value.dtype, np.integer)
            and value.size
            and max(abs(int(value.max())), abs(int(value.min()))) > INTEGER_LIMIT
        ):
            raise BadUpdate(f"{name}: an integer beyond 2**53, which a float64 fold cannot hold exactly")
    if max_distance_ratio is not None and elements:
        distance, norm = math.sqrt(distance2), math.sqrt(norm2)
        bound = max_distance_ratio * (norm + math.sqrt(elements))
        if not distance <= bound:  # an overflowed distance (inf) is refused too
            raise BadUpdate(
                f"it is {distance:.3g} (L2) from the global model it was trained on, more than "
                "strategy.max_update_ratio "
                f"({max_distance_ratio:g}) x (the model's norm {norm:.3g} + sqrt of its {elements} floating values) = "
                f"{bound:.3g}"
            )


INTEGER_LIMIT = 2**53
FOLDS_PER_ROUND = 2**20  # updates one round may fold, for the range a fold must keep clear of overflow
SERVER_STEP_HEADROOM = 2**8  # a server step (learning rates, momentum, FedBuff's deltas) may scale a value this much


def magnitude_limit(dtype: np.dtype, max_weight: float = 1.0) -> float:
    """The largest magnitude an update's value of ``dtype`` may have: the fold computes
    ``weight * value`` in float64 for up to FOLDS_PER_ROUND updates of weight up to
    ``max_weight``, and casts the result back to ``dtype`` after a server step that may
    scale it SERVER_STEP_HEADROOM times; neither may overflow::

        min(finfo(dtype).max, finfo(float64).max / (max_weight * FOLDS_PER_ROUND)) / SERVER_STEP_HEADROOM

    float32: 1.3e36 (any max_weight under 1e200); float16: 256."""
    fold = float(np.finfo(np.float64).max) / (max(float(max_weight), 1.0) * FOLDS_PER_ROUND)
    return min(float(np.finfo(dtype).max), fold) / SERVER_STEP_HEADROOM


def _magnitude_and_distance(
    value: np.ndarray, reference: np.ndarray, scratch: np.ndarray
) -> tuple[float, float, float]:
    """(max |value|, ||value - reference||^2, ||reference||^2), in float64, block by block.
    Squares are summed in place, not by ``np.dot``: BLAS's threads, on a server whose cores
    are busy, made a 10M-value pass take a second instead of tens of milliseconds."""
    flat_value, flat_ref = np.ravel(value), np.ravel(reference)
    largest = distance2 = norm2 = 0.0
    for start in range(0, flat_value.size, SCRATCH_ELEMENTS):
        stop = min(start + SCRATCH_ELEMENTS, flat_value.size)
        block = scratch[: stop - start]
        np.copyto(block, flat_value[start:stop], casting="unsafe")
        largest = max(largest, float(block.max()), -float(block.min()))
        np.subtract(block, flat_ref[start:stop], out=block)  # value - reference, in float64
        distance2 += float(np.square(block, out=block).sum())
        np.copyto(block, flat_ref[start:stop], casting="unsafe")
        norm2 += float(np.square(block, out=block).sum())
    return largest, distance2, norm2


def all_finite(value: np.ndarray) -> bool:
    """No NaN or infinity in ``value``, checked block by block: ``np.isfinite(value)`` of a
    whole tensor would be a temporary of one byte per element (10 MB for a 10M tensor)."""
    flat = np.ravel(value)  # a view of a decoded (contiguous) array
    return all(
        np.isfinite(flat[start : start + SCRATCH_ELEMENTS]).all() for start in range(0, flat.size, SCRATCH_ELEMENTS)
    )


def fold_update(acc: RunningSum, parameters: Tensors, weight: float, base: Tensors | None = None) -> None:
    """acc += weight * parameters, in float64; with ``base``, acc += weight * (parameters -
    base) (FedBuff: a client's delta from the model version it trained on).

    Block by block through one small float64 scratch buffer reused across tensors and
    updates: a cast copy then in-place ops is ~4x faster than a ufunc casting on the fly,
    and a fixed-size block keeps the fold's temporary memory at 1 MiB instead of a second
    float64 model (the result is the same, element for element).
    """
    if not weight > 0:
        raise BadUpdate(f"update weight must be positive, got {weight}")
    for name, total in acc._zeroed().items():
        flat_total = total.reshape(-1)  # the sums are contiguous: a view
        flat_value = np.ravel(parameters[name])  # a view of a decoded (contiguous) array
        flat_base = None if base is None else np.ravel(base[name])
        low = acc._lows.get(name)
        if low is not None:
            _fold_double_double(flat_total, low.reshape(-1), flat_value, weight, flat_base, acc._dd_scratch)
            continue
        for start in range(0, flat_total.size, SCRATCH_ELEMENTS):
            stop = min(start + SCRATCH_ELEMENTS, flat_total.size)
            scratch = acc._scratch[: stop - start]
            np.copyto(scratch, flat_value[start:stop], casting="unsafe")
            if flat_base is not None:
                np.subtract(scratch, flat_base[start:stop], out=scratch)
            scratch *= weight
            flat_total[start:stop] += scratch
    acc.total_weight += weight
    acc.count += 1


def fold_sum(
    acc: RunningSum, delta_sum: Tensors, total_weight: float, count: int, *, base: Tensors | None = None
) -> None:
    """acc += delta_sum (+ total_weight * base), as ``count`` folds of total weight
    ``total_weight``: a secure round's sum of weighted deltas (brokerfl.handlers.secure)
    in place of its folds. Without ``base`` the sums hold deltas (DP-FedAvg's)."""
    if not total_weight > 0 or count < 1:
        raise BadUpdate(f"a secure sum needs a positive weight and count, got {total_weight} and {count}")
    if base is not None:
        fold_update(acc, base, total_weight)
    fold_update(acc, delta_sum, 1.0)
    acc.total_weight, acc.count = float(total_weight), count


_SPLITTER = 134217729.0  # 2**27 + 1: Dekker's split of a float64 into two 26-bit halves


def _fold_double_double(
    hi: np.ndarray, lo: np.ndarray, value: np.ndarray, weight: float, base: np.ndarray | None, scratch: np.ndarray
) -> None:
    """(hi, lo) += weight * (value - base) in double-double, block by block through six
    rows of float64 scratch (see the module's docstring): the product and the sum exact,
    then one renormalisation per element. ``value - base`` is exact too (TwoSum); its
    error times ``weight`` joins the low word."""
    c = _SPLITTER * weight
    w_high = c - (c - weight)
    w_low = weight - w_high
    for start in range(0, hi.size, SCRATCH_ELEMENTS):
        stop = min(start + SCRATCH_ELEMENTS, hi.size)
        x, p, x_high, x_low, e, s = (row[: stop - start] for row in scratch)
        h, lw = hi[start:stop], lo[start:stop]
        np.copyto(x, value[start:stop], casting="unsafe")
        if base is not None:
            b = base[start:stop]
            np.subtract(x, b, out=s)  # d = x - b
            np.subtract(s, x, out=x_high)  # bb = d - x
            np.subtract(s, x_high, out=x_low)
            np.subtract(x, x_low, out=x_low)  # x - (d - bb)
            np.add(b, x_high, out=x_high)  # b + bb
            np.subtract(x_low, x_high, out=x_low)  # the error of d
            x_low *= weight
            lw += x_low
            np.copyto(x, s)
        # p + e = weight * x exactly (TwoProduct)
        np.multiply(x, weight, out=p)
        np.multiply(x, _SPLITTER, out=x_high)
        np.subtract(x_high, x, out=x_low)
        np.subtract(x_high, x_low, out=x_high)
        np.subtract(x, x_high, out=x_low)
        np.multiply(x_high, w_high, out=e)
        e -= p
        if w_low:
            np.multiply(x_high, w_low, out=s)
            e += s
        np.multiply(x_low, w_high, out=s)
        e += s
        if w_low:
            np.multiply(x_low, w_low, out=s)
            e += s
        # s + t = h + p exactly (TwoSum; t in x_low)
        np.add(h, p, out=s)
        np.subtract(s, h, out=x_high)  # bb
        np.subtract(s, x_high, out=x_low)
        np.subtract(h, x_low, out=x_low)  # h - (s - bb)
        np.subtract(p, x_high, out=x_high)  # p - bb
        x_low += x_high
        x_low += lw
        x_low += e
        # hi, lo = FastTwoSum(s, t)
        np.add(s, x_low, out=h)
        np.subtract(h, s, out=lw)
        np.subtract(x_low, lw, out=lw)


def weighted_average(acc: RunningSum, like: Tensors) -> dict[str, np.ndarray]:
    """The folded average, in the dtypes of ``like`` (the global model)."""
    if acc.count == 0:
        raise ValueError("no update was folded")
    return {name: _mean_like(acc.sums[name], acc.total_weight, like[name]) for name in acc.sums}


def _mean_like(total: np.ndarray, weight: float, like: np.ndarray) -> np.ndarray:
    if np.issubdtype(like.dtype, np.floating):
        # divide straight into the output dtype: no float64 temporary
        return np.divide(total, weight, out=np.empty(like.shape, like.dtype), casting="unsafe")
    return cast_like(total / weight, like)


# ---------------------------------------------------------------- asynchronous aggregation

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


def staleness_weight(staleness: int, function: str = "polynomial", *, a: float = 0.5, b: float = 4.0) -> float:
    """s(t - tau) of FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization", sec. 5.2),
    for ``staleness`` = t - tau, the versions that passed since the client's model:

    - ``constant``: 1
    - ``polynomial``: (1 + staleness) ** -a
    - ``hinge``: 1 if staleness <= b, else 1 / (a * (staleness - b) + 1)
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if function == "constant":
        return 1.0
    if function == "polynomial":
        return float((1.0 + staleness) ** -a)
    if function == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {function!r}: use one of {list(STALENESS_FUNCTIONS)}")


def mix(global_parameters: Tensors, client_parameters: Tensors, alpha: float) -> dict[str, np.ndarray]:
    """FedAsync's update: (1 - alpha) * w + alpha * w_client, computed in float64 and returned
    in the global model's dtypes."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mixing weight must be in [0, 1], got {alpha}")
    out = {}
    for name, w in global_parameters.items():
        mixed = np.asarray(w, np.float64) * (1.0 - alpha)
        mixed += alpha * np.asarray(client_parameters[name], np.float64)
        out[name] = cast_like(mixed, w)
    return out


def apply_mean_delta(acc: RunningSum, global_parameters: Tensors, server_lr: float) -> dict[str, np.ndarray]:
    """FedBuff's server step (Nguyen et al. 2022, "Federated Learning with Buffered
    Asynchronous Aggregation", Algorithm 1): w + server_lr * (sum of the K weighted deltas) / K.

    The divisor is the number of updates, not the sum of their weights, as in the paper: so
    a buffer of stale updates moves the model less than a buffer of fresh ones.
    """
    if acc.count == 0:
        raise ValueError("no update was folded")
    scale = server_lr / acc.count
    out = {}
    for name, w in global_parameters.items():
        stepped = acc.sums[name] * scale
        stepped += w
        out[name] = cast_like(stepped, w)
    return out
