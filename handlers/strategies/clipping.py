"""Clipping an update's distance from the global model, and norm-bounded FedAvg.

Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?"): each
client's delta from the global model is scaled down to at most ``max_norm`` (L2 over every
floating tensor together), then the clipped deltas are averaged:

    w <- w + sum_i a_i clip(w_i - w, max_norm) / sum_i a_i

with a_i = 1 by default, so that a poisoned update moves the model no further than an
honest one: at most max_norm / n per round, n the round's updates. With ``weighted: true``
a_i is the client's sample count, as in FedAvg; a client's count is bounded by what it
declared at its Join (``handlers/workflows/server.py``), but the declaration is its own
word, so one declaring a large partition would scale its clipped delta up to max_norm
itself: weight only clients you trust about their data. Flower's DP wrappers with fixed
clipping likewise clip each update and leave the weighting to the strategy they wrap.
Each clipped delta is folded into a float64 running sum as it arrives, so unlike Krum and
Bulyan the server memory stays O(model). DP-FedAvg (``brokerfl.handlers.strategies.dp``) clips the
same way, unweighted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from brokerfl.handlers.strategies.aggregate import RunningSum, Tensors, fold_update, new_running_sum
from brokerfl.handlers.strategies.base import Strategy, StrategyOptions


def delta_norm(parameters: Tensors, base: Tensors) -> float:
    """L2 norm of parameters - base over every floating tensor, in float64."""
    total = 0.0
    for name, b in base.items():
        if np.issubdtype(b.dtype, np.floating):
            diff = np.asarray(parameters[name], np.float64) - b
            total += float(np.dot(diff.ravel(), diff.ravel()))
    return float(np.sqrt(total))


def clip_factor(norm: float, max_norm: float) -> float:
    """min(1, max_norm / norm): the scale that brings a delta of ``norm`` within ``max_norm``."""
    return 1.0 if norm <= max_norm else max_norm / norm


def apply_mean_clipped(acc: RunningSum, global_parameters: Tensors, denominator: float) -> dict[str, np.ndarray]:
    """global + (sum of folded clipped deltas) / denominator, in the global model's dtypes."""
    out = {}
    for name, w in global_parameters.items():
        stepped = acc.sums[name] / denominator
        stepped += w
        out[name] = stepped.astype(w.dtype, copy=False)
    return out


class NormBoundingOptions(StrategyOptions):
    max_norm: float = Field(1.0, gt=0, description="the largest L2 distance an update may keep from the global model")
    weighted: bool = Field(
        False, description="false: every clipped update counts once; true: weighted by its sample count"
    )


class NormBounding(Strategy):
    """Norm-bounded FedAvg. Options: ``max_norm`` (default 1.0), the largest L2 distance an
    update may keep from the global model, and ``weighted`` (default false: every clipped
    update counts once; true: weighted by its sample count). Memory O(model)."""

    name = "norm_bounding"
    secure_refusal = (
        "it bounds each update's norm on the server, against clients that would not (under secure aggregation only "
        "the clients could)"
    )

    Options = NormBoundingOptions

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._sum: RunningSum | None = None
        self._global: Tensors = {}
        self._weight = 0.0

    def start_round(self, global_parameters: Tensors) -> None:
        self._sum = new_running_sum(global_parameters, reuse=self._sum)
        self._global = global_parameters
        self._weight = 0.0

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        weight = float(num_samples) if self.weighted else 1.0
        scale = clip_factor(delta_norm(parameters, self._global), self.max_norm)
        fold_update(self._sum, parameters, weight * scale, base=self._global)
        self._weight += weight

    def folded(self) -> int:
        return self._sum.count if self._sum else 0

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        if not self.folded():
            raise ValueError("no update was folded")
        return apply_mean_clipped(self._sum, global_parameters, self._weight)
