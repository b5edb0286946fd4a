"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation").

Clients send full parameters trained on model version v; the server folds each client's
staleness-weighted delta ``s(staleness) * (w_client - w_v)`` into a float64 running sum as
it arrives (O(model) memory however many updates), and after ``buffer_size`` (K) updates
takes one step, as in the paper's Algorithm 1 (mean over K, not over the weights):

    w <- w + server_lr * (sum of the K weighted deltas) / K

The parameters w_v of the versions clients train on come from the server's cache of recent
versions (``handlers.workflows.async_server``); staleness weighting as in FedAsync.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from handlers.strategies.aggregate import RunningSum, Tensors, apply_mean_delta, fold_update, new_running_sum
from handlers.strategies.fedasync import AsyncStrategy


class FedBuff(AsyncStrategy):
    """Options: ``buffer_size`` (K, default 4), ``server_lr`` (default 1.0), and the staleness
    options of :class:`AsyncStrategy` (default polynomial, a = 0.5; max_staleness 10)."""

    name = "fedbuff"
    needs_base = True

    def __init__(self, *, buffer_size: int = 4, server_lr: float = 1.0, **settings: Any) -> None:
        super().__init__(**settings)
        if not (isinstance(buffer_size, int) and not isinstance(buffer_size, bool) and buffer_size >= 1):
            raise ValueError(f"strategy 'fedbuff': buffer_size must be an integer >= 1, got {buffer_size!r}")
        if not (isinstance(server_lr, (int, float)) and server_lr > 0):
            raise ValueError(f"strategy 'fedbuff': server_lr must be > 0, got {server_lr!r}")
        self.buffer_size = buffer_size
        self.server_lr = float(server_lr)
        self._sum: RunningSum | None = None

    def start_version(self, global_parameters: Tensors) -> None:
        self._sum = new_running_sum(global_parameters, reuse=self._sum)

    def fold_async(self, parameters: Tensors, *, global_parameters: Tensors, base_parameters: Tensors | None, staleness: int) -> float:
        if base_parameters is None:
            raise ValueError("FedBuff needs the parameters of the model version the client trained on")
        weight = self.weight(staleness)
        fold_update(self._sum, parameters, weight, base=base_parameters)
        return weight

    def folded(self) -> int:
        return self._sum.count if self._sum else 0

    def ready(self) -> bool:
        return self.folded() >= self.buffer_size

    def finish_version(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        parameters = apply_mean_delta(self._sum, global_parameters, self.server_lr)
        self.start_version(global_parameters)
        return parameters
