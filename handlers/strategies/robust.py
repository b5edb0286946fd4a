"""Robust aggregation: the coordinate-wise median and trimmed mean (Yin et al. 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates").

Unlike FedAvg these cannot fold a running sum: they keep the round's updates, so server
memory is O(clients x model). Both ignore ``num_samples`` (a poisoning client could lie
about it): every update counts once. Useful against a few poisoned clients
(``docs/how-to/robust-aggregation.md``), and as what-ifs in ``brokerfl replay --strategy median``.

The trimmed mean drops, per coordinate, the k largest and the k smallest of the n values
and averages the rest, with

    k = min(max(floor(beta * n), min_trim), floor((n - 1) / 2))

``floor(beta * n)`` is Flower's ``FedTrimmedAvg`` (and scipy's ``trim_mean``), which trims
nothing while beta * n < 1: at the default beta of 0.1, nothing below 10 clients, where
one poisoned update passes into the mean. ``min_trim`` (default 1) trims at least that
many from each end whenever enough updates are left to average (n >= 2 min_trim + 1); the
upper clamp keeps at least one value (n = 2: their mean, as the median would).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from brokerfl.handlers.strategies.aggregate import Tensors, cast_like
from brokerfl.handlers.strategies.base import Strategy, StrategyOptions


def coordinate_median(updates: list[Tensors], like: Tensors) -> dict[str, np.ndarray]:
    return {name: cast_like(np.median(np.stack([u[name] for u in updates]), axis=0), like[name]) for name in like}


def trimmed_count(n: int, beta: float, min_trim: int = 0) -> int:
    """k, the values trimmed from each end of n (the module docstring's equation)."""
    return max(0, min(max(int(beta * n), min_trim), (n - 1) // 2))


def trimmed_mean(updates: list[Tensors], like: Tensors, beta: float, min_trim: int = 0) -> dict[str, np.ndarray]:
    """Per coordinate, drop the k largest and k smallest values (:func:`trimmed_count`),
    average the rest."""
    n = len(updates)
    k = trimmed_count(n, beta, min_trim)
    out = {}
    for name in like:
        stacked = np.sort(np.stack([u[name] for u in updates]), axis=0)
        out[name] = cast_like(stacked[k : n - k].mean(axis=0, dtype=np.float64), like[name])
    return out


class _KeepsUpdates(Strategy):
    secure_refusal = "it compares the round's updates one by one"

    def start_round(self, global_parameters: Tensors) -> None:
        self._updates: list[Tensors] = []

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        self._updates.append(parameters)

    def folded(self) -> int:
        return len(getattr(self, "_updates", ()))


class Median(_KeepsUpdates):
    name = "median"

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        return coordinate_median(self._updates, global_parameters)


class TrimmedMeanOptions(StrategyOptions):
    beta: float = Field(0.1, ge=0, lt=0.5, description="the share of values trimmed from each end")
    min_trim: int = Field(1, ge=0, description="the fewest values trimmed from each end (0: by beta alone)")


class TrimmedMean(_KeepsUpdates):
    """Options: ``beta`` (the share trimmed from each end, default 0.1) and ``min_trim``
    (the fewest values trimmed from each end, default 1; 0 trims by beta alone, and a
    federation whose rounds it would then not trim at all is refused when the run starts)."""

    name = "trimmed_mean"

    Options = TrimmedMeanOptions

    def bind_run(self, *, seed: int, clients: int) -> None:
        super().bind_run(seed=seed, clients=clients)
        n = min(clients, self.clients_per_round or max(1, round(self.fraction * clients)))
        if n >= 3 and trimmed_count(n, self.beta, self.min_trim) == 0:
            raise ValueError(
                f"strategy 'trimmed_mean': beta {self.beta:g} with min_trim 0 trims nothing from rounds of {n} updates "
                f"(floor(beta x {n}) = 0), so one poisoned update would pass into the mean: set beta >= {1 / n:.3g} or "
                "min_trim >= 1"
            )

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        return trimmed_mean(self._updates, global_parameters, self.beta, self.min_trim)
