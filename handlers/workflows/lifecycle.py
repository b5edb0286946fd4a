"""The lifecycle of every server workflow, as a handler set: resume, learn the federation
(Join, Heartbeat, Heartbeats, Leave), begin, drain after the end, and the server's own
failures; plus scoring stored versions and federated evaluation. What beginning means is
``state.begin`` (synchronous rounds, per-client tasks, a cyclic route): each workflow's
``HANDLERS`` is this set and its own."""

from __future__ import annotations

import math
import time

import numpy as np

from brokerfl.config import RunConfig
from brokerfl.handlers.workflows import evaluation
from brokerfl.handlers.workflows.scoring import ScoreStored, journal_version, score_when_due
from brokerfl.handlers.workflows.server_state import (
    DrainDone,
    JoinDeadline,
    ServerState,
    TooFewAble,
    able_clients,
    awaited_clients,
    check_num_samples,
    close_when_every_participant_answered,
    finish_run,
    live_clients,
    maybe_begin,
    refuse_outsider,
    see_client,
    shown_ids,
)
from brokerfl.runtime.handler_table import Context, HandlerFailed, HandlerSet, Started
from brokerfl.storage.journal import retention_warning
from brokerfl.storage.metrics_log import last_model_version
from brokerfl.storage.store import ModelVersion
from brokerfl.transports.base import bounded
from brokerfl.wire.message import (
    EvaluateResult,
    Heartbeat,
    Heartbeats,
    Join,
    Leave,
    ServerStandby,
)

MAX_STANDBYS = 16  # standby servers a status lists (announcements are not authenticated without identity)


def resume_or_initialise(message: Started, ctx: Context[ServerState]):
    """Pick up the newest stored model version, or store version 0."""
    state: ServerState = ctx.state
    state.model = state.store.latest()
    if state.model is None:
        config = state.config
        parameters = state.app.initial_parameters(config.seed)
        state.model = ModelVersion(0, 0, None, state.strategy.name, [], parameters, created=time.time())
        state.store.put(state.model)
        journal_version(ctx, state.model, with_parameters=True)
    else:
        # the last process may have died between storing this version and journaling it:
        # journal it again (replay skips a repeated record of the same version and hash)
        journal_version(ctx, state.model, with_parameters=state.model.version == 0)
    _warn_if_retention_cuts(ctx)
    state.round = state.model.round
    state.strategy.resume(state.model.version, state.model.strategy_state)  # e.g. a server optimizer's moments
    _backfill_metrics(state)
    # so that updates redelivered after a restart are recognised as already folded
    state.recent_update_ids = [set(state.store.metadata(v)["update_ids"]) for v in state.store.versions()[-5:]]
    awaited = awaited_clients(state)
    ctx.log.info(
        "server ready",
        model_version=state.model.version,
        round=state.round,
        waiting_for=shown_ids(awaited) or "-",
        **({"removed": shown_ids(sorted(state.admin.removed))} if state.admin.removed else {}),
    )
    if state.round >= state.config.rounds:
        return finish_run(ctx, "all rounds were already done")
    if state.admin.paused:  # restored from the admin queue (brokerfl.runtime.operator_commands)
        ctx.log.warning(
            "paused: no round starts until an operator resumes the run: waiting for `admin resume`", round=state.round
        )
    ctx.set_timer("join", state.config.strategy.join_timeout_s, JoinDeadline())
    return None


def _warn_if_retention_cuts(ctx: Context[ServerState]) -> None:
    config: RunConfig = ctx.state.config
    if not config.journal:
        return
    participants = config.clients_per_round()
    model_bytes = sum(np.asarray(a).nbytes for a in ctx.state.model.parameters.values())
    warning = retention_warning(
        model_bytes, rounds=config.rounds, participants=participants, max_bytes=config.journal_max_bytes
    )
    if warning is not None:
        ctx.log.warning(f"journal retention: {warning}")


def _backfill_metrics(state: ServerState) -> None:
    """A server killed between storing a version and writing its metrics line left a gap:
    fill it from the stored versions' metadata (the round's duration is not known)."""
    if state.metrics.path is None:
        return
    written = last_model_version(state.metrics.path)
    for version in state.store.versions():
        if version > written and version > 0:
            meta = state.store.metadata(version)
            state.metrics.append(
                {
                    "round": meta["round"],
                    "model_version": version,
                    "accuracy": meta["metrics"].get("accuracy"),
                    "loss": meta["metrics"].get("loss"),
                    "num_updates": len(meta["update_ids"]),
                    "duration_s": None,
                    "sha256": meta["sha256"],
                    "restored": True,
                }
            )


def register_client(message: Join, ctx: Context[ServerState]):
    refuse_outsider(ctx.state, message.client_id, "Join")
    check_num_samples(message.num_samples, ctx.state, f"Join of client {message.client_id}")
    if see_client(ctx.state, message.client_id, message.num_samples, message.instance, ctx.log):
        ctx.log.info("client joined", client=message.client_id, clients=len(ctx.state.clients))
    return maybe_begin(ctx)


def mark_alive(message: Heartbeat, ctx: Context[ServerState]):
    refuse_outsider(ctx.state, message.client_id, "Heartbeat")
    check_num_samples(message.num_samples, ctx.state, f"Heartbeat of client {message.client_id}")
    if see_client(ctx.state, message.client_id, message.num_samples, message.instance, ctx.log, message.training_s):
        ctx.log.info("client seen by heartbeat", client=message.client_id)
    return maybe_begin(ctx)


