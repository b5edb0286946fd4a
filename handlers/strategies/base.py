"""What a strategy is, and how a config names one.

A strategy turns the updates of a round into the next global model. The server's handler
set (``handlers/workflows/server.py``) does the messaging; a strategy does only the arithmetic, so a
new one is a small class: ``start_round``, ``fold``, ``folded`` and ``finish_round`` (who is
sampled, ``sample``, has a default).

A stateful strategy (a server optimizer's moments, an adaptive clipping norm, privacy spent)
also says what state goes with each model version (``state_arrays``, stored atomically with
the version) and takes it back when a server resumes (``resume``); ``replay`` recomputes it
by replaying every version in order on one strategy object. ``round_metrics`` adds fields to
each version's metrics line, ``stop_reason`` ends a run early (a privacy budget), and
``client_update`` is applied by each client to its update before sending it (local DP).

A strategy whose round needs only the weighted sum of the clients' deltas says so with
``secure_sum = True`` and takes that sum in ``fold_sum``: secure aggregation
(:mod:`brokerfl.handlers.secure`) then shows the server that sum and no update.
``secure_contribution`` is what each client adds to it (by default its delta, weighted by
its sample count). Strategies that need each update (median, Krum, ...) are refused with
secure aggregation when the config is read.

Every strategy must implement the abstract methods below; a class missing one is refused
when the config naming it is loaded, not at its first deadline. Its options are a typed
pydantic model, ``Options`` (name, type, default and a one-line description per field):
the config's ``strategy.options`` are validated against it when the config is loaded (an
unknown or mistyped option is an error naming the strategy and the option), and each
option is then read as an attribute of the strategy (``self.eta``).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

import brokerfl.config.builtins as builtins
from brokerfl.handlers.strategies.aggregate import Tensors

if TYPE_CHECKING:
    from brokerfl.config import RunConfig

BUILT_IN = builtins.BUILTINS["strategy"]
TORCH_EXTRA = "pip install 'brokerfl[torch]'"


class StrategyOptions(BaseModel):
    """A strategy's options: one typed field each, with its default and a one-line
    ``description``. Strict: ``true`` is no number and ``"0.1"`` no float."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class OptionError(ValueError):
    """Options a strategy does not take, or of the wrong type or range."""


@dataclass(frozen=True)
class SecureSum:
    """A secure round's unmasked sum (sum_i w_i delta_i over ``count`` clients of total
    weight ``total_weight``): what :meth:`Strategy.fold_sum` takes, and what replay folds
    in place of the round's updates."""

    delta_sum: Mapping[str, np.ndarray]
    total_weight: float
    count: int


