"""FedAvg: the sample-weighted average of the round's updates (McMahan et al. 2017)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from brokerfl.handlers.strategies.aggregate import (
    RunningSum,
    Tensors,
    fold_sum,
    fold_update,
    new_running_sum,
    weighted_average,
)
from brokerfl.handlers.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"
    secure_sum = True

    _sum: RunningSum | None = None
    _global: Tensors = {}

    def start_round(self, global_parameters: Tensors) -> None:
        self._sum = new_running_sum(global_parameters, reuse=self._sum)
        self._global = global_parameters

    def fold_sum(self, delta_sum: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        # sum_i w_i x_i = sum_i w_i delta_i + W x: the weighted average then as from count folds
        fold_sum(self._sum, delta_sum, total_weight, count, base=self._global)

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        fold_update(self._sum, parameters, float(num_samples))

    def folded(self) -> int:
        return self._sum.count if self._sum else 0

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        return weighted_average(self._sum, global_parameters)
