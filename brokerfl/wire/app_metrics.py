"""An app's metrics: which values may travel, how clients' values are combined, and which
one the run is judged by.

``train()`` and ``evaluate()`` return a mapping of metric names to numbers. Every one is
kept: clients' metrics travel to the server (``ParameterUpdate.metrics`` with a ``train_``
prefix, ``EvaluateResult.metrics``), are combined across clients per model version, and
land in ``metrics.jsonl`` (a record's ``metrics`` object), the curve and ``brokerfl
status``. Rules (the same on both ends, since a client's metrics are attacker-controlled):

- a name is 1-64 characters of letters, digits, ``_``, ``.`` or ``-``, starting with a
  letter or ``_``; at most :data:`MAX_METRICS` per call;
- a value is a number: ``bool``, ``int``, ``float``, or a one-element numpy array or
  torch tensor (converted with ``float()``, so ``evaluate`` may return
  ``(pred == y).float().mean()`` as it is). Anything else (a string, a list, a
  many-element tensor) is an :class:`~brokerfl.app.AppError` naming the function and key.

Combining clients' values (:func:`combine`): the sample-weighted mean (``num_samples`` is
the weight), unless the app names a reducer for that metric in a module-level
``METRIC_REDUCERS`` mapping: ``"mean"``, ``"max"``, ``"min"``, ``"sum"``, ``"median"``,
or a function ``(values, weights) -> float``. Names are as ``train``/``evaluate`` return
them (``"lr_end"``, not ``"train_lr_end"``).

The target metric (:class:`Target`): what curves put first, the simulate summary and
``replay``'s what-if compare. An app sets it with a module-level ``TARGET_METRIC =
("r2", "max")`` (``"max"``: higher is better, ``"min"``: lower); the default is
``("accuracy", "max")``. ``evaluate`` must return its target metric; ``accuracy`` is
needed by nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_METRICS = 32  # per train() or evaluate() call
MAX_WIRE_METRICS = 2 * MAX_METRICS + 8  # a message's metrics: train's, prefixed, beside the runtime's (train_s)
MAX_NAME_CHARS = 64
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}")
TRAIN_PREFIX = "train_"  # of a train() metric on the wire and in metrics.jsonl
RESERVED_TRAIN = frozenset({"s"})  # train_s: the runtime's measure of the training's seconds

Reducer = Callable[[Sequence[float], Sequence[float]], float]


class MetricError(ValueError):
    """A metric that cannot travel: the message names the key and what was wrong."""


def metric_name_problem(name: Any) -> str | None:
    """Why ``name`` is no metric name (None if it is one)."""
    if not isinstance(name, str):
        return f"a metric name must be a string, got {type(name).__name__}"
    if NAME.fullmatch(name) is None:
        return (
            f"metric name {_shown(name)} must be 1-{MAX_NAME_CHARS} characters of letters, digits, '_', '.' or '-', "
            "starting with a letter or '_'"
        )
    return None


def as_number(value: Any) -> float | None:
    """``value`` as a float if it is a number (bool, int, float, a numpy scalar, a
    one-element array or tensor), else None."""
    if isinstance(value, (bool, int, float)):
        return float(value)
    if hasattr(value, "dtype") and getattr(value, "size", None) == 1 or _one_element_tensor(value):
        try:
            kind = str(value.dtype)
            if "complex" in kind or not any(t in kind for t in ("int", "float", "bool")):
                return None
            return float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def _one_element_tensor(value: Any) -> bool:
    numel = getattr(value, "numel", None)
    return callable(numel) and hasattr(value, "dtype") and numel() == 1


def numbers(returned: Any, function: str) -> dict[str, float]:
    """The metrics ``function`` (``"train()"``, ``"evaluate()"``) returned, checked and as
    floats; a :class:`MetricError` naming ``function`` and the key otherwise."""
    if not isinstance(returned, Mapping):
        raise MetricError(f"{function} must return a dict of metric names to numbers, got {type(returned).__name__}")
    if len(returned) > MAX_METRICS + 1:  # num_samples comes on top
        raise MetricError(f"{function} returned {len(returned)} metrics, more than {MAX_METRICS}")
    out: dict[str, float] = {}
    for key, value in returned.items():
        problem = metric_name_problem(key)
        if problem is not None:
            raise MetricError(f"{function} returned {problem}")
        number = as_number(value)
        if number is None:
            raise MetricError(
                f"{function} returned {_shown(value)} ({type(value).__name__}) for {key!r}: a metric must be a number "
                "(bool, int, float, or a one-element array/tensor)"
            )
        out[key] = number
    return out


def wire_metrics_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why a message's ``metrics`` map cannot be taken (None if it can): too many, or a key
    that is no metric name. Values are already floats (the message's type hint)."""
    if len(metrics) > MAX_WIRE_METRICS:
        return f"{len(metrics)} metrics, more than {MAX_WIRE_METRICS}"
    for key in metrics:
        problem = metric_name_problem(key)
        if problem is not None:
            return problem
    return None


