"""FedAsync (Xie et al. 2019, "Asynchronous Federated Optimization"), and what every
asynchronous strategy is.

An asynchronous strategy runs on ``brokerfl.handlers.workflows.async_server``: every client always has a task
on the newest model, and each update is folded when it arrives. The strategy says how an
update with a given staleness (model versions since the one it trained on) is folded, and
when the folded updates make a new model version. FedAsync makes one per update:

    w <- (1 - alpha_s) * w + alpha_s * w_client,   alpha_s = alpha * s(staleness)

with s one of the staleness functions of the paper (``brokerfl.handlers.strategies.aggregate.staleness_weight``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from brokerfl.handlers.strategies.aggregate import Tensors, mix, staleness_weight
from brokerfl.handlers.strategies.base import Strategy, StrategyOptions


class AsyncOptions(StrategyOptions):
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial",
        description=(
            "how an update's weight falls with its staleness s "
            "(brokerfl.handlers.strategies.aggregate.staleness_weight)"
        ),
    )
    a: float = Field(0.5, ge=0, description="polynomial: (1 + s)^-a; hinge: 1 / (a (s - b) + 1) beyond b")
    b: float = Field(4.0, ge=0, description="hinge: the staleness up to which updates keep weight 1")
    max_staleness: int = Field(
        10, ge=0, description="an update this many versions old or older is dropped with its reason"
    )


class FedAsyncOptions(AsyncOptions):
    alpha: float = Field(0.6, gt=0, le=1, description="mixing weight of an update of staleness 0")


class AsyncStrategy(Strategy):
    """Base of the asynchronous strategies. Options: ``staleness`` (``constant``,
    ``polynomial`` or ``hinge``) with its parameters ``a`` and ``b``, and ``max_staleness``:
    an update that many versions old or older is dropped with its reason.

    ``fraction`` and ``clients_per_round`` are accepted (they are common strategy settings)
    but unused: every live client always has a task.
    """

    secure_refusal = "it folds each update as it comes, with no round to sum"

    server_handlers = "async_server"
    needs_base = False  # whether fold_async needs the parameters the client trained on
    Options = AsyncOptions

    def weight(self, staleness: int) -> float:
        return staleness_weight(staleness, self.staleness, a=self.a, b=self.b)

    # what brokerfl.handlers.workflows.async_server calls

    @abstractmethod
    def start_version(self, global_parameters: Tensors) -> None:
        """Begin collecting the updates of the next model version."""

    @abstractmethod
    def fold_async(
        self, parameters: Tensors, *, global_parameters: Tensors, base_parameters: Tensors | None, staleness: int
    ) -> float:
        """Fold one checked update; returns the weight it got."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether the folded updates make a new model version now."""

    @abstractmethod
    def finish_version(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        """The next model version from the folded updates."""

    def replay_version(
        self, parent_version: int, parent: Tensors, updates: Sequence[Any], history: Mapping[int, Tensors]
    ) -> dict[str, np.ndarray]:
        """Recompute a stored version (``brokerfl replay``): its updates were folded, in this
        order, while the model was its parent, so each one's staleness is the parent's
        version minus the version it trained on, and its base is that version."""
        self.start_version(parent)
        for update in updates:
            base = None
            if self.needs_base:
                base = history.get(update.model_version)
                if base is None:
                    raise ValueError(
                        f"replaying version {parent_version + 1} needs model version {update.model_version}, which is "
                        "no longer kept"
                    )
            self.fold_async(
                update.parameters,
                global_parameters=parent,
                base_parameters=base,
                staleness=max(parent_version - update.model_version, 0),
            )
        return self.finish_version(parent)

    # the synchronous interface does not apply

    def start_round(self, global_parameters: Tensors) -> None:
        raise NotImplementedError(f"strategy {self.name!r} is asynchronous: run it with server_handlers: async_server")

    fold = finish_round = start_round  # type: ignore[assignment]


class FedAsync(AsyncStrategy):
    """Options: ``alpha`` (mixing weight, default 0.6), and the staleness options of
    :class:`AsyncStrategy`. Each update is a new model version."""

    name = "fedasync"
    Options = FedAsyncOptions
    _next: dict[str, np.ndarray] | None = None

    def start_version(self, global_parameters: Tensors) -> None:
        self._next = None

    def fold_async(
        self, parameters: Tensors, *, global_parameters: Tensors, base_parameters: Tensors | None, staleness: int
    ) -> float:
        if self._next is not None:
            raise RuntimeError("FedAsync folds one update per model version")
        alpha_s = self.alpha * self.weight(staleness)
        self._next = mix(global_parameters, parameters, alpha_s)
        return alpha_s

    def folded(self) -> int:
        return 0 if self._next is None else 1

    def ready(self) -> bool:
        return self._next is not None

    def replay_version(
        self, parent_version: int, parent: Tensors, updates: Sequence[Any], history: Mapping[int, Tensors]
    ) -> dict[str, np.ndarray]:
        """One update per version in a FedAsync run; as a what-if over a round of several
        updates, they are mixed in one after another."""
        model = dict(parent)
        for update in updates:
            model = super().replay_version(parent_version, model, [update], history)
        return model

    def finish_version(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        if self._next is None:
            raise ValueError("no update was folded")
        parameters, self._next = self._next, None
        return parameters
