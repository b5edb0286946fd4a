"""Cyclic weight transfer: each model version is one client's parameters, handed on.

No arithmetic: the next global model is the holder's update as it is. The messaging
(who holds the model, timeouts) is ``handlers/workflows/cyclic.py``.
"""

from __future__ import annotations

import numpy as np

from brokerfl.handlers.strategies.aggregate import Tensors
from brokerfl.handlers.strategies.base import Strategy


class Handover(Strategy):
    name = "cyclic"
    server_handlers = "cyclic"
    secure_refusal = "it hands one client's parameters on"

    def start_round(self, global_parameters: Tensors) -> None:
        self._held: Tensors | None = None

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        if self._held is not None:
            raise ValueError("a cyclic hop takes exactly one update")
        self._held = parameters

    def folded(self) -> int:
        return 0 if self._held is None else 1

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        if self._held is None:
            raise ValueError("a cyclic hop closed without an update")
        return {name: np.asarray(value) for name, value in self._held.items()}