def mark_many_alive(message: Heartbeats, ctx: Context[ServerState]):
    """One process's logical clients, in one message (each as a Heartbeat of its own)."""
    for client_id, count in message.clients.items():
        refuse_outsider(ctx.state, client_id, "Heartbeats")
        check_num_samples(count, ctx.state, f"Heartbeats entry of client {client_id}")
    for client_id, count in message.clients.items():
        if see_client(ctx.state, client_id, count, message.instance, ctx.log, message.training.get(client_id)):
            ctx.log.info("client seen by heartbeat", client=client_id)
    return maybe_begin(ctx)


def forget_client(message: Leave, ctx: Context[ServerState]):
    ctx.state.clients.pop(message.client_id, None)
    if message.error:
        return take_unable(message, ctx)
    ctx.log.info("client left", client=message.client_id, reason=bounded(message.reason))


def take_unable(message: Leave, ctx: Context[ServerState]):
    """A client whose app failed at its start (its ``load_partition``, its ``model()``): the
    run goes on without it (a round it was sampled for counts it as failed), or, if fewer
    than ``min_clients`` can still take part, finishes as failed saying who and why."""
    state: ServerState = ctx.state
    refuse_outsider(state, message.client_id, "Leave")
    cid, error = message.client_id, bounded(message.error, 800)  # the client's UNABLE_ERROR_CHARS
    state.unable[cid] = error
    ctx.log.error(
        f"client {cid} cannot run app {state.config.app!r}: the run goes on without it", client=cid, error=error
    )
    if state.done:
        return None
    if state.round_open and cid in state.participants and cid not in state.answered:
        state.failed.add(cid)
        close_when_every_participant_answered(ctx)
    if able_clients(state) < state.config.strategy.min_clients:
        # Without identity a Leave may be forged: a client that is in fact alive refutes it
        # with its next heartbeat (see_client) before the run is given up.
        grace = 2 * state.config.liveness.heartbeat_s if math.isfinite(state.config.liveness.timeout_s) else 0.0
        ctx.set_timer("unable", grace, TooFewAble())
        return None
    return maybe_begin(ctx)


def give_up_without_able_clients(message: TooFewAble, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    able, needed = able_clients(state), state.config.strategy.min_clients
    if state.done or able >= needed:
        return None
    failed = "; ".join(f"client {c}: {e}" for c, e in sorted(state.unable.items())[:5])
    return finish_run(
        ctx,
        f"too few clients can run app {state.config.app!r}: {able} of {state.config.clients} (min_clients {needed}); "
        f"the app failed at the start of {shown_ids(sorted(state.unable))} ({failed})",
        failed=True,
    )


def note_standby(message: ServerStandby, ctx: Context[ServerState]):
    """A server waiting for this one's role (:func:`brokerfl.assembly.roles.take_server_role`)."""
    standbys = ctx.state.standbys
    name = bounded(message.sender, 80)
    if name == f"server@{ctx.state.instance}":
        return  # its own, from while it waited
    if name not in standbys:
        if len(standbys) >= MAX_STANDBYS:
            standbys.pop(min(standbys, key=standbys.get))  # the longest silent one
        ctx.log.warning("a standby server waits for this one's role", standby=name)
    standbys[name] = time.monotonic()


def start_without_everyone(message: JoinDeadline, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if state.begun or state.done:
        return None
    live = live_clients(state)
    missing = shown_ids(awaited_clients(state))
    if len(live) >= state.config.strategy.min_clients:
        ctx.log.warning(
            "beginning without every client",
            live=len(live),
            expected=state.config.clients - len(state.admin.removed),
            missing=missing,
        )
        state.begun = True
        return state.begin(ctx)
    needed = state.config.strategy.min_clients
    awaited = awaited_clients(state)
    ctx.log.warning(
        "no live clients: waiting"
        if not live
        # waiting_for names them
        else (
            f"too few live clients to begin: waiting for {needed - len(live)} (of {needed})"
            + (
                f": client{'s' if len(awaited) > 1 else ''} "
                f"{', '.join(awaited[:20])}{' ...' if len(awaited) > 20 else ''} "
                f"{'have' if len(awaited) > 1 else 'has'} not joined"
                if awaited
                else ""
            )
            + (f"; the app failed at the start of client(s) {shown_ids(sorted(state.unable))}" if state.unable else "")
        ),
        live=len(live),
        needed=needed,
        waiting_for=missing,
    )
    ctx.set_timer("join", state.config.strategy.join_timeout_s, JoinDeadline())
    return None


def stop_after_drain(message: DrainDone, ctx: Context[ServerState]):
    ctx.stop()


def fail_run_on_own_failure(message: HandlerFailed, ctx: Context[ServerState]):
    """One of the server's own steps (closing a round, a deadline, the start) raised: what it
    was due to do will never happen, so the run finishes as failed, saying why, instead of
    waiting for ever. After the end, the drain is cut short."""
    if ctx.state.done:
        ctx.stop()
        return None
    return finish_run(ctx, f"the server could not go on: {message.error}", failed=True)


LIFECYCLE = HandlerSet(
    "server lifecycle",
    {
        Started: resume_or_initialise,
        Join: register_client,
        Heartbeat: mark_alive,
        Heartbeats: mark_many_alive,
        Leave: forget_client,
        TooFewAble: give_up_without_able_clients,
        ServerStandby: note_standby,
        JoinDeadline: start_without_everyone,
        DrainDone: stop_after_drain,
        HandlerFailed: fail_run_on_own_failure,
        ScoreStored: score_when_due,  # scoring a stored version aside (handlers/workflows/scoring.py)
        EvaluateResult: evaluation.collect,  # federated evaluation (handlers/workflows/evaluation.py)
        evaluation.EvaluationDeadline: evaluation.deadline,
    },
    needs=(ServerState,),
)
