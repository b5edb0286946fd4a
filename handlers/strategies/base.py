"""What a strategy is, and how a config names one.

A strategy turns the updates of a round into the next global model. The server's handler
set (``handlers/workflows/server.py``) does the messaging; a strategy does only the arithmetic, so a
new one is a small class: ``sample``, ``start_round``, ``fold``, ``finish_round``.

A stateful strategy (a server optimizer's moments, an adaptive clipping norm, privacy spent)
also says what state goes with each model version (``state_arrays``, stored atomically with
the version) and takes it back when a server resumes (``resume``); ``replay`` recomputes it
by replaying every version in order on one strategy object. ``round_metrics`` adds fields to
each version's metrics line, ``stop_reason`` ends a run early (a privacy budget), and
``client_update`` is applied by each client to its update before sending it (local DP).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from handlers.strategies.aggregate import Tensors

if TYPE_CHECKING:
    from brokerfl.config import RunConfig

BUILT_IN = {
    "fedavg": "handlers.strategies.fedavg:FedAvg",
    "median": "handlers.strategies.robust:Median",
    "trimmed_mean": "handlers.strategies.robust:TrimmedMean",
    "fedasync": "handlers.strategies.fedasync:FedAsync",
    "fedbuff": "handlers.strategies.fedbuff:FedBuff",
    "fedadam": "handlers.strategies.fedopt:FedAdam",
    "fedyogi": "handlers.strategies.fedopt:FedYogi",
    "fedadagrad": "handlers.strategies.fedopt:FedAdagrad",
    "fedavgm": "handlers.strategies.fedopt:FedAvgM",
    "krum": "handlers.strategies.krum:Krum",
    "multi_krum": "handlers.strategies.krum:MultiKrum",
    "bulyan": "handlers.strategies.krum:Bulyan",
    "norm_bounding": "handlers.strategies.clipping:NormBounding",
    "dp_fedavg": "handlers.strategies.dp:DPFedAvg",
    "cyclic": "handlers.strategies.cyclic:Handover",
}


class Strategy:
    name = "strategy"
    server_handlers = "handlers.workflows.server"  # synchronous rounds; asynchronous strategies name theirs

    def __init__(self, *, fraction: float = 1.0, clients_per_round: int | None = None, **options: Any) -> None:
        if options:
            raise ValueError(f"strategy {self.name!r} has no option(s) {sorted(options)}")
        self.fraction = fraction
        self.clients_per_round = clients_per_round
        self.run_seed = 0
        self.federation_size: int | None = None

    def bind_run(self, *, seed: int, clients: int) -> None:
        """What a strategy may know of its run: the seed (noise that replay must reproduce is
        drawn from it) and the federation's size (a sampling rate for privacy accounting)."""
        self.run_seed = seed
        self.federation_size = clients

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

    def configure_train(self, round_: int) -> dict[str, Any]:
        """Per-round settings this strategy sends with round ``round_``'s TrainTask: train
        settings (``lr``, ``epochs``, ...) override the run's ``train`` section for that
        round, and the whole dict reaches an app's ``train`` as ``context.config``
        (:mod:`brokerfl.app`). None by default."""
        return {}

    def start_round(self, global_parameters: Tensors) -> None:
        raise NotImplementedError

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        """Fold one checked update (it matches the global model's names and shapes)."""
        raise NotImplementedError

    def folded(self) -> int:
        raise NotImplementedError

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # state that goes with a model version (none by default)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays stored with the version just finished, atomically with it."""
        return {}

    def resume(self, version: int, state: Mapping[str, np.ndarray]) -> None:
        """Take back the state stored with ``version`` (a restarted server; empty for version 0)."""

    def round_metrics(self) -> dict[str, Any]:
        """Fields added to the metrics line of the version just finished."""
        return {}

    def stop_reason(self) -> str | None:
        """Why the run must stop before another round (e.g. a spent privacy budget), or None."""
        return None

    @classmethod
    def client_update(cls, options: Mapping[str, Any], *, seed: int, client_id: str, round_: int, global_parameters: Tensors, parameters: Tensors) -> Tensors:
        """Applied by a client to its trained parameters before sending them (local DP)."""
        return parameters

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


def strategy_for_run(config: RunConfig, name: str | None = None, options: Mapping[str, Any] | None = None) -> Strategy:
    """The run's strategy (or ``name`` with ``options``, a what-if), bound to the run."""
    strategy = load_strategy(
        name or config.strategy.name,
        fraction=config.strategy.fraction,
        clients_per_round=config.strategy.clients_per_round,
        **(config.strategy.options if options is None else options),
    )
    strategy.bind_run(seed=config.seed, clients=config.clients)
    return strategy


@lru_cache(maxsize=16)
def _cached_class(name: str) -> type[Strategy]:
    return strategy_class(name)


def prepare_update(config: RunConfig, client_id: str, round_: int, global_parameters: Tensors, parameters: Tensors) -> Tensors:
    """What a client sends: its trained parameters as the run's strategy wants them sent."""
    cls = _cached_class(config.strategy.name)
    if cls.client_update.__func__ is Strategy.client_update.__func__:
        return parameters
    return cls.client_update(config.strategy.options, seed=config.seed, client_id=client_id, round_=round_, global_parameters=global_parameters, parameters=parameters)
