"""Compressed updates: what a client sends instead of its whole float32 parameters.

Opt-in per run (``compression:`` in the config). The client compresses the *delta* between
its trained parameters and the task's model (the server holds that model: it is the version
the update was trained on), the server decompresses it back to parameters before anything
else looks at them (checks, folding), and replay does the same with the version it
replayed, so what replay folds is exactly what the server folded.

Methods (``method``):

- ``float16`` / ``bfloat16``: the delta cast down (bfloat16 travels as the high 16 bits of
  each float32, a ``uint16`` array: numpy has no bfloat16). 2x fewer bytes.
- ``qsgd8``: 8-bit stochastic quantization (QSGD with 127 levels, max-abs scaling): each
  value becomes ``round_stochastically(v / scale * 127)`` in int8, unbiased; one float32
  scale per tensor. ~4x fewer bytes.
- ``topk``: top-k sparsification: the ``fraction`` of each tensor's entries largest in
  magnitude, as (int64 index, float32 value) pairs. ~1/(3 fraction) fewer bytes.

The lossy ones (``qsgd8``, ``topk``; also the casts) keep **error feedback** on the client:
what compression dropped this round (delta + carried error - what was sent) is added to
the next round's delta, so nothing is lost for good (Seide et al. 2014, Stich et al. 2018).

Only what that arithmetic suits is compressed: floating **trainable** weights of at least
``min_size`` entries. Everything else travels **whole**, exactly, in the model's dtype:
integers (a BatchNorm's ``num_batches_tracked``), buffers (BatchNorm's running mean and
variance: a statistic, not a step; a sparse delta of one plus error feedback re-adds the
unsent ``statistic - base`` every round, overshoots, and leaves variances negative: the
CNN app collapsed to chance) and small tensors (biases: whole they cost next to
nothing, and top-k of a handful of entries sends one).

On the wire a compressed tensor ``name`` is ``name`` plus, for some methods, ``name#scale``
or ``name#index``; a tensor sent whole is ``name#whole`` alone, so the server decompresses
without knowing the client's choice. Every check that a hostile or broken client could fail
is here, with a clear :class:`CompressionError` (the server dead-letters such an update):
unknown or missing names, wrong shapes or dtypes, indices out of range or repeated, k out
of range, non-finite scales or values, levels outside [-127, 127].
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

METHODS = ("none", "float16", "bfloat16", "qsgd8", "topk")
LEVELS = 127  # qsgd8: int8 levels each side of zero
SCALE = "#scale"
INDEX = "#index"
WHOLE = "#whole"

Tensors = Mapping[str, np.ndarray]


class CompressionError(ValueError):
    """A compressed update that cannot be decompressed against its model; says why."""


def _floating(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.floating)


# ---------------------------------------------------------------- the arithmetic, per tensor


def to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16, rounded to nearest even, as the uint16 high halves."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def quantize8(values: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.float32]:
    """QSGD, 127 levels, max-abs scaling: (int8 levels, scale); unbiased."""
    flat = np.asarray(values, dtype=np.float32)
    scale = np.float32(np.max(np.abs(flat))) if flat.size else np.float32(0.0)
    if not np.isfinite(scale):
        raise CompressionError("cannot quantize non-finite values")
    if scale == 0:
        return np.zeros(flat.shape, np.int8), scale
    scaled = flat * (LEVELS / scale)
    low = np.floor(scaled)
    levels = low + (rng.random(flat.shape, dtype=np.float32) < (scaled - low))
    return np.clip(levels, -LEVELS, LEVELS).astype(np.int8), scale


def dequantize8(levels: np.ndarray, scale: np.float32) -> np.ndarray:
    return levels.astype(np.float32) * np.float32(scale / LEVELS)


def top_k(values: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(sorted int64 flat indices, float32 values) of the ``ceil(fraction * size)`` entries
    largest in magnitude (at least one)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    k = min(flat.size, max(1, int(np.ceil(fraction * flat.size))))
    index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :]).astype(np.int64)
    return index, flat[index]


def scatter(index: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    dense = np.zeros(int(np.prod(shape)), np.float32)
    dense[index] = values
    return dense.reshape(shape)


# ---------------------------------------------------------------- whole updates


def compressible(base: Tensors, trainable: Collection[str] | None = None, min_size: int = 0) -> set[str]:
    """The tensors of ``base`` that are compressed: floating, trainable (every name when
    ``trainable`` is None: a model of plain arrays has no buffers), ``min_size`` entries or
    more. The rest travel whole."""
    return {
        name
        for name, value in base.items()
        if _floating(np.asarray(value)) and (trainable is None or name in trainable) and np.size(value) >= min_size
    }


def compress(
    parameters: Tensors,
    base: Tensors,
    method: str,
    *,
    residual: dict[str, np.ndarray] | None = None,
    fraction: float = 0.01,
    rng: np.random.Generator | None = None,
    trainable: Collection[str] | None = None,
    min_size: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(what to send, the new residual) for trained ``parameters`` against the task's model
    ``base``. ``residual``: what earlier compressions dropped (error feedback), added to
    this delta; pass the returned one next round (it names only compressed tensors). It is
    consumed: each entry is taken out once added, so a caller holding no other reference to
    it keeps one residual in memory, not the old and the new (a model's worth each).
    ``trainable``, ``min_size``: which tensors are compressed (:func:`compressible`); the
    others are sent whole. ``fraction`` (topk) is per tensor, at least one entry."""
    if method not in METHODS or method == "none":
        raise ValueError(f"unknown compression method {method!r} (one of {METHODS[1:]})")
    if set(parameters) != set(base):
        raise ValueError("the trained parameters and the task's model name different tensors")
    rng = rng if rng is not None else np.random.default_rng()
    residual = residual if residual is not None else {}
    wire: dict[str, np.ndarray] = {}
    carried: dict[str, np.ndarray] = {}
    lossy = compressible(base, trainable, min_size)
    for name in sorted(parameters):
        value, reference = np.asarray(parameters[name]), np.asarray(base[name])
        if name not in lossy or not _floating(value):
            wire[name + WHOLE] = value.astype(reference.dtype, copy=False)  # exactly what was trained
            continue
        delta = value.astype(np.float32) - reference.astype(np.float32)
        previous = residual.pop(name, None)
        if previous is not None and previous.shape == delta.shape:
            delta = delta + previous
        if method == "float16":
            wire[name] = delta.astype(np.float16)
            sent = wire[name].astype(np.float32)
        elif method == "bfloat16":
            wire[name] = to_bfloat16_bits(delta)
            sent = from_bfloat16_bits(wire[name])
        elif method == "qsgd8":
            levels, scale = quantize8(delta, rng)
            wire[name], wire[name + SCALE] = levels, np.asarray(scale, np.float32)
            sent = dequantize8(levels, scale)
        else:  # topk
            index, values = top_k(delta, fraction)
            wire[name], wire[name + INDEX] = values, index
            sent = scatter(index, values, delta.shape)
        carried[name] = delta - sent
    return wire, carried


