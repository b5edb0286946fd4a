"""The operator's handler set: status, and the admin commands.

:mod:`brokerfl.assembly.roles` adds it to every coordinator's table (server, asynchronous, cyclic,
the swarm's aggregator). Each admin command is answered with an AdminReply to its
requester and to the journal; a change of admin state also publishes the new
AdminStateRecord to the run's admin queue (see :mod:`brokerfl.runtime.operator_commands`), confirmed before
the command is acked, so a restarted server picks it up.

What each command does:

- ``abort``: the run ends now with the last stored model version as its result. Updates
  folded into the open round are dropped with the reason "aborted by ..." (their records
  are published before they are acked), clients get Exit, in-flight updates are recorded
  as late during the drain, and the server exits 0. The stored ``rounds`` becomes the last
  stored round, so a server started again finishes at once instead of training on.
- ``pause``: the open round finishes; no new round starts (nor a retry) until ``resume``.
  Synchronous rounds only: the asynchronous server refuses it.
Who may send them: with ``identity.enforce``, the run's admin user only (RabbitMQ-validated
``user_id``), checked by the worker's inbox check (:func:`brokerfl.runtime.identity.server_inbox_check`)
before any handler runs, like every other message's sender. Without it there is no identity
to check: any process that may publish to the run's exchange is accepted, and
``command.sender`` is only what it claims.

Every command is checked against the federation first: client ids must be the run's
(``config.client_ids()``), min clients at most the clients not removed, rounds at least
the round under way (or done); a command that fails is refused (``ok=False``, nothing
changes) with the reason, and ``brokerfl admin`` exits 1.

- ``remove-client ID``: never sampled again; it leaves the open round's participants
  (its update, if it comes, is dropped as "not sampled"; the round closes if everyone
  else has answered) and gets Exit.
- ``set-min-clients N``, ``set-rounds N``: override the config. Rounds cannot go below the
  round in progress or the last stored round; set to that round, the run ends after it
  (or now, between rounds).
- ``shutdown-clients [IDs]``: Exit to those clients (or all). They stay members until
  their liveness times out; ``remove-client`` is what keeps one from being sampled.
"""

from __future__ import annotations

import time

from brokerfl.handlers.workflows.run_records import dropped_updates, run_record
from brokerfl.handlers.workflows.server_state import (
    ServerState,
    close_when_every_participant_answered,
    duplicate_instances,
    finish_run,
    live_clients,
    outside_federation,
    record_drop,
    start_round,
)
from brokerfl.runtime.handler_table import Context, HandlerSet, Outbound, to_client, to_clients, to_requester
from brokerfl.runtime.operator_commands import (
    AbortRun,
    AdminCommand,
    AdminReply,
    PauseRounds,
    RemoveClient,
    ResumeRounds,
    SetMinClients,
    SetRounds,
    ShutdownClients,
    StatusReply,
    StatusRequest,
    client_id_order,
)
from brokerfl.storage.metrics_log import record_metrics
from brokerfl.transports.base import bounded
from brokerfl.transports.topology import ADMIN, AUDIT
from brokerfl.wire.message import Exit

OPERATOR = HandlerSet("operator", needs=(ServerState,))


# ---------------------------------------------------------------- status


@OPERATOR.on(StatusRequest)
def answer_status(message: StatusRequest, ctx: Context[ServerState]):
    return [to_requester(message.reply(StatusReply, status=status_of(ctx.state)))]


def status_of(state: ServerState) -> dict:
    """The run as this server believes it (plain values, for the wire and for --json)."""
    now = time.monotonic()
    live = set(live_clients(state))
    model = state.model
    recent = 3 * state.config.liveness.heartbeat_s  # a standby announces itself every heartbeat_s
    return {
        "run": state.config.run,
        "server": state.instance or None,  # the active server process (host:pid)
        "standbys": sorted(name for name, seen in list(state.standbys.items()) if now - seen <= recent),
        "strategy": state.strategy.name,
        "round": state.round,
        "round_open": state.round_open,
        "round_age_s": round(now - state.round_started, 1) if state.round_open else None,
        **round_deadline(state, now),
        "model_version": model.version if model else None,
        "accuracy": model.metrics.get("accuracy") if model else None,
        "loss": model.metrics.get("loss") if model else None,
        **latest_metrics(state),
        "begun": state.begun,
        "done": state.done,
        "failure": state.failure,
        "paused": state.admin.paused,
        "rounds": state.config.rounds,
        "min_clients": state.config.strategy.min_clients,
        "clients_expected": state.config.clients,
        "clients": [
            {
                "id": cid,
                "last_seen_s": round(now - record.last_seen, 1),
                "live": cid in live,
                "removed": cid in state.admin.removed,
                "num_samples": record.num_samples,
                "duplicate": duplicate_instances(state, cid),  # two processes claim this id: their instances
                "training_s": _rounded(record.training_for(now)),
            }
            for cid, record in sorted(state.clients.items(), key=lambda kv: client_id_order(kv[0]))
        ],
        "removed": sorted(state.admin.removed, key=client_id_order),
        "participants": list(state.participants) if state.round_open else [],
        "still_training": sorted(
            set(state.participants) - state.answered - state.failed - state.refused, key=client_id_order
        )
        if state.round_open
        else [],
        "failed": sorted(state.failed, key=client_id_order) if state.round_open else [],  # this round's
        "refused": sorted(state.refused, key=client_id_order)
        if state.round_open
        else [],  # this round's: their update was refused
        "train_failures": [vars(f) for f in state.train_failures[-STATUS_FAILURES:]],
        "unable": dict(sorted(state.unable.items())[:STATUS_FAILURES]),  # clients whose app failed at their start
        "held_updates": held_updates(state),
        # a secure round's stage and who it waits for (handlers/workflows/secure_server.py)
        "secure_round": state.secure.status() if state.secure is not None and state.round_open else None,
        "dropped_updates": dropped_updates(state),  # the run's, across server restarts
    }