# ---------------------------------------------------------------- combining clients' values


def _mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    return sum(v * w for v, w in zip(values, weights)) / total if total > 0 else sum(values) / len(values)


def _median(values: Sequence[float], weights: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


REDUCERS: dict[str, Reducer] = {
    "mean": _mean,  # sample-weighted
    "max": lambda values, weights: max(values),
    "min": lambda values, weights: min(values),
    "sum": lambda values, weights: sum(values),
    "median": _median,
}


def reducers_of(module: Any, app_name: str) -> dict[str, Reducer]:
    """The app's ``METRIC_REDUCERS`` as functions (checked: a ValueError or TypeError naming
    the app and the metric for a reducer that is neither a known name nor a function)."""
    declared = getattr(module, "METRIC_REDUCERS", None) or {}
    if not isinstance(declared, Mapping):
        raise TypeError(
            f"app {app_name!r}: METRIC_REDUCERS must be a dict of metric names to reducers, got "
            f"{type(declared).__name__}"
        )
    out: dict[str, Reducer] = {}
    for name, reducer in declared.items():
        if isinstance(reducer, str) and reducer in REDUCERS:
            out[name] = REDUCERS[reducer]
        elif callable(reducer):
            out[name] = reducer
        else:
            raise ValueError(
                f"app {app_name!r}: METRIC_REDUCERS[{name!r}] is {reducer!r}: use one of {sorted(REDUCERS)} or a "
                "function (values, weights) -> float"
            )
    return out


def combine(
    entries: Sequence[tuple[Mapping[str, float], float]], reducers: Mapping[str, Reducer] | None = None
) -> dict[str, float]:
    """One value per metric name from clients' ``(metrics, num_samples)``: each metric over
    the clients that reported it, by its reducer (a ``train_`` metric's is looked up
    without the prefix too), else the sample-weighted mean."""
    reducers = reducers or {}
    names: list[str] = []
    for metrics, _ in entries:
        names.extend(k for k in metrics if k not in names)
    out: dict[str, float] = {}
    for name in names:
        pairs = [(m[name], w) for m, w in entries if name in m]
        reducer = (
            reducers.get(name)
            or (reducers.get(name[len(TRAIN_PREFIX) :]) if name.startswith(TRAIN_PREFIX) else None)
            or _mean
        )
        try:
            out[name] = float(reducer([v for v, _ in pairs], [w for _, w in pairs]))
        except Exception:  # noqa: BLE001 - an app's reducer that fails loses its metric's value, not the round
            out[name] = math.nan
    return out


# ---------------------------------------------------------------- the target metric


@dataclass(frozen=True)
class Target:
    """The metric a run is judged by, and which way is better."""

    name: str = "accuracy"
    higher_is_better: bool = True

    @property
    def mode(self) -> str:
        return "max" if self.higher_is_better else "min"

    def better(self, a: float, b: float) -> bool:
        """Is ``a`` better than ``b`` (NaN is never better)?"""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a > b if self.higher_is_better else a < b)


DEFAULT_TARGET = Target()


def target_of(module: Any, app_name: str) -> Target:
    """The app's ``TARGET_METRIC = (name, "max" | "min")``, or accuracy (higher is better)."""
    declared = getattr(module, "TARGET_METRIC", None)
    if declared is None:
        return DEFAULT_TARGET
    if not (
        isinstance(declared, (tuple, list))
        and len(declared) == 2
        and declared[1] in ("max", "min")
        and metric_name_problem(declared[0]) is None
    ):
        raise ValueError(f"app {app_name!r}: TARGET_METRIC must be (metric name, 'max' or 'min'), got {declared!r}")
    return Target(declared[0], declared[1] == "max")


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"
