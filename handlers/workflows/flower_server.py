"""The server of a Flower app (config ``flower_app``): its ServerApp drives the run.

The ServerApp's ``main`` runs as the worker's driver (:meth:`Context.drive`) over a
:class:`~brokerfl.flower.grid.BrokerGrid`; the handlers here are the grid's way to the
broker and back:

- ``GridPush`` (posted by the grid): the app's requests, each to its node's client queue;
  the grid goes on once they are confirmed.
- ``FlowerReply`` (from a node): handed to the grid, used once; a reply to a request this
  run never sent, from a client the request was not sent to, or a second reply to one
  request is not used (recorded as dropped, with its reason). Acked at once: the journal
  holds it, and a restarted ServerApp finds it there.
- ``GridRecord`` (posted by the grid): what an exchange returned, to the journal before the
  app sees it; the replies' metrics to ``metrics.jsonl``.
- the ServerApp's end (its outcome): Exit to the nodes, the run's RunFinished record, stop.
- the operator's status, abort, pause and resume. The commands that name rounds or clients
  (set-rounds, set-min-clients, remove-client) are refused: a Flower ServerApp decides its
  rounds and which nodes it asks.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from brokerfl.config import ConfigError, RunConfig
from brokerfl.flower import node_id_of, run_id_of
from brokerfl.flower.app_dir import FlowerApp, FlowerAppError, load_flower_app
from brokerfl.flower.grid import (
    AGAIN,
    SUPERLINK_NODE_ID,
    BrokerGrid,
    Diverged,
    GridClosed,
    GridPush,
    GridRecord,
    Journaled,
    check_reply,
    flower_grid,
)
from brokerfl.flower.records import RecordsError
from brokerfl.handlers.workflows.admin import answer
from brokerfl.runtime.handler_table import (
    Context,
    HandlerFailed,
    HandlerSet,
    Outbound,
    Rejected,
    Started,
    to_client,
    to_clients,
    to_requester,
)
from brokerfl.runtime.operator_commands import (
    AbortRun,
    AdminCommand,
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
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.transports.topology import AUDIT
from brokerfl.wire.message import Exit, FlowerReply, Message, RunFinished, ServerStandby, UpdateDropped
from brokerfl.wire.names import bounded

HANDLERS = HandlerSet("flower server")
# A ServerApp asks nodes that have not started yet (get_node_ids is the federation's every
# node): their queues are declared with the run's, so a request waits there for its node.
SENDS_BEFORE_CLIENTS_JOIN = True
OPERATOR = HandlerSet("flower operator")
ERROR_CHARS = 1000


@dataclass(kw_only=True)
class ServerAppDone(Message):
    """The ServerApp's ``main`` returned, or raised ``error`` (a LOCAL message)."""

    LOCAL = True

    error: str = ""
    aborted: bool = False


@dataclass
class FlowerServerState:
    config: RunConfig
    app: FlowerApp
    metrics: MetricsLog
    grid: BrokerGrid
    store: Any = None
    instance: str = ""
    model: Any = None  # no brokerfl model version: the ServerApp keeps its model
    failure: str | None = None
    done: bool = False
    begun: bool = False
    started_at: float = field(default_factory=time.monotonic)
    standbys: dict[str, float] = field(default_factory=dict)
    last_reply: dict[str, float] = field(default_factory=dict)  # client id -> monotonic time
    dropped: int = 0
    errors: int = 0
    admin: Any = None
    on_round: list[Any] = field(default_factory=list)

    @property
    def round(self) -> int:
        """The round of the ServerApp's last exchange (its requests' group or ``server-round``)."""
        records = self.metrics.records
        return int(records[-1].get("round", 0)) if records else 0


def make_state(config: RunConfig, store: Any, metrics: MetricsLog) -> FlowerServerState:
    app = flower_app_of(config)
    try:
        app.load_server_app()  # a failing import stops the server before the run starts
    except FlowerAppError as exc:
        raise ConfigError(str(exc)) from None
    nodes = {node_id_of(config.run, cid): cid for cid in config.client_ids()}
    return FlowerServerState(config, app, metrics, flower_grid(config.run, nodes), store)


def flower_app_of(config: RunConfig) -> FlowerApp:
    """The Flower app a run config names, as a :class:`ConfigError` if it cannot be read."""
    try:
        return load_flower_app(config.flower_app or "", config.flower_config)
    except ValueError as exc:  # FlowerAppError, FlowerUnavailable
        raise ConfigError(str(exc)) from None


def resume_from_journal(state: FlowerServerState, messages: Iterable[Message]) -> None:
    """What the run's journal holds, for the re-run ServerApp (a restarted server)."""
    journaled = Journaled()
    for message in messages:
        if isinstance(message, RunFinished):
            journaled.finished = message.reason or "finished"
        else:
            journaled.add(message)
    state.grid = flower_grid(state.config.run, state.grid.nodes, journaled=journaled)
    if not journaled.requests and state.metrics.path is not None:  # a fresh run: no lines of an earlier one
        state.metrics.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- the ServerApp