STATUS_FAILURES = 10  # the newest training failures a status shows


def round_deadline(state: ServerState, now: float) -> dict:
    """The open round's deadline (unix seconds) and the seconds left until it (negative:
    past it, e.g. while the server stores); both None without an open round."""
    if not state.round_open:
        return {"round_deadline": None, "round_time_left_s": None}
    left = state.round_started + state.config.strategy.round_deadline_s - now
    return {"round_deadline": round(time.time() + left, 1), "round_time_left_s": round(left, 1)}


def latest_metrics(state: ServerState) -> dict:
    """The app's metrics of the newest metrics lines (brokerfl.wire.app_metrics): ``metrics``
    of the newest model version (its clients' training, its server evaluation),
    ``federated_metrics`` of the newest federated evaluation, and the ``target`` metric."""
    out: dict = {"metrics": None, "metrics_version": None, "federated_metrics": None, "target": None}
    app = state.app
    if app is not None:
        out["target"] = {"name": app.target.name, "higher_is_better": app.target.higher_is_better}
    for record in reversed(state.metrics.records[-64:]):
        key = "federated_metrics" if record.get("evaluation") == "federated" else "metrics"
        if out[key] is None and record.get("evaluation") in (None, "federated"):
            out[key] = record_metrics(record)
            if key == "metrics":
                out["metrics_version"] = record.get("model_version")
        if out["metrics"] is not None and out["federated_metrics"] is not None:
            break
    return out


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def held_updates(state: ServerState) -> int:
    """Updates folded and held unacked, in no stored version yet."""
    return state.held_updates()


# ---------------------------------------------------------------- admin commands


def not_members(state: ServerState, client_ids: list[str]) -> str | None:
    """Why some of ``client_ids`` are not the run's clients, or None."""
    outside = [cid for cid in client_ids if outside_federation(state, cid) is not None]
    if not outside:
        return None
    shown = ", ".join(bounded(cid, 64) for cid in outside[:10]) + (
        f" and {len(outside) - 10} more" if len(outside) > 10 else ""
    )
    return (
        f"client{'s' if len(outside) > 1 else ''} {shown} {'are' if len(outside) > 1 else 'is'} not in the federation "
        f"of run {state.config.run} (client ids {state.config.client_ids_text()})"
    )


def answer(
    ctx: Context[ServerState], command: AdminCommand, ok: bool, text: str, *, changed: bool = False
) -> list[Outbound]:
    """The reply to the requester and to the journal; the new admin state if ``changed``."""
    state: ServerState = ctx.state
    (ctx.log.info if ok else ctx.log.warning)(
        "admin command", command=command.TYPE, user=command.user_id, by=bounded(command.sender, 200), ok=ok, reply=text
    )
    reply = command.reply(
        AdminReply,
        command=command.TYPE,
        command_id=command.message_id,
        by=command.sender,
        user=command.user_id,
        ok=ok,
        text=text,
        round=state.round,
        model_version=state.model.version if state.model else 0,
    )
    out = [to_requester(reply)]
    if state.config.journal:
        out.append(Outbound(AUDIT, reply))
    if changed:
        out.insert(0, Outbound(ADMIN, state.admin.record()))
    return out


