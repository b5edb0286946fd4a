"""FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation").

Clients send full parameters trained on model version v; the server folds each client's
staleness-weighted delta ``s(staleness) * (w_client - w_v)`` into a float64 running sum as
it arrives (O(model) memory however many updates), and after ``buffer_size`` (K) updates
takes one step, as in the paper's Algorithm 1 (mean over K, not over the weights):

    w <- w + server_lr * (sum of the K weighted deltas) / K

The parameters w_v of the versions clients train on come from the server's cache of recent
versions (``brokerfl.handlers.workflows.async_server``); staleness weighting as in FedAsync.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from brokerfl.handlers.strategies.aggregate import RunningSum, Tensors, apply_mean_delta, fold_update, new_running_sum
from brokerfl.handlers.strategies.fedasync import AsyncOptions, AsyncStrategy


class FedBuffOptions(AsyncOptions):
    buffer_size: int = Field(4, ge=1, description="K: updates folded into each new model version")
    server_lr: float = Field(1.0, gt=0, description="the server's step on the mean of the K weighted deltas")


class FedBuff(AsyncStrategy):
    """Options: ``buffer_size`` (K, default 4), ``server_lr`` (default 1.0), and the staleness
    options of :class:`AsyncStrategy` (default polynomial, a = 0.5; max_staleness 10)."""

    name = "fedbuff"
    needs_base = True

    Options = FedBuffOptions
    _sum: RunningSum | None = None

    def start_version(self, global_parameters: Tensors) -> None:
        self._sum = new_running_sum(global_parameters, reuse=self._sum)

    def fold_async(
        self, parameters: Tensors, *, global_parameters: Tensors, base_parameters: Tensors | None, staleness: int
    ) -> float:
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
