"""The asynchronous server's handler set (FedAsync, FedBuff): no rounds, every client always
has a task on the newest model, so fast clients never wait for slow ones.

It reuses the server's lifecycle (``handlers/workflows/lifecycle.py``: liveness, resume) and
its operations (``handlers/workflows/server_state.py``: drop records, storing versions,
finishing), and replaces the synchronous rounds. What differs:

- Beginning (``state.begin``) sends each live client its own TrainTask on the current model
  (``participants=[client_id]``, ``round`` = ``model_version`` = current version, no deadline).
- A ParameterUpdate is folded at once with its staleness (current version minus the version
  it trained on) and the client immediately gets a new task on the then-current model.
  When the strategy says so (every update for FedAsync, every K for FedBuff) the new model
  version is stored with the ids of the updates in it, and only then are they acked.
  ``config.rounds`` is the number of model versions to make.
- Not folded, dropped with a recorded reason (and the client gets a new task): staleness
  over ``max_staleness``; a version newer than the server's; a base version whose
  parameters are gone; a malformed update (the synchronous server dead-letters those, but
  here a dead-lettered update would leave its client without a task for the rest of the run).
  Dropped without a new task (the original already caused one): a copy of an update that is
  already in a stored version, and anything after the run finished.
- A client whose training failed (TrainFailed) gets no new task from this process.
- A redelivered copy of an update still in the buffer (FedBuff; folded, not yet stored) is
  held again without being folded again: it replaces a delivery lost with an old connection.
- A client first seen after the beginning (Join or Heartbeat), or back after a Leave, gets
  a task then.
- A restarted server resumes from the newest stored version, refills its cache of recent
  versions and the ids in them from the store, and at its beginning sends a task to every
  live client that has not already been sent one by this process (clients whose task was
  lost get one; duplicates are harmless: a client skips tasks it answered, and extra updates
  are folded or dropped with their reasons). Updates of the old process still in the queue
  are folded as they arrive, even before the beginning; updates it held unacked in its
  buffer come back redelivered and are folded again (none was in a stored version).

FedBuff folds ``w_client - w_v``, so it needs the parameters of every version a client may
still be training on: a cache of the last ``max_staleness + 1`` versions' parameters
(``MemoryModelStore`` keeps only the newest two), falling back to the store.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from brokerfl.config import ConfigError, RunConfig
from brokerfl.handlers.strategies.aggregate import BadUpdate
from brokerfl.handlers.strategies.fedasync import AsyncStrategy
from brokerfl.handlers.workflows import lifecycle, server_state
from brokerfl.handlers.workflows.server_state import (
    ServerState,
    already_folded,
    drop,
    finish_run,
    live_clients,
    store_version,
)
from brokerfl.runtime.handler_table import Context, HandlerSet, Outbound, Started, to_client
from brokerfl.runtime.timing import timings
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.model_refs import task_model_fields
from brokerfl.storage.store import ModelStore
from brokerfl.transports.topology import check_name
from brokerfl.wire.message import Heartbeat, Heartbeats, Join, Leave, ParameterUpdate, Tensors, TrainFailed, TrainTask


@dataclass
class AsyncServerState(ServerState):
    cache: OrderedDict[int, Tensors] = field(
        default_factory=OrderedDict
    )  # version -> parameters, the newest max_staleness + 1
    stored_ids: set[str] = field(
        default_factory=set
    )  # ids in stored versions: of this process, and the newest few at start
    buffer_ids: list[str] = field(default_factory=list)  # folded and held, in no stored version yet (fold order)
    tasked: dict[str, int] = field(default_factory=dict)  # client -> version of the last task this process sent it
    stored_here: int = 0  # versions this process stored
    staleness: list[int] = field(default_factory=list)  # of the updates in the buffer (for the log)

    def held_updates(self) -> int:
        return len(self.buffer_ids)


def make_state(config: RunConfig, store: ModelStore, metrics: MetricsLog) -> AsyncServerState:
    base = server_state.make_state(config, store, metrics)
    if not isinstance(base.strategy, AsyncStrategy):
        raise ConfigError(
            f"strategy.name: {config.strategy.name!r} is not an asynchronous strategy; it runs on "
            f"{base.strategy.server_handlers}"
        )
    buffer_size = getattr(base.strategy, "buffer_size", 1)
    prefetch = max(2 * config.clients, 16)  # brokerfl.assembly.roles.server_worker's: the held buffer must fit under it
    if buffer_size > prefetch:
        raise ConfigError(
            f"strategy.options.buffer_size: {buffer_size} updates held unacked exceed the server's prefetch "
            f"({prefetch} for {config.clients} clients)"
        )
    state = AsyncServerState(**{f.name: getattr(base, f.name) for f in dataclasses.fields(ServerState)})
    state.begin = begin
    return state


# the lifecycle's handlers these replace, each calling the lifecycle's first
ASYNC_UPDATES = HandlerSet("asynchronous updates", needs=(AsyncServerState,))


# ---------------------------------------------------------------- lifecycle


@ASYNC_UPDATES.overriding(Started)
def resume(message: Started, ctx: Context):
    """The synchronous server's resume, then this handler set's memory of recent versions."""
    out = lifecycle.resume_or_initialise(message, ctx)
    state: AsyncServerState = ctx.state
    strategy: AsyncStrategy = state.strategy
    state.round_started = time.monotonic()
    for version in state.store.versions()[-(strategy.max_staleness + 2) :]:
        state.stored_ids.update(state.store.metadata(version)["update_ids"])  # metadata: no parameters re-read
        if strategy.needs_base:
            model = state.store.get(version)
            if model.parameters:
                state.cache[version] = model.parameters
    strategy.start_version(state.model.parameters)
    return out


def begin(ctx: Context) -> list[Outbound]:
    """Every live client gets its own task (unless this process already sent it one)."""
    state: AsyncServerState = ctx.state
    if state.stored_here == 0:
        state.round_started = time.monotonic()  # the first version's time counts from here
    out = [task for cid in live_clients(state) if cid not in state.tasked for task in next_task(ctx, cid)]
    ctx.log.info("asynchronous training begins", model_version=state.model.version, clients=len(out))
    return out


def next_task(ctx: Context, client_id: str) -> list[Outbound]:
    """A TrainTask on the current model for one client (none once the run is done)."""
    state: AsyncServerState = ctx.state
    if state.done:
        return []
    try:
        check_name("client id", client_id)
    except ValueError as exc:
        ctx.log.warning("no task for an invalid client id", reason=str(exc))
        return []
    version = state.model.version
    state.tasked[client_id] = version
    task = TrainTask(
        round=version,
        model_version=version,
        **task_model_fields(state.config, state.store, state.model),
        participants=[client_id],
        **server_state.round_fields(state, version + 1),  # the schedule's round: the version this task makes
        deadline=0.0,
    )
    return [to_client(client_id, task)]


def _task_if_new(ctx: Context, client_id: str) -> list[Outbound]:
    state: AsyncServerState = ctx.state
    if not state.begun or state.done or client_id in state.tasked:
        return []
    ctx.log.info("client first seen after the beginning: sending it a task", client=client_id)
    return next_task(ctx, client_id)


@ASYNC_UPDATES.overriding(Join)
def register_client(message: Join, ctx: Context):
    out = list(lifecycle.register_client(message, ctx) or [])
    return out + _task_if_new(ctx, message.client_id)


@ASYNC_UPDATES.overriding(Heartbeat)
def mark_alive(message: Heartbeat, ctx: Context):
    out = list(lifecycle.mark_alive(message, ctx) or [])
    return out + _task_if_new(ctx, message.client_id)


@ASYNC_UPDATES.overriding(Heartbeats)
def mark_many_alive(message: Heartbeats, ctx: Context):
    out = list(lifecycle.mark_many_alive(message, ctx) or [])
    for client_id in message.clients:
        out += _task_if_new(ctx, client_id)
    return out


@ASYNC_UPDATES.overriding(Leave)
def forget_client(message: Leave, ctx: Context):
    out = lifecycle.forget_client(
        message, ctx
    )  # a client whose app failed at start: maybe the run's end, or its beginning
    ctx.state.tasked.pop(message.client_id, None)  # if it comes back, it gets a task
    return out


@ASYNC_UPDATES.on(TrainFailed)
def take_failure(message: TrainFailed, ctx: Context):
    """Logged and kept; no new task: its app would most likely fail again, at once, and
    round after round. It stays tasked (a heartbeat brings it none); a Leave and a return
    (a restarted client) does."""
    server_state.note_failure(message, ctx)


# ---------------------------------------------------------------- updates


def base_parameters(state: AsyncServerState, version: int) -> Tensors | None:
    """The parameters of model version ``version``: from the cache, else the store."""
    parameters = state.cache.get(version)
    if parameters is None:
        try:
            parameters = state.store.get(version).parameters
        except KeyError:
            return None
    return parameters or None


@ASYNC_UPDATES.on(ParameterUpdate)
def fold_async_update(update: ParameterUpdate, ctx: Context):
    state: AsyncServerState = ctx.state
    strategy: AsyncStrategy = state.strategy
    server_state.refresh_client(state, update.client_id)
    if (outsider := server_state.outside_federation(state, update.client_id)) is not None:
        return drop(ctx, update, outsider)  # and no task: it is not ours to train
    if update.message_id in state.buffer_ids:
        # A redelivered copy of a folded update (the connection was lost after the fold):
        # it replaces the lost delivery and is acked when its model version is stored.
        ctx.hold()
        return None
    if update.message_id in state.stored_ids or already_folded(state, update.message_id):
        return drop(ctx, update, "duplicate: already folded into a stored model version")
    if state.done:
        return drop(ctx, update, "late: the run is finished")
    current = state.model.version
    staleness = current - update.model_version
    reason = None
    base = None
    if staleness < 0:
        reason = f"trained on model version {update.model_version}, newer than the server's {current}"
    elif staleness > strategy.max_staleness:
        reason = (
            f"stale: trained on model version {update.model_version}, current is {current} (staleness {staleness} > "
            f"max_staleness {strategy.max_staleness})"
        )
    else:
        try:
            server_state.check_parameters(
                update.parameters, state
            )  # against the current model, which the update is mixed into
            server_state.check_claimed_samples(update, state)
        except BadUpdate as exc:
            reason = f"malformed: {exc}"
        if reason is None and strategy.needs_base:
            base = base_parameters(state, update.model_version)
            if base is None:
                reason = (
                    f"the parameters of model version {update.model_version}, which it trained on, are no longer kept"
                )
    if reason is not None:
        return drop(ctx, update, reason) + next_task(ctx, update.client_id)

    with timings.phase("fold"):
        weight = strategy.fold_async(
            update.parameters, global_parameters=state.model.parameters, base_parameters=base, staleness=staleness
        )
    ctx.hold()
    state.buffer_ids.append(update.message_id)
    state.client_seconds.append(update.metrics.get("train_s", 0.0))
    state.update_metrics.append((server_state.app_train_metrics(update), update.num_samples))
    state.update_bytes += server_state.parameters_bytes(update.parameters)
    state.staleness.append(staleness)
    ctx.log.debug(
        "update folded", client=update.client_id, staleness=staleness, weight=round(weight, 4), folded=strategy.folded()
    )
    if not strategy.ready():
        return next_task(ctx, update.client_id)

    with timings.phase("fold"):
        parameters = strategy.finish_version(state.model.parameters)
    version = current + 1
    ctx.log.debug("new model version", model_version=version, staleness=state.staleness)
    store_version(
        ctx,
        parameters,
        state.buffer_ids,
        round_=version,
        started=state.round_started,
        client_seconds=state.client_seconds,
        client_metrics=state.update_metrics,
        update_bytes=state.update_bytes,
    )
    state.round = version
    state.stored_here += 1
    state.round_started = time.monotonic()
    state.stored_ids.update(state.buffer_ids)
    state.buffer_ids, state.client_seconds, state.staleness, state.update_metrics = [], [], [], []
    state.update_bytes = 0
    if strategy.needs_base:
        state.cache[version] = state.model.parameters
        while state.cache and next(iter(state.cache)) < version - strategy.max_staleness:
            state.cache.popitem(last=False)
    strategy.start_version(state.model.parameters)
    if version >= state.config.rounds:
        return finish_run(ctx, f"{state.config.rounds} model versions done")
    return next_task(ctx, update.client_id)


# what a run of this workflow composes (brokerfl.assembly.roles adds the operator's set and the rest)
HANDLERS = (lifecycle.LIFECYCLE, ASYNC_UPDATES)
