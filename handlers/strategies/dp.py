"""DP-FedAvg: differential privacy at the client level (McMahan et al. 2018, "Learning
Differentially Private Recurrent Language Models"), with adaptive clipping (Andrew et al.
2021, "Differentially Private Learning with Adaptive Clipping").

Central DP (``mode: central``, the server is trusted with individual updates): the server
clips each client's delta from the global model to L2 norm C, sums the clipped deltas
(uniform weights: a client's influence is bounded by C whatever its num_samples), adds
Gaussian noise N(0, (z C)^2) per coordinate and divides by the *expected* number of clients
per round m (the paper's fixed-denominator estimator):

    x <- x + (sum_i clip(delta_i, C) + N(0, z^2 C^2 I)) / m

Local DP (``mode: local``): each client clips its own delta to C and adds N(0, (z C)^2)
before sending (``DPFedAvg.client_update``, called by the client handler set); the server
averages what arrives. The server sees who answered, so no amplification by sampling:
the epsilon reported is that of a client that took part in every round so far.

Adaptive clipping (central only): the server also counts the clients whose delta was within
C, adds N(0, sigma_b^2) to the count, and moves C towards the ``target_quantile`` of the
update norms: C <- C exp(-eta_C (b - gamma)), b the noisy share unclipped. As in the paper the
configured ``noise_multiplier`` z is the whole release's: the deltas get
z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 (needs z < 2 sigma_b).

Privacy accounting: Opacus's RDP accountant, for the subsampled Gaussian mechanism with
sampling rate q = m / federation size, noise z, one step per round, at ``delta``. The
runtime samples a fixed number of clients without replacement while the accountant assumes
Poisson sampling at rate q: the approximation McMahan et al. and TensorFlow Federated make
too. The epsilon spent is written to metrics.jsonl every round; with ``epsilon_budget`` the
run stops before a round that would exceed it (``on_budget: stop``) or logs a warning once
it is exceeded (``on_budget: warn``).

Reproducible noise (so that ``brokerfl replay --check`` matches): the server's noise for
model version v is drawn from numpy's PCG64 seeded with [run seed, v, 0], tensor by tensor
in name order, after every update of the round is folded; it does not depend on the order
updates arrived in, and the clipped sum is folded in the order the version records, which
replay follows. A local client's noise is seeded with [run seed, crc32(client id), round, 1].
The noise is reproducible by anyone who knows the run's seed: for privacy against the
readers of a real deployment's journal, keep the seed secret (the journal holds the clipped,
noised result's inputs anyway, so it must be protected like the updates themselves).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from brokerfl.handlers.strategies.aggregate import RunningSum, Tensors, fold_sum, fold_update, new_running_sum
from brokerfl.handlers.strategies.base import TORCH_EXTRA, Strategy, StrategyOptions
from brokerfl.handlers.strategies.clipping import apply_mean_clipped, clip_factor, delta_norm

MODES = ("central", "local")
SERVER_NOISE, CLIENT_NOISE = 0, 1  # the last seed word: server and client noise never share a stream


def epsilon_spent(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` subsampled Gaussian steps (Opacus's RDP accountant)."""
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")  # no noise: no privacy (written as Infinity in metrics.jsonl)
    try:
        from opacus.accountants import RDPAccountant  # heavy import (torch and more): only for DP runs
    except ImportError as exc:
        raise ImportError(f"dp_fedavg's privacy accounting needs opacus ({exc}): {TORCH_EXTRA}") from exc

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def gaussian_noise(like: Tensors, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """N(0, std^2) per coordinate of every floating tensor, drawn in name order (float64)."""
    return {
        name: rng.normal(0.0, std, size=like[name].shape)
        for name in sorted(like)
        if np.issubdtype(like[name].dtype, np.floating)
    }


def clip_and_noise(
    parameters: Tensors, base: Tensors, clip_norm: float, std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """base + clip(parameters - base, clip_norm) + N(0, std^2): what a local-DP client sends."""
    scale = clip_factor(delta_norm(parameters, base), clip_norm)
    noise = gaussian_noise(base, std, rng)
    out = {}
    for name, b in base.items():
        if name not in noise:
            out[name] = np.asarray(parameters[name])
            continue
        value = (np.asarray(parameters[name], np.float64) - b) * scale + noise[name] + b
        out[name] = value.astype(b.dtype, copy=False)
    return out


def adaptive_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The deltas' share of the noise when the clipped count takes its own (Andrew et al. 2021)."""
    rest = noise_multiplier**-2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(
            f"noise_multiplier {noise_multiplier} leaves nothing for the updates next to clipped_count_stddev "
            f"{count_stddev}: it must be < 2 x clipped_count_stddev"
        )
    return rest**-0.5


def next_clip_norm(clip_norm: float, unclipped_share: float, target_quantile: float, learning_rate: float) -> float:
    """Geometric update of the clipping norm towards the target quantile of update norms."""
    return float(clip_norm * np.exp(-learning_rate * (unclipped_share - target_quantile)))


class DPOptions(StrategyOptions):
    mode: Literal["central", "local"] = Field(
        "central", description="who clips and noises: the server (central) or each client (local)"
    )
    noise_multiplier: float = Field(
        1.0, ge=0, description="z: the noise's standard deviation in units of the clipping norm"
    )
    clip_norm: float = Field(1.0, gt=0, description="C: the fixed clipping norm, or the first one when adaptive")
    adaptive_clipping: bool = Field(
        False, description="move C towards target_quantile of the update norms (central only)"
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive clipping: the share of updates C should leave unclipped"
    )
    clip_learning_rate: float = Field(0.2, gt=0, description="adaptive clipping: eta_C, the geometric step of C")
    clipped_count_stddev: float | None = Field(
        None, gt=0, description="adaptive clipping: sigma_b, the noise on the unclipped count (default m / 20)"
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta of the (epsilon, delta) reported")
    epsilon_budget: float | None = Field(None, gt=0, description="the epsilon the run may spend (none: no budget)")
    on_budget: Literal["stop", "warn"] = Field(
        "stop", description="at the budget: stop before a round that would exceed it, or warn once exceeded"
    )

    @model_validator(mode="after")
    def _adaptive_is_central(self) -> DPOptions:
        if self.adaptive_clipping and self.mode == "local":
            raise ValueError("adaptive_clipping needs mode central (local clients clip with a fixed norm)")
        return self


class DPFedAvg(Strategy):
    """DP-FedAvg: options in :class:`DPOptions`. Memory O(model): clipped deltas are folded
    as they arrive. Its privacy accountant is opacus's (the torch extra)."""

    name = "dp_fedavg"
    secure_sum = True  # each client clips its own delta; the server noises the sum
    Options = DPOptions
    options: DPOptions
    requires = ("opacus",)

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.clip_norm: float = self.options.clip_norm  # adaptive clipping moves it
        self.initial_clip_norm = self.clip_norm
        self.steps = 0
        self.version = 0  # the model version the state belongs to; noise for the next is seeded by version + 1
        self._sum: RunningSum | None = None
        self._global: Tensors = {}
        self._unclipped = 0
        self._warned = False

    def check_run(self) -> None:
        if self.adaptive_clipping and self.mode == "central" and self.noise_multiplier > 0:
            try:
                adaptive_noise_multiplier(self.noise_multiplier, self.count_stddev())
            except ValueError as exc:
                default = " (its default: the clients per round / 20)" if self.clipped_count_stddev is None else ""
                raise ValueError(
                    f"strategy {self.name!r}: {exc}{default}: raise clipped_count_stddev or lower noise_multiplier"
                ) from None

    # who is sampled, and how much privacy that spends

    def expected_clients(self) -> int:
        """m: the clients sampled per round (the fixed denominator)."""
        if self.clients_per_round:
            return self.clients_per_round
        if self.federation_size is None:
            raise ValueError("strategy 'dp_fedavg' needs the federation size: build it with strategy_for_run")
        return max(1, round(self.fraction * self.federation_size))

    def sample_rate(self) -> float:
        if self.mode == "local":
            return 1.0  # the server sees who sent: no amplification by sampling
        return min(1.0, self.expected_clients() / self.federation_size) if self.federation_size else 1.0

    def count_stddev(self) -> float:
        return self.clipped_count_stddev if self.clipped_count_stddev is not None else self.expected_clients() / 20.0

    def epsilon(self, steps: int | None = None) -> float:
        return epsilon_spent(
            self.sample_rate(), self.noise_multiplier, self.steps if steps is None else steps, self.delta
        )

    # a round

    def start_round(self, global_parameters: Tensors) -> None:
        self._sum = new_running_sum(global_parameters, reuse=self._sum)
        self._global = global_parameters
        self._unclipped = 0

    def fold(self, parameters: Tensors, num_samples: int) -> None:
        if self.mode == "local":  # clipped and noised by the client already
            fold_update(self._sum, parameters, 1.0, base=self._global)
            return
        norm = delta_norm(parameters, self._global)
        self._unclipped += norm <= self.clip_norm
        fold_update(self._sum, parameters, clip_factor(norm, self.clip_norm), base=self._global)

    def folded(self) -> int:
        return self._sum.count if self._sum else 0

    def finish_round(self, global_parameters: Tensors) -> dict[str, np.ndarray]:
        if not self.folded():
            raise ValueError("no update was folded")
        self.version += 1
        self.steps += 1
        if self.mode == "local":
            return apply_mean_clipped(self._sum, global_parameters, self._sum.count)
        rng = np.random.default_rng([self.run_seed, self.version, SERVER_NOISE])
        z = (
            adaptive_noise_multiplier(self.noise_multiplier, self.count_stddev())
            if self.adaptive_clipping and self.noise_multiplier > 0
            else self.noise_multiplier
        )
        for name, noise in gaussian_noise(global_parameters, z * self.clip_norm, rng).items():
            self._sum.sums[name] += noise
        m = self.expected_clients()
        parameters = apply_mean_clipped(self._sum, global_parameters, m)
        if self.adaptive_clipping:
            unclipped_share = (self._unclipped + rng.normal(0.0, self.count_stddev())) / m
            self.clip_norm = next_clip_norm(
                self.clip_norm, unclipped_share, self.target_quantile, self.clip_learning_rate
            )
        return parameters

    def replay_version(
        self, parent_version: int, parent: Tensors, updates: Sequence[Any], history: Mapping[int, Tensors]
    ) -> dict[str, np.ndarray]:
        self.version = parent_version
        return super().replay_version(parent_version, parent, updates, history)

    # state, metrics, budget

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {"clip_norm": np.array(self.clip_norm, np.float64), "steps": np.array(self.steps, np.int64)}

    def resume(self, version: int, state: Mapping[str, np.ndarray]) -> None:
        self.version = version
        self.steps = int(state["steps"]) if "steps" in state else 0
        self.clip_norm = float(state["clip_norm"]) if "clip_norm" in state else self.initial_clip_norm

    def round_metrics(self) -> dict[str, Any]:
        epsilon = self.epsilon()
        record: dict[str, Any] = {
            "epsilon": epsilon,
            "delta": self.delta,
            "dp_steps": self.steps,
            "clip_norm": self.clip_norm,
        }
        if self.epsilon_budget is not None and epsilon > self.epsilon_budget:
            record["epsilon_budget_exceeded"] = True
            if self.on_budget == "warn" and not self._warned:
                from brokerfl.runtime.log import get_logger

                get_logger().warning(
                    "privacy budget exceeded: the run goes on (on_budget: warn)",
                    epsilon=round(epsilon, 4),
                    budget=self.epsilon_budget,
                    delta=self.delta,
                )
                self._warned = True
        return record

    def stop_reason(self) -> str | None:
        if self.epsilon_budget is None or self.on_budget != "stop":
            return None
        after_next = self.epsilon(self.steps + 1)
        if after_next > self.epsilon_budget:
            return (
                f"privacy budget: another round would spend epsilon {after_next:.4g} > epsilon_budget "
                f"{self.epsilon_budget:g} (delta {self.delta:g}); spent so far {self.epsilon():.4g}"
            )
        return None

    # secure aggregation: the clients clip, the server noises the unmasked sum

    def secure_check(self) -> str | None:
        if self.adaptive_clipping:
            return (
                "adaptive_clipping moves C from the count of unclipped updates, which the server cannot see under "
                "secure aggregation; use a fixed clip_norm"
            )
        return None

    @classmethod
    def secure_contribution(
        cls,
        options: Mapping[str, Any],
        *,
        global_parameters: Tensors,
        parameters: Tensors,
        num_samples: int,
    ) -> tuple[dict[str, np.ndarray], int]:
        """Uniform weights, as without secure aggregation. Central: the client clips its own
        delta to C (the server cannot); local: it did already, and added its noise."""
        settings = cls(**options)
        delta, _ = super().secure_contribution(
            options, global_parameters=global_parameters, parameters=parameters, num_samples=num_samples
        )
        if settings.mode == "central":
            scale = clip_factor(delta_norm(parameters, global_parameters), settings.clip_norm)
            delta = {name: d * scale for name, d in delta.items()}
        return delta, 1

    def fold_sum(self, delta_sum: Mapping[str, np.ndarray], total_weight: float, count: int) -> None:
        fold_sum(self._sum, delta_sum, float(count), count)  # the sums hold clipped deltas, as fold's

    # the client's side of local DP

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
        settings = cls(**options)
        if settings.mode != "local":
            return parameters
        rng = np.random.default_rng([seed, zlib.crc32(client_id.encode()), round_, CLIENT_NOISE])
        return clip_and_noise(
            parameters, global_parameters, settings.clip_norm, settings.noise_multiplier * settings.clip_norm, rng
        )