def decompress(wire: Tensors, base: Tensors, method: str, *, max_fraction: float = 1.0) -> dict[str, np.ndarray]:
    """The parameters a compressed update stands for: ``base`` + the decoded delta, in
    ``base``'s dtypes. Raises :class:`CompressionError` on anything that does not fit."""
    if method not in METHODS or method == "none":
        raise CompressionError(f"unknown compression method {method!r}")
    expected: set[str] = set()
    out: dict[str, np.ndarray] = {}
    for name in sorted(base):
        reference = np.asarray(base[name])
        if name + WHOLE in wire:
            expected.add(name + WHOLE)
            value = np.asarray(wire[name + WHOLE])
            if value.shape != reference.shape or value.dtype != reference.dtype:
                raise CompressionError(
                    f"tensor {name!r}: {value.dtype}{list(value.shape)} sent whole, the model has "
                    f"{reference.dtype}{list(reference.shape)}"
                )
            if _floating(value) and not np.all(np.isfinite(value)):
                raise CompressionError(f"tensor {name!r}: sent whole with NaN or infinity")
            out[name] = value
            continue
        if not _floating(reference):
            raise CompressionError(
                f"tensor {name!r}: {reference.dtype} tensors must be sent whole (as {name + WHOLE!r})"
            )
        expected.add(name)
        sent = wire.get(name)
        if sent is None:
            raise CompressionError(f"tensor {name!r} is missing")
        value = np.asarray(sent)
        if method == "float16":
            delta = _dense(name, value, reference, np.float16).astype(np.float32)
        elif method == "bfloat16":
            delta = from_bfloat16_bits(_dense(name, value, reference, np.uint16))
        elif method == "qsgd8":
            expected.add(name + SCALE)
            levels = _dense(name, value, reference, np.int8)
            scale = np.asarray(wire.get(name + SCALE, np.float32(np.nan)))
            if scale.shape != () or scale.dtype != np.float32 or not np.isfinite(scale) or scale < 0:
                raise CompressionError(
                    f"tensor {name!r}: scale must be one finite non-negative float32, got "
                    f"{scale.dtype}{list(scale.shape)} {scale if scale.size == 1 else ''}"
                )
            if levels.size and (levels.min() < -LEVELS):
                raise CompressionError(f"tensor {name!r}: levels must lie in [-{LEVELS}, {LEVELS}]")
            delta = dequantize8(levels, np.float32(scale))
        else:  # topk
            expected.add(name + INDEX)
            index = np.asarray(wire.get(name + INDEX, np.zeros(0, np.int64)))
            size = reference.size
            k = value.size
            if value.dtype != np.float32 or value.ndim != 1 or index.dtype != np.int64 or index.shape != value.shape:
                raise CompressionError(
                    f"tensor {name!r}: top-k needs float32 values and int64 indices of one length, got "
                    f"{value.dtype}{list(value.shape)} and {index.dtype}{list(index.shape)}"
                )
            if not 1 <= k <= max(1, int(np.ceil(max_fraction * size))):
                raise CompressionError(
                    f"tensor {name!r}: k={k} is out of range for {size} entries "
                    f"(1..{max(1, int(np.ceil(max_fraction * size)))})"
                )
            if index.min() < 0 or index.max() >= size or np.any(np.diff(index) <= 0):
                raise CompressionError(f"tensor {name!r}: indices must be increasing and lie in [0, {size})")
            if not np.all(np.isfinite(value)):
                raise CompressionError(f"tensor {name!r}: values hold NaN or infinity")
            delta = scatter(index, value, reference.shape)
        out[name] = (reference.astype(np.float32) + delta).astype(reference.dtype)
    unknown = sorted(set(wire) - expected)
    if unknown:
        raise CompressionError(f"unknown tensors {unknown[:5]}" + ("..." if len(unknown) > 5 else ""))
    return out


def _dense(name: str, value: np.ndarray, reference: np.ndarray, dtype: type) -> np.ndarray:
    if value.dtype != np.dtype(dtype) or value.shape != reference.shape:
        raise CompressionError(
            f"tensor {name!r}: expected {np.dtype(dtype)}{list(reference.shape)}, got {value.dtype}{list(value.shape)}"
        )
    return value
