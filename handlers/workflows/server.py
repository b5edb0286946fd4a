"""Synchronous rounds (FedAvg), the server workflow's own handler set; with the lifecycle
set (``handlers/workflows/lifecycle.py``) it makes the workflow's ``HANDLERS``. The state
and the operations on it are in ``handlers/workflows/server_state.py``.

Lifecycle: resume from the newest stored model version (or store version 0), learn the
federation from Joins and Heartbeats (a restarted server relearns it from heartbeats
alone), and begin once every expected client is live, or at the join deadline with at
least ``min_clients``. ``state.begin`` is what beginning means: synchronous rounds here,
per-client tasks in ``handlers/workflows/async_server.py``, which reuses the lifecycle.

A synchronous round: sample live clients, broadcast one TrainTask, fold each
ParameterUpdate into the strategy's running sum as it arrives (held unacked), and close
when every sampled client answered, or at the round deadline with at least
``min_clients`` answers. Closing stores the new model version before it acks the round's
updates, so a crash anywhere before that replays the round from the broker. An update
that is not folded is acked only after its UpdateDropped record is published.

Evaluation is off the critical path: the next round's TrainTask goes out with the commit,
and the server scores the version it just stored (on its test data) afterwards, on a
thread aside while the clients train and their updates come in
(``handlers/workflows/scoring.py``). Only then are the version's journal record and
metrics line written, with its accuracy and loss. Versions are scored in order: storing the next one (or finishing the
run) first scores any still waiting. A
crash before the score loses the score only (the resumed server journals the version again,
without it). The stored version's own metadata holds accuracy and loss only with
``scores_in_store`` (the swarm sets it: its peers pick the best model from stored versions).
"""

from __future__ import annotations

from brokerfl.handlers.strategies.aggregate import BadUpdate
from brokerfl.handlers.workflows import lifecycle
from brokerfl.handlers.workflows.server_state import (
    RoundComplete,
    RoundDeadline,
    RoundWaiting,
    ServerState,
    already_folded,
    app_train_metrics,
    check_claimed_samples,
    check_parameters,
    close_round,
    close_when_every_participant_answered,
    decompressed,
    drop,
    log_waiting,
    make_state,
    note_failure,
    outside_federation,
    parameters_bytes,
    refresh_client,
    too_few_answers,
)
from brokerfl.runtime.handler_table import Context, HandlerSet, LegacyTable
from brokerfl.runtime.timing import timings
from brokerfl.wire.message import ParameterUpdate, TrainFailed

__all__ = ["HANDLERS", "ROUNDS", "make_state", "table"]

table = LegacyTable("server")  # deprecated: what old-style extra_handlers modules register on (brokerfl.assembly.roles)


