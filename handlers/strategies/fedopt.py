"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization",
Algorithm 2) and server momentum (FedAvgM, Hsu et al. 2019).

The round's updates are folded into FedAvg's float64 running sum (server memory O(model));
the pseudo-gradient is delta = (sample-weighted mean of the clients' parameters) - x, and

    m <- beta_1 m + (1 - beta_1) delta
    v <- v + delta^2                                      FedAdagrad
    v <- beta_2 v + (1 - beta_2) delta^2                  FedAdam
    v <- v - (1 - beta_2) delta^2 sign(v - delta^2)       FedYogi
    x <- x + eta_t m / (sqrt(v) + tau)

The step size: by default the paper's plain step, eta_t = eta, with v starting at tau^2
(the paper's v_{-1} >= tau^2; ``initial_v`` sets it). This plain step is also what Flower's
FedYogi and FedAdagrad take. ``bias_correction: true`` takes the bias-corrected step of
Flower's FedAdam instead (accepted by FedYogi too, where Flower has no counterpart),
eta_t = eta sqrt(1 - beta_2^(t+1)) / (1 - beta_1^(t+1)) with t = 1, 2, ... the server step
(Flower's exponent is its 1-based round + 1, one more than Kingma & Ba's t); to match
Flower's FedAdam exactly set ``initial_v: 0`` too, as Flower starts v at zero.

FedAvgM: v <- momentum v + delta, x <- x + eta v (Flower's FedAvgM with its pseudo-gradient
-delta). m, v and the step count are state stored with every model version (float64), so a
restarted server resumes them and ``brokerfl replay`` recomputes them.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from brokerfl.handlers.strategies.aggregate import Tensors, weighted_average
from brokerfl.handlers.strategies.base import StrategyOptions
from brokerfl.handlers.strategies.fedavg import FedAvg

# ---------------------------------------------------------------- the arithmetic


def first_moment(m: np.ndarray, delta: np.ndarray, beta_1: float) -> np.ndarray:
    return beta_1 * m + (1.0 - beta_1) * delta


def second_moment(kind: str, v: np.ndarray, delta: np.ndarray, beta_2: float) -> np.ndarray:
    squared = delta * delta
    if kind == "adagrad":
        return v + squared
    if kind == "adam":
        return beta_2 * v + (1.0 - beta_2) * squared
    if kind == "yogi":
        return v - (1.0 - beta_2) * squared * np.sign(v - squared)
    raise ValueError(f"unknown adaptive optimizer {kind!r}")


def bias_corrected_eta(eta: float, beta_1: float, beta_2: float, step: int) -> float:
    """Flower's FedAdam step size at server step ``step`` (1, 2, ...)."""
    return eta * np.sqrt(1.0 - beta_2 ** (step + 1.0)) / (1.0 - beta_1 ** (step + 1.0))


def adaptive_step(x: np.ndarray, m: np.ndarray, v: np.ndarray, eta: float, tau: float) -> np.ndarray:
    return x + eta * m / (np.sqrt(v) + tau)


def mean_update(strategy: FedAvg, global_parameters: Tensors) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(FedAvg's result in the model's dtypes, float64 pseudo-gradients of its floating tensors)."""
    averaged = weighted_average(strategy._sum, global_parameters)
    deltas = {
        name: strategy._sum.sums[name] / strategy._sum.total_weight - np.asarray(x, np.float64)
        for name, x in global_parameters.items()
        if np.issubdtype(x.dtype, np.floating)
    }
    return averaged, deltas


# ---------------------------------------------------------------- the options


class AdaptiveOptions(StrategyOptions):
    eta: float = Field(0.01, gt=0, description="server step size")
    beta_1: float = Field(0.9, ge=0, lt=1, description="decay of the first moment m")
    beta_2: float = Field(0.99, ge=0, lt=1, description="decay of the second moment v (FedAdam, FedYogi)")
    tau: float = Field(1e-3, gt=0, description="adaptivity: the floor under sqrt(v)")
    initial_v: float | None = Field(None, ge=0, description="v before the first step (default tau^2; Flower's 0)")
    bias_correction: bool = Field(
        False, description="false: the paper's plain step; true: Flower's FedAdam's bias-corrected step"
    )


class AdagradOptions(AdaptiveOptions):
    @model_validator(mode="after")
    def _no_bias_correction(self) -> AdagradOptions:
        if self.bias_correction:
            raise ValueError("bias_correction applies to fedadam and fedyogi (Adagrad has no beta_2 decay to correct)")
        return self


class FedAvgMOptions(StrategyOptions):
    eta: float = Field(1.0, gt=0, description="server learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="server momentum; 0 with eta 1 is FedAvg")


# ---------------------------------------------------------------- the strategies


class _ServerOptimizer(FedAvg):
    """FedAvg's fold, then a server step with state kept per floating tensor."""

    state_names: tuple[str, ...] = ()

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._state: dict[str, dict[str, np.ndarray]] = {}  # "m" -> tensor name -> array
        self.steps = 0

    def state_arrays(self) -> dict[str, np.ndarray]:
        out = {f"{kind}/{name}": array for kind, arrays in self._state.items() for name, array in arrays.items()}
        out["steps"] = np.array(self.steps, np.int64)
        return out

    def resume(self, version: int, state: Mapping[str, np.ndarray]) -> None:
        self._state = {}
        self.steps = int(state["steps"]) if "steps" in state else 0
        for key, array in state.items():
            kind, _, name = key.partition("/")
            if kind in self.state_names and name:
                self._state.setdefault(kind, {})[name] = np.array(array, np.float64)  # a writable copy

    def _moment(self, kind: str, name: str, like: np.ndarray, initial: float = 0.0) -> np.ndarray:
        arrays = self._state.setdefault(kind, {})
        if name not in arrays or arrays[name].shape != like.shape:
            arrays[name] = np.full(like.shape, initial, np.float64)
        return arrays[name]

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        out, deltas = mean_update(self, global_parameters)
        self.steps += 1
        for name, delta in deltas.items():
            x = global_parameters[name]
            out[name] = self.step(name, np.asarray(x, np.float64), delta).astype(x.dtype, copy=False)
        return out

    @abstractmethod
    def step(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """The server step of one floating tensor ``x`` with pseudo-gradient ``delta``."""


class _Adaptive(_ServerOptimizer):
    """FedAdagrad, FedAdam, FedYogi: options in :class:`AdaptiveOptions`."""

    kind = ""
    state_names = ("m", "v")
    Options = AdaptiveOptions
    options: AdaptiveOptions

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.initial_v: float = self.tau**2 if self.options.initial_v is None else self.options.initial_v

    def step(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        m = self._state["m"][name] = first_moment(self._moment("m", name, delta), delta, self.beta_1)
        v = self._state["v"][name] = second_moment(
            self.kind, self._moment("v", name, delta, self.initial_v), delta, self.beta_2
        )
        eta = bias_corrected_eta(self.eta, self.beta_1, self.beta_2, self.steps) if self.bias_correction else self.eta
        return adaptive_step(x, m, v, eta, self.tau)


class FedAdam(_Adaptive):
    name = "fedadam"
    kind = "adam"


class FedYogi(_Adaptive):
    name = "fedyogi"
    kind = "yogi"


class FedAdagrad(_Adaptive):
    name = "fedadagrad"
    kind = "adagrad"
    Options = AdagradOptions


class FedAvgM(_ServerOptimizer):
    """Server momentum (Hsu et al. 2019): options in :class:`FedAvgMOptions`."""

    name = "fedavgm"
    state_names = ("momentum",)
    Options = FedAvgMOptions

    def step(self, name: str, x: np.ndarray, delta: np.ndarray) -> np.ndarray:
        velocity = self._state["momentum"][name] = self.momentum * self._moment("momentum", name, delta) + delta
        return x + self.eta * velocity
