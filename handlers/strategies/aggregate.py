"""The arithmetic of aggregation, as plain functions that are easy to test alone.

Updates are folded into a float64 running sum as they arrive, so the server holds
O(model) memory however many clients answer, and float64 keeps the result independent of
arrival order to far below float32 precision.

Every result keeps the global model's dtype (:func:`cast_like`): float16 tensors fold in
float64 and are cast back (a torch app's bfloat16 tensors travel as float32, which holds
every bfloat16 exactly, and are cast back when loaded into the model). Integer tensors,
such as BatchNorm's ``num_batches_tracked``, get the sample-weighted mean **rounded to the
nearest integer** (halves to even), never a float average truncated by a cast.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from brokerfl.handler_table import Rejected

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

    def __init__(self, sums: dict[str, np.ndarray], total_weight: float = 0.0, count: int = 0) -> None:
        self._sums = sums
        self.total_weight = total_weight
        self.count = count
        self._zero_pending = False
        self._scratch = np.empty(SCRATCH_ELEMENTS, np.float64)

    @property
    def sums(self) -> dict[str, np.ndarray]:
        if self._zero_pending:
            for total in self._sums.values():
                total.fill(0.0)
            self._zero_pending = False
        return self._sums

    def __repr__(self) -> str:
        return f"RunningSum(names={list(self._sums)}, total_weight={self.total_weight}, count={self.count})"


def new_running_sum(like: Tensors, reuse: RunningSum | None = None) -> RunningSum:
    """A zeroed running sum shaped like ``like``; ``reuse`` an old one's memory when it fits
    (zeroing warm memory is much cheaper than faulting in fresh pages every round; it is
    done at the first use of the sums, see :class:`RunningSum`)."""
    if reuse is not None and reuse._sums.keys() == like.keys() and all(reuse._sums[k].shape == like[k].shape for k in like):
        reuse._zero_pending = True
        reuse.total_weight, reuse.count = 0.0, 0
        return reuse
    return RunningSum({name: np.zeros(array.shape, np.float64) for name, array in like.items()})


def check_update(parameters: Tensors, reference: Tensors) -> None:
    """Raise :class:`BadUpdate` saying what is wrong unless ``parameters`` matches
    ``reference`` name for name, shape for shape, and holds only finite numbers."""
    missing = sorted(set(reference) - set(parameters))
    extra = sorted(set(parameters) - set(reference))
    if missing or extra:
        raise BadUpdate(f"parameter names differ from the global model: missing {missing}, unexpected {extra}")
    for name, ref in reference.items():
        value = parameters[name]
        if value.shape != ref.shape:
            raise BadUpdate(f"{name}: shape {value.shape}, the global model has {ref.shape}")
        if value.dtype != ref.dtype:
            raise BadUpdate(f"{name}: dtype {value.dtype}, the global model has {ref.dtype}")
        if np.issubdtype(value.dtype, np.floating) and not all_finite(value):
            raise BadUpdate(f"{name}: holds NaN or infinite values")


def all_finite(value: np.ndarray) -> bool:
    """No NaN or infinity in ``value``, checked block by block: ``np.isfinite(value)`` of a
    whole tensor would be a temporary of one byte per element (10 MB for a 10M tensor)."""
    flat = np.ravel(value)  # a view of a decoded (contiguous) array
    return all(np.isfinite(flat[start : start + SCRATCH_ELEMENTS]).all() for start in range(0, flat.size, SCRATCH_ELEMENTS))


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
    for name, total in acc.sums.items():
        flat_total = total.reshape(-1)  # the sums are contiguous: a view
        flat_value = np.ravel(parameters[name])  # a view of a decoded (contiguous) array
        flat_base = None if base is None else np.ravel(base[name])
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
