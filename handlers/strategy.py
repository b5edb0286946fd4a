"""What a strategy is, and how a config names one.

A strategy turns the updates of a round into the next global model. The server's handler
set (``handlers/server.py``) does the messaging; a strategy does only the arithmetic, so a
new one is a small class: ``sample``, ``start_round``, ``fold``, ``finish_round``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from handlers.aggregate import Tensors

BUILT_IN = {
    "fedavg": "handlers.fedavg:FedAvg",
    "median": "handlers.robust:Median",
    "trimmed_mean": "handlers.robust:TrimmedMean",
    "fedasync": "handlers.fedasync:FedAsync",
    "fedbuff": "handlers.fedbuff:FedBuff",
}


class Strategy:
    name = "strategy"
    server_handlers = "handlers.server"  # synchronous rounds; asynchronous strategies name theirs

    def __init__(self, *, fraction: float = 1.0, clients_per_round: int | None = None, **options: Any) -> None:
        if options:
            raise ValueError(f"strategy {self.name!r} has no option(s) {sorted(options)}")
        self.fraction = fraction
        self.clients_per_round = clients_per_round

    def sample(self, round_: int, available: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Who trains this round: ``clients_per_round`` of them, else ``fraction`` (at least one)."""
        available = sorted(available)
        if not available:
            return []
        want = self.clients_per_round or max(1, round(self.fraction * len(available)))
        want = min(want, len(available))
        if want == len(available):
            return available
        return sorted(rng.choice(available, size=want, replace=False).tolist())

    def start_round(self, global_parameters: Tensors) -> None:
        raise NotImplementedError

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        """Fold one checked update (it matches the global model's names and shapes)."""
        raise NotImplementedError

    def folded(self) -> int:
        raise NotImplementedError

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def replay_version(self, parent_version: int, parent: Tensors, updates: Sequence[Any], history: Mapping[int, Tensors]) -> dict[str, np.ndarray]:
        """Recompute a stored version from its parent and its updates (ParameterUpdates, in
        fold order), for ``brokerfl replay``; ``history`` holds recent versions' parameters.
        Synchronous strategies fold a round; asynchronous ones override this."""
        self.start_round(parent)
        for update in updates:
            self.fold(update.parameters, update.num_samples)
        return self.finish_round(parent)


def strategy_class(name: str) -> type[Strategy]:
    """A built-in name (``fedavg``) or ``module:Class``."""
    target = BUILT_IN.get(name, name)
    if ":" not in target:
        raise ValueError(f"unknown strategy {name!r}: use one of {sorted(BUILT_IN)} or 'module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load strategy {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"{target} is not a Strategy")
    return cls


def load_strategy(name: str, **settings: Any) -> Strategy:
    try:
        return strategy_class(name)(**settings)
    except TypeError as exc:  # e.g. an option the strategy does not take
        raise ValueError(f"strategy {name!r}: {exc}") from None
