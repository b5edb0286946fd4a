"""Byzantine-robust aggregation by distances between updates: Krum, Multi-Krum and Bulyan.

- Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant
  Gradient Descent"): each update's score is the sum of squared L2 distances to its
  n - f - 2 nearest other updates; the update with the lowest score is the new model.
- Multi-Krum (same paper): the uniform mean of the m updates with the lowest scores
  (m = n - f unless set).
- Bulyan (El Mhamdi et al. 2018, "The Hidden Vulnerability of Distributed Learning in
  Byzantium"): theta = n - 2f updates chosen by Krum one at a time (each pick leaves the
  set, scores are recomputed on what is left); then per coordinate the mean of the
  beta = theta - 2f chosen values closest to their median.

Memory: these compare every update with every other, so the server keeps the whole round:
O(clients x model) memory (plus an n x n distance matrix), unlike FedAvg's O(model).

Distances are over every floating tensor together, in float64 and fixed name order.
``num_samples`` is ignored (a Byzantine client could lie about it): the means are uniform.
The guarantees need n >= 2f + 3 (Krum) and n >= 4f + 3 (Bulyan); with fewer updates (a
round closed at its deadline) the counts are clamped to at least 1 rather than failing
the round: Krum then uses max(1, n - f - 2) neighbours, Bulyan theta = max(1, n - 2f) and
beta = max(1, theta - 2f).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from brokerfl.handlers.strategies.aggregate import Tensors
from brokerfl.handlers.strategies.base import StrategyOptions
from brokerfl.handlers.strategies.robust import _KeepsUpdates


def flatten(parameters: Tensors, like: Tensors) -> np.ndarray:
    """The floating tensors of ``parameters``, in name order, as one float64 vector."""
    parts = [
        np.asarray(parameters[name], np.float64).ravel()
        for name in sorted(like)
        if np.issubdtype(like[name].dtype, np.floating)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def pairwise_squared_distances(vectors: np.ndarray) -> np.ndarray:
    """n x n squared L2 distances, each from the difference itself (no |a|^2 + |b|^2 - 2ab
    cancellation for updates that are close together)."""
    n = len(vectors)
    out = np.zeros((n, n))
    for i in range(n):
        diff = vectors[i + 1 :] - vectors[i]
        out[i, i + 1 :] = out[i + 1 :, i] = np.einsum("ij,ij->i", diff, diff)
    return out


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """Each update's sum of squared distances to its max(1, n - f - 2) nearest others."""
    n = len(distances)
    if n == 1:
        return np.zeros(1)
    k = min(max(1, n - f - 2), n - 1)
    scores = np.empty(n)
    for i in range(n):
        others = np.delete(distances[i], i)
        scores[i] = np.sort(others)[:k].sum()
    return scores


def multi_krum_select(distances: np.ndarray, f: int, m: int) -> list[int]:
    """Indices of the ``m`` updates with the lowest Krum scores (ties: the earlier fold)."""
    return sorted(np.argsort(krum_scores(distances, f), kind="stable")[:m].tolist())


def bulyan_select(distances: np.ndarray, f: int, theta: int) -> list[int]:
    """``theta`` indices picked by Krum one at a time, each pick leaving the set."""
    remaining = list(range(len(distances)))
    chosen: list[int] = []
    while len(chosen) < theta and remaining:
        sub = distances[np.ix_(remaining, remaining)]
        best = int(np.argmin(krum_scores(sub, f)))  # argmin: the first of equal scores
        chosen.append(remaining.pop(best))
    return chosen


def mean_of(updates: list[Tensors], like: Tensors) -> dict[str, np.ndarray]:
    return {
        name: np.mean(np.stack([np.asarray(u[name], np.float64) for u in updates]), axis=0).astype(like[name].dtype)
        for name in like
    }


def mean_closest_to_median(stacked: np.ndarray, beta: int) -> np.ndarray:
    """Per coordinate, the mean of the ``beta`` values (along axis 0) closest to their
    median; ties go to the earlier row."""
    median = np.median(stacked, axis=0)
    order = np.argsort(np.abs(stacked - median), axis=0, kind="stable")[:beta]
    return np.take_along_axis(stacked, order, axis=0).mean(axis=0)


class KrumOptions(StrategyOptions):
    f: int = Field(1, ge=0, description="Byzantine updates tolerated")


class MultiKrumOptions(KrumOptions):
    m: int | None = Field(None, ge=1, description="updates averaged (default n - f)")


class MultiKrum(_KeepsUpdates):
    """Multi-Krum. Options: ``f`` (Byzantine updates tolerated, default 1) and ``m`` (how
    many lowest-score updates are averaged; default n - f). Memory O(clients x model)."""

    name = "multi_krum"

    Options = MultiKrumOptions

    def selected(self, global_parameters: Tensors) -> list[int]:
        distances = pairwise_squared_distances(np.stack([flatten(u, global_parameters) for u in self._updates]))
        n = len(self._updates)
        m = min(self.m if self.m is not None else max(1, n - self.f), n)
        return multi_krum_select(distances, self.f, m)

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        if not self._updates:
            raise ValueError("no update was folded")
        return mean_of([self._updates[i] for i in self.selected(global_parameters)], global_parameters)


class Krum(MultiKrum):
    """Krum: the one update with the lowest score. Option: ``f`` (default 1). Memory
    O(clients x model)."""

    name = "krum"
    Options = KrumOptions
    m = 1


class Bulyan(_KeepsUpdates):
    """Bulyan. Option: ``f`` (Byzantine updates tolerated, default 1; needs n >= 4f + 3).
    Memory O(clients x model)."""

    name = "bulyan"
    Options = KrumOptions

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        if not self._updates:
            raise ValueError("no update was folded")
        n = len(self._updates)
        theta = max(1, n - 2 * self.f)
        beta = max(1, theta - 2 * self.f)
        distances = pairwise_squared_distances(np.stack([flatten(u, global_parameters) for u in self._updates]))
        chosen = [self._updates[i] for i in bulyan_select(distances, self.f, theta)]
        out = {}
        for name, like in global_parameters.items():
            stacked = np.stack([np.asarray(u[name], np.float64) for u in chosen])
            out[name] = mean_closest_to_median(stacked, beta).astype(like.dtype)
        return out