@OPERATOR.on(AbortRun)
def abort_run(command: AbortRun, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if state.done:
        return answer(ctx, command, False, "the run is already finished")
    last = state.model.round if state.model else 0
    why = f"aborted by {command.sender or 'an operator'}" + (f": {command.reason}" if command.reason else "")
    out: list[Outbound] = []
    if state.round_open and state.folded:  # folded, in no stored version: dropped, on record
        out += [
            o
            for uid, client in state.folded.items()
            for o in record_drop(
                ctx,
                uid,
                client,
                f"{why} (round {state.round} not finished)",
                round_=state.round,
                model_version=state.model.version,
            )
        ]
        ctx.commit()
    state.admin.rounds = last  # a server started again finishes at once
    out += finish_run(ctx, why, aborted=True)
    return (
        answer(
            ctx,
            command,
            True,
            f"run finished at model version {state.model.version} (round {last}); clients sent Exit",
            changed=True,
        )
        + out
    )


@OPERATOR.on(PauseRounds)
def pause_rounds(command: PauseRounds, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if state.begin is not start_round:
        return answer(ctx, command, False, "pause is for synchronous rounds; this server's strategy is asynchronous")
    if state.done:
        return answer(ctx, command, False, "the run is already finished")
    state.admin.paused = True
    now = f"round {state.round} finishes, then no new round starts" if state.round_open else "no new round starts"
    return [*answer(ctx, command, True, f"paused: {now} until resume", changed=True), run_record(state, "paused")]


@OPERATOR.on(ResumeRounds)
def resume_rounds(command: ResumeRounds, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if not state.admin.paused:
        return answer(ctx, command, False, "not paused")
    state.admin.paused = False
    held, state.admin.held_start = state.admin.held_start, None
    out = answer(
        ctx, command, True, "resumed" + (": starting the next round" if held and not state.done else ""), changed=True
    )
    out.append(run_record(state, "training" if state.begun else "waiting"))
    if held and state.begun and not state.done and not state.round_open:
        out += start_round(ctx, retry=held == "retry") or []
    return out


@OPERATOR.on(RemoveClient)
def remove_client(command: RemoveClient, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    cid = command.client_id
    if (outsider := not_members(state, [cid])) is not None:
        return answer(ctx, command, False, outsider)
    if cid in state.admin.removed:
        return answer(ctx, command, False, f"client {cid} was already removed")
    state.admin.removed.add(cid)
    known = "" if cid in state.clients else " (not seen by this server)"
    out = answer(ctx, command, True, f"client {cid} removed{known}: never sampled again; sent Exit", changed=True)
    out.append(to_client(cid, Exit(reason=f"removed by {command.sender or 'an operator'}", round=state.round)))
    if state.round_open and cid in state.participants:
        state.participants = [p for p in state.participants if p != cid]
        close_when_every_participant_answered(ctx)  # those left may all have answered
    return out


@OPERATOR.on(SetMinClients)
def set_min_clients(command: SetMinClients, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if command.min_clients < 1:
        return answer(ctx, command, False, f"min clients must be at least 1, got {command.min_clients}")
    members = sum(1 for cid in state.config.client_ids() if cid not in state.admin.removed)
    if command.min_clients > members:
        removed = f" ({len(state.admin.removed)} removed)" if state.admin.removed else ""
        return answer(
            ctx,
            command,
            False,
            f"min clients {command.min_clients} is more than the {members} clients of the federation{removed}: no "
            "round could ever close",
        )
    old = state.config.strategy.min_clients
    state.admin.min_clients = command.min_clients
    state.config = state.admin.applied_to(state.config)
    return answer(ctx, command, True, f"min clients {old} -> {command.min_clients}", changed=True)


@OPERATOR.on(SetRounds)
def set_rounds(command: SetRounds, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if command.rounds < 1:
        return answer(ctx, command, False, f"rounds must be at least 1, got {command.rounds}")
    if state.done:
        return answer(ctx, command, False, "the run is already finished")
    old = state.config.rounds
    floor = state.round if state.round_open else (state.model.round if state.model else 0)
    if command.rounds < floor:
        then = (
            "under way: the least is {0} (the run ends after this round; `admin abort` ends it now)"
            if state.round_open
            else "done: the least is {0} (it ends the run now)"
        )
        return answer(
            ctx, command, False, f"rounds {command.rounds} is below round {floor}, already " + then.format(floor)
        )
    rounds = command.rounds
    state.admin.rounds = rounds
    state.config = state.admin.applied_to(state.config)
    out = answer(ctx, command, True, f"rounds {old} -> {rounds}", changed=True)
    if state.begun and not state.round_open and state.round >= rounds:
        out += finish_run(ctx, f"{rounds} rounds done (set by {command.sender or 'an operator'})")
    return out


@OPERATOR.on(ShutdownClients)
def shutdown_clients(command: ShutdownClients, ctx: Context[ServerState]):
    state: ServerState = ctx.state
    exit_message = Exit(reason=f"shut down by {command.sender or 'an operator'}", round=state.round)
    if not command.client_ids:
        return answer(ctx, command, True, "sent Exit to every client") + [to_clients(exit_message)]
    if (outsiders := not_members(state, command.client_ids)) is not None:
        return answer(ctx, command, False, outsiders)
    out = answer(ctx, command, True, f"sent Exit to clients {', '.join(command.client_ids)}")
    return out + [to_client(cid, exit_message) for cid in command.client_ids]