def fold_update(update: ParameterUpdate, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    refresh_client(state, update.client_id)
    if state.round_open and update.message_id in state.folded:
        # A redelivered copy (the connection was lost after the fold): it replaces the
        # delivery that died with the old connection and is acked with the round's commit.
        ctx.hold()
        return None
    reason = _why_not_fold(update, state)
    if reason is not None:
        return drop(ctx, update, reason)
    travelled = parameters_bytes(update.parameters)  # compressed, as it came
    try:
        if update.compression:  # trained on state.model (else it was dropped as stale above)
            update.parameters = decompressed(update, state.model.parameters, state.config)
        check_parameters(update.parameters, state)
        check_claimed_samples(update, state)
    except BadUpdate as exc:
        # It answered (a participant's one update for the open round), so the round may
        # close now (the worker keeps a refusing handler's timers). A later update of its
        # own is still folded while the round is open: without identity enforcement the
        # refused one may have been another's, sent in its name.
        state.refused.add(update.client_id)
        close_when_every_participant_answered(ctx)
        raise BadUpdate(
            f"update from client {update.client_id} (app {state.config.app!r}, its train()): {exc}"
        ) from None  # dead-lettered with this reason
    with timings.phase("fold"):
        state.strategy.fold(update.parameters, update.num_samples)
    state.client_seconds.append(update.metrics.get("train_s", 0.0))
    state.update_metrics.append((app_train_metrics(update), update.num_samples))
    state.update_bytes += travelled
    state.folded[update.message_id] = update.client_id
    state.answered.add(update.client_id)
    ctx.hold()
    ctx.log.debug("update folded", client=update.client_id, folded=len(state.folded), of=len(state.participants))
    close_when_every_participant_answered(ctx)
    return None


def _why_not_fold(update: ParameterUpdate, state: ServerState) -> str | None:
    if (outsider := outside_federation(state, update.client_id)) is not None:
        return outsider
    if already_folded(state, update.message_id):
        return "duplicate: already folded into a stored model version"
    if state.done:
        return "late: the run is finished"
    if not state.round_open or update.round != state.round:
        return f"late: trained for round {update.round}, the server is at round {state.round}" + (
            "" if state.round_open else " (closed)"
        )
    if update.model_version != state.model.version:
        return f"stale: trained on model version {update.model_version}, current is {state.model.version}"
    if update.client_id not in state.participants:
        return f"client {update.client_id} was not sampled for round {state.round}"
    if update.client_id in state.answered:
        return f"client {update.client_id} already answered round {state.round}"
    if update.client_id in state.failed:
        return f"client {update.client_id} reported its training for round {state.round} failed"
    return None


def round_complete(message: RoundComplete, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if not state.round_open or message.round != state.round:
        return None
    if (state.failed or state.refused) and state.strategy.folded() < state.config.strategy.min_clients:
        # every participant answered, too many without an update: no use waiting for the deadline
        why = [
            f"client {f.client_id}: {f.error}"
            for f in state.train_failures
            if f.round == state.round and f.client_id in state.failed
        ][-3:]
        why += [f"client {c}: {state.unable[c]}" for c in sorted(state.failed & set(state.unable))][: 3 - len(why)]
        return too_few_answers(
            ctx,
            f"round {state.round}: every participant answered, {len(state.failed)} with a failed training"
            + (f", {len(state.refused)} with a refused update" if state.refused else "")
            + (f" ({'; '.join(why)})" if why else ""),
        )
    return close_round(ctx)


def take_failure(message: TrainFailed, ctx: Context[ServerState]):
    """A participant whose training failed has answered, without an update: the round
    closes once every participant has answered (or at its deadline, as ever)."""
    state: ServerState = ctx.state
    note_failure(message, ctx)
    cid = message.client_id
    if not (state.round_open and message.round == state.round and message.model_version == state.model.version):
        return None  # a round already closed (or another's): on record, nothing to wait for
    if cid not in state.participants or cid in state.answered or cid in state.failed or cid in state.refused:
        return None
    state.failed.add(cid)
    close_when_every_participant_answered(ctx)
    return None


def round_deadline(message: RoundDeadline, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if not state.round_open or message.round != state.round:
        return None
    folded = state.strategy.folded()
    missing = sorted(set(state.participants) - state.answered - state.failed - state.refused)
    if folded >= state.config.strategy.min_clients:
        ctx.log.warning(
            "round deadline: closing without every answer",
            folded=folded,
            missing=missing,
            failed=sorted(state.failed),
            refused=sorted(state.refused),
        )
        return close_round(ctx)
    return too_few_answers(ctx, "round deadline", missing=missing)


ROUNDS = HandlerSet(
    "synchronous rounds",
    {
        ParameterUpdate: fold_update,
        RoundComplete: round_complete,
        TrainFailed: take_failure,
        RoundDeadline: round_deadline,
        RoundWaiting: log_waiting,
    },
    needs=(ServerState,),
)

# what a run of this workflow composes (brokerfl.assembly.roles adds the operator's set and the rest)
HANDLERS = (lifecycle.LIFECYCLE, ROUNDS)
