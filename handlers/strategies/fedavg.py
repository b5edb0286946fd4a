"""FedAvg: the sample-weighted average of the round's updates (McMahan et al. 2017)."""

from __future__ import annotations

import numpy as np

from brokerfl.handlers.strategies.aggregate import RunningSum, Tensors, fold_update, new_running_sum, weighted_average
from brokerfl.handlers.strategies.base import Strategy


class FedAvg(Strategy):
    name = "fedavg"

    _sum: RunningSum | None = None

    def start_round(self, global_parameters: Tensors) -> None:
        self._sum = new_running_sum(global_parameters, reuse=self._sum)

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        fold_update(self._sum, parameters, float(num_samples))

    def folded(self) -> int:
        return self._sum.count if self._sum else 0

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        return weighted_average(self._sum, global_parameters)
