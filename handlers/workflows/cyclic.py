"""Cyclic weight transfer (``workflow: cyclic``): the model travels from client to client.

A round visits every client of the federation once, in an order that is fixed or
reshuffled each round (``cyclic.order``, drawn from the run's seed and the round, so a
restarted coordinator draws the same one). Each hop sends a TrainTask to the one holder;
its ParameterUpdate *is* the next model version (strategy ``cyclic``), stored before the
update is acked, and the next client gets it. A holder that dies while training: its task
waits in its durable queue and is answered when it returns, unless ``cyclic.hop_timeout_s``
passes first; then the task (it carries that deadline, so the returning client skips it)
passes to the next client with the same model, and a late answer is dropped with a
recorded reason. A holder whose training fails (TrainFailed) passes it on at once. The model is never lost: it is the
newest stored version.

This reuses the server's lifecycle (``handlers/workflows/lifecycle.py``: joins, heartbeats,
resume) and its operations (``handlers/workflows/server_state.py``: storing, journal,
finish) and replaces only what a round is. The coordinator holds no state the
stored versions cannot rebuild: the hop position is the number of versions of the round.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from brokerfl.config import RunConfig
from brokerfl.handlers.strategies.aggregate import BadUpdate
from brokerfl.handlers.workflows import lifecycle, server_state
from brokerfl.handlers.workflows.server_state import (
    ServerState,
    already_folded,
    drop,
    live_clients,
    refresh_client,
    rounds_done,
    store_version,
)
from brokerfl.runtime.handler_table import Context, HandlerSet, to_client
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.model_refs import task_model_fields
from brokerfl.storage.store import ModelStore
from brokerfl.wire.message import Message, ParameterUpdate, TrainFailed, TrainTask


@dataclass(kw_only=True)
class HopDeadline(Message):
    """Local timer message: the holder of model ``model_version`` has not answered in time."""

    LOCAL = True
    holder: str


@dataclass
class CyclicState(ServerState):
    order: list[str] = field(default_factory=list)  # this round's route
    position: int = 0  # index in ``order`` of the current holder
    holder: str | None = None
    hop_started: float = 0.0


def make_state(config: RunConfig, store: ModelStore, metrics: MetricsLog) -> CyclicState:
    base = server_state.make_state(config, store, metrics)
    state = CyclicState(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    state.begin = begin
    return state


CYCLIC = HandlerSet("cyclic hops", needs=(CyclicState,))


def route(config: RunConfig, round_: int) -> list[str]:
    """The order a round visits the federation in."""
    order = config.client_ids()
    if config.cyclic.order == "shuffle":
        order = [order[i] for i in np.random.default_rng([config.seed, round_, 7]).permutation(len(order))]
    return order


def begin(ctx: Context):
    """Continue where the stored versions say: round ``model.round``, hop = its versions so far."""
    state: CyclicState = ctx.state
    round_ = state.model.round
    hops = sum(1 for v in state.store.versions() if v > 0 and state.store.metadata(v)["round"] == round_)
    if round_ == 0 or hops >= len(route(state.config, round_)):
        round_, hops = round_ + 1, 0
    if round_ > state.config.rounds:
        return rounds_done(ctx, f"{state.config.rounds} rounds done")
    state.round, state.order, state.position = round_, route(state.config, round_), hops
    state.round_open = True
    return start_hop(ctx)


def start_hop(ctx: Context):
    """Hand the newest model to the next live client of the route."""
    state: CyclicState = ctx.state
    config = state.config
    live = set(live_clients(state))
    while state.position < len(state.order) and state.order[state.position] not in live:
        ctx.log.warning("cyclic: holder not live; passed over", client=state.order[state.position], round=state.round)
        state.position += 1
    if state.position >= len(state.order):
        return next_round(ctx)
    state.holder = state.order[state.position]
    state.hop_started = time.monotonic()
    timeout = config.cyclic.hop_timeout_s
    ctx.set_timer(
        "hop", timeout, HopDeadline(round=state.round, model_version=state.model.version, holder=state.holder)
    )
    ctx.log.debug("cyclic: model handed on", client=state.holder, round=state.round, model_version=state.model.version)
    task = TrainTask(
        round=state.round,
        model_version=state.model.version,
        **task_model_fields(state.config, state.store, state.model),
        participants=[state.holder],
        **server_state.round_fields(state, state.round),
        deadline=ctx.wall() + timeout,
    )
    return [to_client(state.holder, task)]


def next_round(ctx: Context):
    state: CyclicState = ctx.state
    if state.round >= state.config.rounds:
        state.round_open, state.holder = False, None
        ctx.cancel_timer("hop")
        return rounds_done(ctx, f"{state.config.rounds} rounds done")
    state.round += 1
    state.order, state.position = route(state.config, state.round), 0
    if not live_clients(state):  # nobody to hand the model to: wait, then look again
        ctx.log.warning("cyclic: no live clients; waiting", round=state.round)
        state.holder = None
        ctx.set_timer(
            "hop",
            state.config.cyclic.hop_timeout_s,
            HopDeadline(round=state.round, model_version=state.model.version, holder=""),
        )
        state.round -= 1  # the round begins when someone is there
        state.position = len(state.order)
        return None
    return start_hop(ctx)


@CYCLIC.on(ParameterUpdate)
def take_handover(update: ParameterUpdate, ctx: Context):
    state: CyclicState = ctx.state
    refresh_client(state, update.client_id)
    if already_folded(state, update.message_id):
        return drop(ctx, update, "duplicate: already in a stored model version")
    if state.done:
        return drop(ctx, update, "late: the run is finished")
    if update.model_version != state.model.version or update.client_id != state.holder or update.round != state.round:
        return drop(
            ctx,
            update,
            f"stale: client {update.client_id} answered model version {update.model_version}; "
            f"version {state.model.version} is now with client {state.holder}",
        )
    try:
        server_state.check_parameters(update.parameters, state)
        server_state.check_claimed_samples(update, state)
    except BadUpdate as exc:
        raise BadUpdate(f"update from client {update.client_id}: {exc}") from None  # dead-lettered with this reason
    state.strategy.start_round(state.model.parameters)
    state.strategy.fold(update.parameters, update.num_samples)
    ctx.hold()  # acked by store_version's commit, once the version is stored
    ctx.cancel_timer("hop")
    store_version(
        ctx,
        state.strategy.finish_round(state.model.parameters),
        [update.message_id],
        round_=state.round,
        started=state.hop_started,
        client_seconds=[update.metrics.get("train_s", 0.0)],
        client_metrics=[(server_state.app_train_metrics(update), update.num_samples)],
        update_bytes=server_state.parameters_bytes(update.parameters),
    )
    state.position += 1
    return start_hop(ctx)


@CYCLIC.on(HopDeadline)
def pass_on(message: HopDeadline, ctx: Context):
    state: CyclicState = ctx.state
    if state.done or message.model_version != state.model.version or message.holder != (state.holder or ""):
        return None
    if state.holder:
        ctx.log.warning(
            "cyclic: holder did not answer in time; passing the model on",
            client=state.holder,
            round=state.round,
            model_version=state.model.version,
            timeout_s=state.config.cyclic.hop_timeout_s,
        )
        state.position += 1
    return start_hop(ctx)


@CYCLIC.on(TrainFailed)
def pass_on_failure(message: TrainFailed, ctx: Context):
    """The holder's training failed: the model goes on to the next client now, as at the
    hop's deadline (the failure is logged and kept)."""
    state: CyclicState = ctx.state
    server_state.note_failure(message, ctx)
    if (
        state.done
        or message.client_id != state.holder
        or message.model_version != state.model.version
        or message.round != state.round
    ):
        return None
    ctx.cancel_timer("hop")
    state.position += 1
    return start_hop(ctx)


# what a run of this workflow composes (brokerfl.assembly.roles adds the operator's set and the rest)
HANDLERS = (lifecycle.LIFECYCLE, CYCLIC)