class Strategy(ABC):
    name = "strategy"
    server_handlers = "server"  # synchronous rounds (a built-in short name); asynchronous strategies name theirs
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    requires: ClassVar[tuple[str, ...]] = ()  # modules of the torch extra it needs (checked at config load)

    def __init__(self, *, fraction: float = 1.0, clients_per_round: int | None = None, **options: Any) -> None:
        self.options = self.parse_options(options)
        self.fraction = fraction
        self.clients_per_round = clients_per_round
        self.run_seed = 0
        self.federation_size: int | None = None

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> StrategyOptions:
        """``options`` checked against :attr:`Options`; an :class:`OptionError` naming the
        strategy and each option at fault."""
        try:
            return cls.Options.model_validate(dict(options))
        except ValidationError as exc:
            raise OptionError(
                f"strategy {cls.name!r}: " + "; ".join(_describe_option(cls, e) for e in exc.errors())
            ) from None

    def __getattr__(self, name: str) -> Any:
        """An option, read as an attribute (``self.eta``); called only for names the
        strategy itself does not have."""
        if name != "options" and name in type(self).Options.model_fields and "options" in self.__dict__:
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def bind_run(self, *, seed: int, clients: int) -> None:
        """What a strategy may know of its run: the seed (noise that replay must reproduce is
        drawn from it) and the federation's size (a sampling rate for privacy accounting)."""
        self.run_seed = seed
        self.federation_size = clients

    def check_run(self) -> None:
        """Checks of the options that need the run (its size, its sampling), made when the
        config is loaded: a ValueError naming the strategy and saying what to change. Most
        strategies need none."""
        return None

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

    @abstractmethod
    def start_round(self, global_parameters: Tensors) -> None:
        """Begin collecting the updates of a round on ``global_parameters``."""

    @abstractmethod
    def fold(self, parameters: Tensors, num_samples: int) -> None:
        """Fold one checked update (it matches the global model's names and shapes)."""

    @abstractmethod
    def folded(self) -> int:
        """How many updates were folded since the round (or version) began."""

    @abstractmethod
    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        """The next global model from the folded updates."""

    # state that goes with a model version (none by default)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays stored with the version just finished, atomically with it."""
        return {}

    def resume(self, version: int, state: Mapping[str, np.ndarray]) -> None:  # noqa: B027 - optional: a strategy with no state of its own resumes as it is
        """Take back the state stored with ``version`` (a restarted server; empty for version 0)."""

    def round_metrics(self) -> dict[str, Any]:
        """Fields added to the metrics line of the version just finished."""
        return {}

    def stop_reason(self) -> str | None:
        """Why the run must stop before another round (e.g. a spent privacy budget), or None."""
        return None

    @classmethod
    def client_update(
        cls,
        options: Mapping[str, Any],
        *,
        seed: int,
        client_id: str,
        round_: int,
        global_parameters: Tensors,
        parameters: Tensors,
    ) -> Tensors:
        """Applied by a client to its trained parameters before sending them (local DP)."""
        return parameters

    # secure aggregation: the round's sum only

    secure_sum: ClassVar[bool] = False  # a round needs only sum_i w_i delta_i (fold_sum implemented)
    secure_refusal: ClassVar[str] = "it needs each client's update"  # why not, when secure_sum is False

    @classmethod
    def secure_contribution(
        cls,
        options: Mapping[str, Any],
        *,
        global_parameters: Tensors,
        parameters: Tensors,
        num_samples: int,
    ) -> tuple[dict[str, np.ndarray], int]:
        """What a client adds to a secure round's sum: its delta from the global model
        (float64) and its integer weight (by default its sample count)."""
        return {
            name: np.asarray(parameters[name], np.float64) - np.asarray(g, np.float64)
            for name, g in global_parameters.items()
        }, int(num_samples)

    def secure_check(self) -> str | None:
        """Why these options cannot run with secure aggregation (None: they can)."""
        return None

    def fold_sum(self, delta_sum: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        """Take a secure round's sum, sum_i w_i delta_i over ``count`` clients of total weight
        ``total_weight``, in place of ``count`` folds (after ``start_round``)."""
        raise NotImplementedError(f"strategy {self.name!r} does not take a secure sum")

    def replay_version(
        self, parent_version: int, parent: Tensors, updates: Sequence[Any], history: Mapping[int, Tensors]
    ) -> dict[str, np.ndarray]:
        """Recompute a stored version from its parent and its updates (ParameterUpdates, in
        fold order, or a secure round's :class:`SecureSum`), for ``brokerfl replay``;
        ``history`` holds recent versions' parameters. Synchronous strategies fold a round;
        asynchronous ones override this."""
        self.start_round(parent)
        for update in updates:
            if isinstance(update, SecureSum):
                self.fold_sum(update.delta_sum, update.total_weight, update.count)
            else:
                self.fold(update.parameters, update.num_samples)
        return self.finish_round(parent)


def strategy_class(name: str) -> type[Strategy]:
    """A built-in name (``fedavg``) or ``module:Class``."""
    try:
        target = builtins.resolve("strategy", name)
    except builtins.UnknownBuiltin as exc:
        raise ValueError(str(exc)) from None
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load strategy {name!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ValueError(f"{target} is not a Strategy")
    return cls


def complete_strategy_class(name: str) -> type[Strategy]:
    """:func:`strategy_class`, refused if it leaves an abstract method unimplemented."""
    cls = strategy_class(name)
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise ValueError(
            f"strategy {name!r}: class {cls.__qualname__} does not implement {missing} (every strategy must; see "
            "brokerfl.handlers.strategies.base.Strategy)"
        )
    return cls


def check_strategy(name: str, options: Mapping[str, Any]) -> type[Strategy]:
    """What a config's loading checks of its strategy: it loads, implements every abstract
    method, has what it requires installed, and takes ``options``. A ValueError saying
    what is wrong."""
    cls = complete_strategy_class(name)
    for module in cls.requires:
        if not _installed(module):
            raise ValueError(f"strategy {name!r} needs {module}, which is not installed: {TORCH_EXTRA}")
    cls.parse_options(options)
    return cls


def check_strategy_for_run(config: RunConfig) -> None:
    """:func:`check_strategy`, then the checks that need the run (:meth:`Strategy.check_run`)."""
    check_strategy(config.strategy.name, config.strategy.options)
    strategy_for_run(config).check_run()  # binding it to the run checks what bind_run checks too


def check_secure_strategy(config: RunConfig) -> None:
    """Secure aggregation shows the server only the weighted sum of a round's deltas: the
    run's strategy must need nothing else (a ValueError saying why not, and which do)."""
    cls = strategy_class(config.strategy.name)
    if not cls.secure_sum:
        able = sorted(name for name in BUILT_IN if _secure_builtin(name))
        raise ValueError(
            f"secure_aggregation shows the server only the sum of the updates, and strategy {config.strategy.name!r} "
            f"cannot work from that: {cls.secure_refusal}; strategies that can: {', '.join(able)}"
        )
    why_not = strategy_for_run(config).secure_check()
    if why_not is not None:
        raise ValueError(f"secure_aggregation with strategy {config.strategy.name!r}: {why_not}")


def _secure_builtin(name: str) -> bool:
    try:
        return strategy_class(name).secure_sum
    except ValueError:
        return False


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (it may be heavy)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _describe_option(cls: type[Strategy], error: Any) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return (
            f"no option {where!r} (its options: {', '.join(cls.Options.model_fields) or 'none'}; a strategy declares "
            "its options in its Options class)"
        )
    message = error["msg"].removeprefix("Value error, ")
    if not where:  # a check across options names them itself
        return message
    return f"option {where!r}: {message} (got {error.get('input')!r})"


def load_strategy(name: str, **settings: Any) -> Strategy:
    return complete_strategy_class(name)(**settings)


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


def secure_contribution(
    config: RunConfig, global_parameters: Tensors, parameters: Tensors, num_samples: int
) -> tuple[dict[str, np.ndarray], int]:
    """What a client adds to a secure round's sum, as the run's strategy wants it
    (:meth:`Strategy.secure_contribution`): its delta and its integer weight."""
    return _cached_class(config.strategy.name).secure_contribution(
        config.strategy.options, global_parameters=global_parameters, parameters=parameters, num_samples=num_samples
    )


def prepare_update(
    config: RunConfig, client_id: str, round_: int, global_parameters: Tensors, parameters: Tensors
) -> Tensors:
    """What a client sends: its trained parameters as the run's strategy wants them sent."""
    cls = _cached_class(config.strategy.name)
    if cls.client_update.__func__ is Strategy.client_update.__func__:
        return parameters
    return cls.client_update(
        config.strategy.options,
        seed=config.seed,
        client_id=client_id,
        round_=round_,
        global_parameters=global_parameters,
        parameters=parameters,
    )
