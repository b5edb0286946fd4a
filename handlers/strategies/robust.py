"""Robust aggregation: the coordinate-wise median and trimmed mean.

Unlike FedAvg these cannot fold a running sum: they keep the round's updates, so server
memory is O(clients x model). Useful against a few poisoned clients, and as what-ifs in
``brokerfl replay --strategy median``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handlers.strategies.aggregate import Tensors, cast_like
from handlers.strategies.base import Strategy


def coordinate_median(updates: list[Tensors], like: Tensors) -> dict[str, np.ndarray]:
    return {name: cast_like(np.median(np.stack([u[name] for u in updates]), axis=0), like[name]) for name in like}


def trimmed_mean(updates: list[Tensors], like: Tensors, beta: float) -> dict[str, np.ndarray]:
    """Per coordinate, drop the ``beta`` share of largest and of smallest values, average the rest."""
    k = int(beta * len(updates))
    out = {}
    for name in like:
        stacked = np.sort(np.stack([u[name] for u in updates]), axis=0)
        kept = stacked[k : len(updates) - k] if len(updates) - 2 * k > 0 else stacked
        out[name] = cast_like(kept.mean(axis=0, dtype=np.float64), like[name])
    return out


class _KeepsUpdates(Strategy):
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


class TrimmedMean(_KeepsUpdates):
    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1, **settings: Any) -> None:
        super().__init__(**settings)
        if not 0 <= beta < 0.5:
            raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        return trimmed_mean(self._updates, global_parameters, self.beta)
