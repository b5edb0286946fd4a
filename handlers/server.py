"""The server's handler set for synchronous rounds (FedAvg and friends).

A round: sample live clients, broadcast one TrainTask, fold each ParameterUpdate into the
strategy's running sum as it arrives (held unacked), and close the round when every sampled
client answered or the round deadline passed with at least ``min_clients`` answers. Closing
stores the new model version first and only then acks the round's updates, so a crash
anywhere before that replays the round from the broker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brokerfl.config import RunConfig
from brokerfl.handler_table import Context, HandlerTable, Started, to_clients
from brokerfl.message import Exit, Heartbeat, Join, Leave, Message, ParameterUpdate, TrainTask
from brokerfl.metrics import MetricsLog
from brokerfl.store import ModelStore, ModelVersion
from brokerfl.timing import timings
from handlers.aggregate import BadUpdate, check_update
from handlers.datasets import load_dataset
from handlers.strategy import Strategy, load_strategy
from handlers.trainer import evaluate, init_parameters

table = HandlerTable("server")


@dataclass(kw_only=True)
class RoundDeadline(Message):
    """Local timer message: round ``round`` is due to close."""


@dataclass(kw_only=True)
class JoinDeadline(Message):
    """Local timer message: stop waiting for every client to join."""


@dataclass
class ClientRecord:
    num_samples: int
    last_seen: float


@dataclass
class ServerState:
    config: RunConfig
    strategy: Strategy
    store: ModelStore
    evaluate: Any  # (parameters) -> {"loss", "accuracy"}
    metrics: MetricsLog
    on_round: list[Any] = field(default_factory=list)  # callbacks(record), e.g. a progress bar
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    model: ModelVersion | None = None
    round: int = 0
    round_open: bool = False
    round_started: float = 0.0
    participants: list[str] = field(default_factory=list)
    folded_ids: list[str] = field(default_factory=list)
    answered: set[str] = field(default_factory=set)
    client_seconds: list[float] = field(default_factory=list)  # training time each folded update reported
    timings_at_start: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (update id, reason)
    recent_update_ids: list[set[str]] = field(default_factory=list)  # of the last few stored versions
    done: bool = False
    failure: str | None = None


def make_state(config: RunConfig, store: ModelStore, metrics: MetricsLog) -> ServerState:
    data = load_dataset(config.data.dataset, test_fraction=config.data.test_fraction, seed=config.seed)
    strategy = load_strategy(
        config.strategy.name,
        fraction=config.strategy.fraction,
        clients_per_round=config.strategy.clients_per_round,
        **config.strategy.options,
    )

    def evaluate_on_test(parameters):
        return evaluate(parameters, data.x_test, data.y_test, hidden=config.model.hidden, num_classes=data.num_classes)

    state = ServerState(config, strategy, store, evaluate_on_test, metrics)
    state.num_features, state.num_classes = data.num_features, data.num_classes  # type: ignore[attr-defined]
    return state


# ---------------------------------------------------------------- lifecycle


@table.on(Started)
def resume_or_initialise(message: Started, ctx: Context):
    """Pick up the newest stored model version, or store version 0."""
    state: ServerState = ctx.state
    state.model = state.store.latest()
    if state.model is None:
        config = state.config
        parameters = init_parameters(state.num_features, config.model.hidden, state.num_classes, seed=config.seed)
        state.model = ModelVersion(0, 0, None, state.strategy.name, [], parameters, created=time.time())
        state.store.put(state.model)
    state.round = state.model.round
    # so that updates redelivered after a restart are recognised as already folded
    state.recent_update_ids = [set(state.store.get(v).update_ids) for v in state.store.versions()[-5:]]
    ctx.log.info("server ready", model_version=state.model.version, round=state.round, waiting_for=state.config.clients)
    if state.round >= state.config.rounds:
        return finish_run(ctx, "all rounds were already done")
    ctx.set_timer("join", state.config.strategy.join_timeout_s, JoinDeadline())
    return None


@table.on(Join)
def register_client(message: Join, ctx: Context):
    state: ServerState = ctx.state
    first_time = message.client_id not in state.clients
    state.clients[message.client_id] = ClientRecord(message.num_samples, time.time())
    if first_time:
        ctx.log.debug("client joined", client=message.client_id, clients=len(state.clients))
    if not state.round_open and not state.done and len(state.clients) >= state.config.clients:
        ctx.cancel_timer("join")
        return start_round(ctx)
    return None


@table.on(JoinDeadline)
def start_without_everyone(message: JoinDeadline, ctx: Context):
    state: ServerState = ctx.state
    if state.round_open or state.done:
        return None
    if len(state.clients) >= state.config.strategy.min_clients:
        ctx.log.warning("starting without every client", joined=len(state.clients), expected=state.config.clients)
        return start_round(ctx)
    ctx.log.warning("no round can start: too few clients joined", joined=len(state.clients), needed=state.config.strategy.min_clients)
    ctx.set_timer("join", state.config.strategy.join_timeout_s, JoinDeadline())
    return None


@table.on(Heartbeat)
def mark_alive(message: Heartbeat, ctx: Context):
    record = ctx.state.clients.get(message.client_id)
    if record is not None:
        record.last_seen = time.time()


@table.on(Leave)
def forget_client(message: Leave, ctx: Context):
    ctx.state.clients.pop(message.client_id, None)
    ctx.log.info("client left", client=message.client_id, reason=message.reason)


# ---------------------------------------------------------------- rounds


def start_round(ctx: Context, *, retry: bool = False):
    state: ServerState = ctx.state
    config = state.config
    if not retry:
        state.round += 1
        state.retries = 0
    rng = np.random.default_rng([config.seed, state.round, state.retries])
    state.participants = state.strategy.sample(state.round, list(state.clients), rng)
    state.strategy.start_round(state.model.parameters)
    state.folded_ids, state.answered, state.client_seconds = [], set(), []
    state.round_open, state.round_started = True, time.monotonic()
    state.timings_at_start = timings.snapshot()
    ctx.set_timer("round", config.strategy.round_deadline_s, RoundDeadline(round=state.round))
    ctx.log.debug("round started", round=state.round, model_version=state.model.version, participants=len(state.participants))
    task = TrainTask(
        round=state.round,
        model_version=state.model.version,
        parameters=state.model.parameters,
        participants=state.participants,
        config=config.train.model_dump(),
    )
    return [to_clients(task)]


@table.on(ParameterUpdate)
def fold_update(update: ParameterUpdate, ctx: Context):
    state: ServerState = ctx.state
    if state.round_open and update.message_id in state.folded_ids:
        # A redelivered copy (the connection was lost after the fold): it replaces the
        # delivery that died with the old connection and is acked with the round's commit.
        ctx.hold()
        return None
    reason = _why_not_fold(update, state)
    if reason is not None:
        # acked and dropped: the reason is recorded so every update stays accounted for
        state.dropped.append((update.message_id, reason))
        ctx.log.info("update dropped", client=update.client_id, reason=reason)
        return None
    try:
        check_update(update.parameters, state.model.parameters)
        if update.num_samples < 1:
            raise BadUpdate(f"num_samples must be positive, got {update.num_samples}")
    except BadUpdate as exc:
        raise BadUpdate(f"update from client {update.client_id}: {exc}") from None  # dead-lettered with this reason
    with timings.phase("fold"):
        state.strategy.fold(update.parameters, update.num_samples)
    state.client_seconds.append(update.metrics.get("train_s", 0.0))
    state.folded_ids.append(update.message_id)
    state.answered.add(update.client_id)
    ctx.hold()
    ctx.log.debug("update folded", client=update.client_id, folded=len(state.folded_ids), of=len(state.participants))
    if state.answered >= set(state.participants):
        return close_round(ctx)
    return None


def _why_not_fold(update: ParameterUpdate, state: ServerState) -> str | None:
    if any(update.message_id in ids for ids in state.recent_update_ids):
        return "duplicate: already folded into a stored model version"
    if not state.round_open or update.round != state.round:
        return f"late: trained for round {update.round}, the server is at round {state.round}" + ("" if state.round_open else " (closed)")
    if update.model_version != state.model.version:
        return f"stale: trained on model version {update.model_version}, current is {state.model.version}"
    if update.client_id not in state.participants:
        return f"client {update.client_id} was not sampled for round {state.round}"
    if update.client_id in state.answered:
        return f"client {update.client_id} already answered round {state.round}"
    return None


@table.on(RoundDeadline)
def round_deadline(message: RoundDeadline, ctx: Context):
    state: ServerState = ctx.state
    if not state.round_open or message.round != state.round:
        return None
    folded = state.strategy.folded()
    missing = sorted(set(state.participants) - state.answered)
    if folded >= state.config.strategy.min_clients:
        ctx.log.warning("round deadline: closing without every answer", folded=folded, missing=missing)
        return close_round(ctx)
    ctx.log.warning("round deadline: too few answers", folded=folded, needed=state.config.strategy.min_clients, missing=missing)
    for update_id in state.folded_ids:
        state.dropped.append((update_id, f"round {state.round} had too few answers and was abandoned"))
    ctx.commit()  # those updates are recorded as dropped; nothing will be built from them
    state.round_open = False
    if state.config.strategy.on_too_few == "retry" and state.retries < state.config.strategy.max_retries:
        state.retries += 1
        return start_round(ctx, retry=True)
    return finish_run(ctx, f"round {state.round} got {folded} of the {state.config.strategy.min_clients} updates it needs", failed=True)


def close_round(ctx: Context):
    """Store the new model version, then ack the round's updates; then the next round."""
    state: ServerState = ctx.state
    parent = state.model
    with timings.phase("fold"):
        parameters = state.strategy.finish_round(parent.parameters)
    model = ModelVersion(parent.version + 1, state.round, parent.version, state.strategy.name, list(state.folded_ids), parameters, created=time.time())
    with timings.phase("evaluate"):
        scores = state.evaluate(parameters)
    model.metrics = {"accuracy": scores["accuracy"], "loss": scores["loss"]}
    with timings.phase("store"):
        state.store.put(model)
    state.model = model
    state.recent_update_ids = [*state.recent_update_ids[-4:], set(model.update_ids)]
    state.round_open = False
    ctx.cancel_timer("round")
    ctx.commit()
    record = {
        "round": state.round,
        "model_version": model.version,
        "accuracy": scores["accuracy"],
        "loss": scores["loss"],
        "num_updates": len(model.update_ids),
        "duration_s": round(time.monotonic() - state.round_started, 4),
        "sha256": model.sha256,
        # where the round's time went, in the server process; clients' training time beside it
        "server_s": {k: v for k, v in timings.since(state.timings_at_start).items() if v > 0 and not k.startswith("handle.")},
        "client_train_s": round(float(np.mean(state.client_seconds)), 4) if state.client_seconds else 0.0,
    }
    state.metrics.append(record)
    for callback in state.on_round:
        callback(record)
    ctx.log.info("round closed", round=state.round, model_version=model.version, accuracy=round(scores["accuracy"], 4), loss=round(scores["loss"], 4), updates=len(model.update_ids))
    if state.round >= state.config.rounds:
        return finish_run(ctx, f"{state.config.rounds} rounds done")
    return start_round(ctx)


def finish_run(ctx: Context, reason: str, *, failed: bool = False):
    state: ServerState = ctx.state
    state.done = True
    state.failure = reason if failed else None
    ctx.cancel_timer("join")
    ctx.cancel_timer("round")
    (ctx.log.error if failed else ctx.log.info)("run finished", reason=reason)
    ctx.stop()
    return [to_clients(Exit(reason=reason, round=state.round, model_version=state.model.version))]