@HANDLERS.on(Started)
def start_server_app(message: Started, ctx: Context[FlowerServerState]):
    state = ctx.state
    finished = state.grid.journaled.finished
    if finished is not None:  # started again after the end: nodes started for it are told so
        state.done = True
        ctx.log.info("the run is already finished: nothing to do", reason=finished)
        ctx.stop()
        return [to_clients(Exit(reason=f"the run is already finished ({finished})"))]
    state.begun = True
    resumed = len(state.grid.journaled.requests)
    ctx.log.info(
        "flower ServerApp starting",
        app=state.app.name,
        nodes=len(state.grid.nodes),
        journaled_requests=resumed,
    )
    ctx.drive("serverapp", _server_app_driver(state), _server_app_done)
    return []


def _server_app_driver(state: FlowerServerState):
    app, grid, config = state.app, state.grid, state.config

    def drive(post, cancelled):
        from flwr.app import Context as FlowerContext
        from flwr.app import RecordDict

        grid.attach(post, cancelled)
        server_app = app.load_server_app()
        seed_everything(config.seed)  # the same seeds on every start: durable execution re-runs the app
        context = FlowerContext(
            run_id=run_id_of(config.run),
            node_id=SUPERLINK_NODE_ID,
            node_config={},
            state=RecordDict(),
            run_config=dict(app.run_config),
        )
        server_app(grid, context)

    return drive


def seed_everything(seed: int) -> None:
    """Python's, numpy's global and (if the app loaded it) torch's generators: what a
    ServerApp's strategy samples nodes with, and its model starts from."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _server_app_done(result: Any, error: BaseException | None) -> ServerAppDone:
    if error is None:
        return ServerAppDone()
    if isinstance(error, GridClosed):
        return ServerAppDone(aborted=True, error=str(error))
    if isinstance(error, Diverged):
        return ServerAppDone(error=f"the resumed ServerApp diverged from its journal: {error}")
    return ServerAppDone(error=bounded(f"the ServerApp raised {type(error).__name__}: {error}", ERROR_CHARS))


@HANDLERS.on(ServerAppDone)
def finish(message: ServerAppDone, ctx: Context[FlowerServerState]):
    state = ctx.state
    if state.done:  # an abort finished it already
        ctx.stop()
        return []
    if message.error and not message.aborted:
        return finish_run(ctx, message.error, failed=True)
    return finish_run(ctx, message.error or "the ServerApp finished")


def finish_run(ctx: Context[FlowerServerState], reason: str, *, failed: bool = False) -> list[Outbound]:
    state = ctx.state
    state.done = True
    state.failure = reason if failed else None
    (ctx.log.error if failed else ctx.log.info)("run finished", reason=reason)
    ctx.cancel_aside("serverapp")
    unclaimed = state.grid.close()
    ctx.stop()
    out = [to_clients(Exit(reason=reason))]
    if state.config.journal:
        out += [
            Outbound(
                AUDIT,
                reply.reply(
                    UpdateDropped,
                    update_id=reply.message_id,
                    client_id=reply.client_id,
                    reason="unclaimed: the ServerApp finished without asking for it",
                ),
            )
            for reply in unclaimed
        ]
        out.append(Outbound(AUDIT, RunFinished(reason=reason, failed=failed)))
    return out


@HANDLERS.on(HandlerFailed)
def handler_failed(message: HandlerFailed, ctx: Context[FlowerServerState]):
    return finish_run(ctx, f"the server's {message.failed_type} handler failed: {message.error}", failed=True)


# ---------------------------------------------------------------- the grid's way out and back


@HANDLERS.on(GridPush)
def push(message: GridPush, ctx: Context[FlowerServerState]):
    ctx.once_sent(lambda: message.sent.set_result(len(message.requests)))
    ctx.unless_sent(message.sent.set_exception)
    ctx.log.debug("requests sent", count=len(message.requests), first_seq=message.requests[0].seq)
    return [to_client(request.client_id, request) for request in message.requests]


@HANDLERS.on(GridRecord)
def record(message: GridRecord, ctx: Context[FlowerServerState]):
    state = ctx.state
    ctx.once_sent(lambda: message.sent.set_result(message.exchange.call))
    ctx.unless_sent(message.sent.set_exception)
    for summary in message.metrics:
        metrics = summary["metrics"]
        entry = {
            "round": summary["round"],
            "model_version": summary["round"],
            "flower": summary["flower"],  # the replies' message type: train, evaluate, query, ...
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "num_updates": summary["replies"] - summary["errors"],
            "errors": summary["errors"],
            "duration_s": round(max(ctx.wall() - summary["started"], 0.0), 3) if summary["started"] else 0.0,
            "time": round(ctx.wall(), 3),  # when the ServerApp got the replies (unix time)
            "metrics": metrics,
        }
        state.metrics.append(entry)
        for hook in state.on_round:
            hook(entry)
    return [Outbound(AUDIT, message.exchange)] if state.config.journal else []


@HANDLERS.on(FlowerReply)
def take_reply(reply: FlowerReply, ctx: Context[FlowerServerState]):
    state = ctx.state
    try:
        check_reply(reply)
    except RecordsError as exc:
        raise Rejected(f"reply {reply.reply_id}: {exc}") from None
    why_not = state.grid.take_reply(reply)
    state.last_reply[reply.client_id] = time.monotonic()
    if why_not == AGAIN:  # the same message again (unacked when a server stopped, or resent by its node)
        return []
    if why_not is None:
        if reply.error_code is not None:
            state.errors += 1
            ctx.log.warning(
                "a node answered with an error",
                client=reply.client_id,
                code=reply.error_code,
                reason=bounded(reply.error_reason, 300),
            )
        return []
    state.dropped += 1
    ctx.log.info("reply not used", client=reply.client_id, reason=why_not)
    if not state.config.journal:
        return []
    return [
        Outbound(
            AUDIT,
            reply.reply(UpdateDropped, update_id=reply.message_id, client_id=reply.client_id, reason=why_not),
        )
    ]


@HANDLERS.on(ServerStandby)
def note_standby(message: ServerStandby, ctx: Context[FlowerServerState]):
    ctx.state.standbys[message.sender] = time.monotonic()
    return []


# ---------------------------------------------------------------- the operator


@OPERATOR.on(StatusRequest)
def answer_status(message: StatusRequest, ctx: Context[FlowerServerState]):
    return [to_requester(message.reply(StatusReply, status=status_of(ctx.state)))]


def status_of(state: FlowerServerState) -> dict:
    """The run as this server sees it, in the keys ``brokerfl status`` reads."""
    now = time.monotonic()
    grid = state.grid
    outstanding = grid.outstanding()
    rounds = state.app.run_config.get("num-server-rounds")
    recent = 3 * state.config.liveness.heartbeat_s
    latest = state.metrics.records[-1]["metrics"] if state.metrics.records else {}  # the last exchange's replies'
    waiting = sorted(set(outstanding), key=client_id_order)
    clients = [
        {
            "id": cid,
            "live": cid in state.last_reply and now - state.last_reply[cid] <= max(recent, 60.0),
            "removed": False,
            "last_seen_s": round(now - state.last_reply.get(cid, state.started_at), 1),
            "num_samples": None,
            "training_s": None,
        }
        for cid in sorted(grid.nodes.values(), key=client_id_order)
    ]
    return {
        "run": state.config.run,
        "server": state.instance or None,
        "standbys": sorted(name for name, seen in state.standbys.items() if now - seen <= recent),
        "strategy": f"flower app {state.app.name}",
        "round": state.round,
        "round_open": bool(outstanding),
        "round_age_s": None,
        "model_version": 0,
        "accuracy": None,
        "loss": None,
        "metrics": latest,
        "metrics_version": None,
        "begun": state.begun,
        "done": state.done,
        "failure": state.failure,
        "paused": grid.paused,
        "rounds": rounds if isinstance(rounds, int) else 0,
        "min_clients": len(grid.nodes),
        "clients_expected": state.config.clients,
        "clients": clients,
        "removed": [],
        "participants": waiting,
        "still_training": waiting,
        "failed": [],
        "refused": [],
        "train_failures": [],
        "unable": {},
        "dropped_updates": state.dropped,
        "held_updates": 0,
        "flower": {
            "app": state.app.name,
            "requests_sent": grid.seq,
            "exchanges": grid.calls,
            "replayed_from_journal": grid.replayed,
            "error_replies": state.errors,
        },
    }


@OPERATOR.on(AbortRun)
def abort_run(command: AbortRun, ctx: Context[FlowerServerState]):
    if ctx.state.done:
        return answer(ctx, command, False, "the run is already finished")
    why = f"aborted by {command.sender or 'an operator'}" + (f": {command.reason}" if command.reason else "")
    out = answer(ctx, command, True, "the ServerApp is stopped; nodes sent Exit")
    return out + finish_run(ctx, why)


@OPERATOR.on(PauseRounds)
def pause(command: PauseRounds, ctx: Context[FlowerServerState]):
    ctx.state.grid.set_paused(True)
    return answer(ctx, command, True, "paused: the ServerApp's next push waits until resume")


@OPERATOR.on(ResumeRounds)
def resume_rounds(command: ResumeRounds, ctx: Context[FlowerServerState]):
    ctx.state.grid.set_paused(False)
    return answer(ctx, command, True, "resumed")


@OPERATOR.on(SetRounds, SetMinClients, RemoveClient)
def refuse(command: AdminCommand, ctx: Context[FlowerServerState]):
    return answer(
        ctx,
        command,
        False,
        f"{command.TYPE} does not apply to a Flower app: its ServerApp decides the rounds and the nodes it asks "
        "(set them in flower_config, e.g. num-server-rounds)",
    )


@OPERATOR.on(ShutdownClients)
def shutdown_clients(command: ShutdownClients, ctx: Context[FlowerServerState]):
    ids = command.client_ids or sorted(ctx.state.grid.nodes.values(), key=client_id_order)
    return answer(ctx, command, True, f"Exit sent to {len(ids)} node(s)") + [
        to_client(cid, Exit(reason=f"shut down by {command.sender or 'an operator'}")) for cid in ids
    ]
