"""The server's state and what every server workflow does with it, apart from any table.

A coordinator's state (:class:`ServerState`: the federation it knows, the model version,
the open round, the run's end) and its operations: learn and check clients, start and
close a synchronous round, store a version, record a drop, finish the run. The handler
sets import these (``lifecycle``, ``server``, ``async_server``, ``cyclic``, ``swarm``,
``admin``, ``cross_site``); this module imports none of them, so no set depends on
another set's table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brokerfl.app import App, load_app
from brokerfl.app.round_config import round_settings
from brokerfl.config import RunConfig
from brokerfl.handlers.strategies.aggregate import BadUpdate, Tensors, check_update
from brokerfl.handlers.strategies.base import Strategy, strategy_for_run
from brokerfl.handlers.workflows import evaluation
from brokerfl.handlers.workflows.scoring import (
    ScoreStored,
    Unscored,
    evaluate_safely,
    score_stored,
)
from brokerfl.runtime.handler_table import Context, Outbound, Rejected, to_clients
from brokerfl.runtime.operator_commands import AdminState
from brokerfl.runtime.threads import process_thread
from brokerfl.runtime.timing import timings
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.model_refs import task_model_fields
from brokerfl.storage.store import ModelStore, ModelVersion, parameters_hash
from brokerfl.transports.base import bounded
from brokerfl.transports.topology import AUDIT
from brokerfl.wire.app_metrics import combine
from brokerfl.wire.compression import CompressionError, decompress
from brokerfl.wire.message import (
    Exit,
    Message,
    ParameterUpdate,
    RunFinished,
    TrainFailed,
    TrainTask,
    UpdateDropped,
)

# After the run ends the server stays DRAIN_S past the last update it records as dropped
# (so a backlog is emptied, not cut at a fixed time), but no longer than MAX_DRAIN_S in all.
DRAIN_S = 1.0
MAX_DRAIN_S = 30.0


@dataclass(kw_only=True)
class RoundDeadline(Message):
    """Local timer message: round ``round`` is due to close."""

    LOCAL = True


@dataclass(kw_only=True)
class RoundComplete(Message):
    """Local timer message: every participant of round ``round`` answered; close it now.
    The round is closed from here rather than from the handler of its last update: the
    worker keeps that update's body (a model's worth) until its handler returns, and
    computing, encoding and storing the new version is the server's peak of memory."""

    LOCAL = True


@dataclass(kw_only=True)
class JoinDeadline(Message):
    """Local timer message: stop waiting for every client to join."""

    LOCAL = True


@dataclass(kw_only=True)
class DrainDone(Message):
    """Local timer message: the run is over and in-flight updates have been recorded."""

    LOCAL = True


@dataclass(kw_only=True)
class TooFewAble(Message):
    """Local timer message: fewer than ``min_clients`` clients can run the app, as the
    Leaves of clients whose app failed at their start say: finish, unless that changed."""

    LOCAL = True


@dataclass
class ClientRecord:
    # The partition size the client declared (its latest Join or Heartbeat saying one):
    # what its updates may claim at most (check_claimed_samples). 0: it declared none
    # (its messages said 0); None: not known to this process yet (an aggregator taking over).
    num_samples: int | None
    last_seen: float  # time.monotonic()
    instance: str = ""  # the process that claimed it last (Join/Heartbeat(s).instance; "": not said)
    previous: str = ""  # the process that claimed it before that one
    duplicate: tuple[str, str] | None = None  # two live processes claiming this id (first seen, second)
    duplicate_seen: float = 0.0  # when the two last took turns
    training_s: float | None = None  # as its last heartbeat said: seconds training on a task (None: not training)

    def training_for(self, now: float) -> float | None:
        """Seconds it has been training on its task by now (None: not training, as far as known)."""
        return None if self.training_s is None else self.training_s + (now - self.last_seen)


@dataclass
class TrainFailure:
    """A client's report that its app's ``train`` raised (TrainFailed)."""

    client_id: str
    round: int
    model_version: int
    task_id: str
    error: str  # bounded and printable


@dataclass
class ServerState:
    config: RunConfig
    strategy: Strategy
    store: ModelStore
    evaluate: Callable[[Any], dict[str, float]] | None  # on the server's test data; None: it has none
    metrics: MetricsLog
    app: App | None = None
    begin: Callable[[Context], list[Outbound] | None] = None  # type: ignore[assignment]
    on_round: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)  # e.g. a progress bar
    after_rounds: Callable[[Context, str], list[Outbound]] | None = (
        None  # what follows the last round (default: finish_run)
    )
    on_rounds_done: list[Callable[[Context], None]] = field(
        default_factory=list
    )  # run once the last round is stored, before after_rounds (e.g. the swarm's best model)
    clients: dict[str, ClientRecord] = field(default_factory=dict)
    model: ModelVersion | None = None
    begun: bool = False
    done: bool = False
    failure: str | None = None
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (update id, reason)
    dropped_logged: int = 0  # how many of ``dropped`` a round's summary line counted already
    recent_update_ids: list[set[str]] = field(default_factory=list)  # of the last few stored versions
    # synchronous rounds
    round: int = 0
    round_open: bool = False
    round_started: float = 0.0
    participants: list[str] = field(default_factory=list)
    folded: dict[str, str] = field(
        default_factory=dict
    )  # this round's folded update ids, in folding order -> their clients (for drop records)
    answered: set[str] = field(default_factory=set)
    client_seconds: list[float] = field(default_factory=list)  # training time each folded update reported
    timings_at_start: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    evaluation: evaluation.OpenEvaluation | None = None  # federated evaluation under way
    unscored: list[Unscored] = field(default_factory=list)  # stored versions not yet evaluated (oldest first)
    scores_in_store: bool = (
        False  # evaluate before storing, so the stored version holds its scores (swarm picks its best model from them)
    )
    admin: AdminState = field(default_factory=AdminState)  # what the operator changed (handlers/workflows/admin.py)
    instance: str = ""  # this server process (host:pid), for status
    standbys: dict[str, float] = field(
        default_factory=dict
    )  # standby servers' names -> when last announced (time.monotonic())
    drain_ends_by: float = 0.0  # time.monotonic() past which the drain after the run stops
    failed: set[str] = field(default_factory=set)  # clients whose training failed this round (answered, with no update)
    update_bytes: int = 0  # the folded updates' parameters' bytes, this round (the metrics line's)
    update_metrics: list[tuple[dict[str, float], int]] = field(
        default_factory=list
    )  # this round's folded updates' metrics and weights
    unable: dict[str, str] = field(
        default_factory=dict
    )  # clients whose app failed at their start (a Leave with an error) -> the error
    refused: set[str] = field(
        default_factory=set
    )  # participants whose update this round was refused (dead-lettered): answered, with nothing to fold
    train_failures: list[TrainFailure] = field(
        default_factory=list
    )  # the run's, newest last (the last MAX_FAILURES_KEPT)
    # the cross-site evaluation under way (handlers/workflows/cross_site.py's CrossSitePhase), if the run has one
    cross_site: Any = None
    session: str = ""  # the open round's TrainTask id: a multi-stage round's messages name it
    secure: Any = None  # the open secure round's stages (handlers/workflows/secure_server.py)

    def held_updates(self) -> int:
        """Updates folded and held unacked, in no stored version yet."""
        return len(self.folded) if self.round_open else 0  # a closed round's are acked


def make_state(config: RunConfig, store: ModelStore, metrics: MetricsLog) -> ServerState:
    app = load_app(config)
    app.check_model()  # a model() the runtime cannot use stops the server at its start
    strategy = strategy_for_run(config)
    round_settings(config, 1, strategy=strategy, app=app)  # a broken configure_train is named before the run starts
    evaluate_on_test = app.evaluator(app.load_server_test(config.seed))
    return ServerState(config, strategy, store, evaluate_on_test, metrics, app, begin=start_round)


def see_client(
    state: ServerState,
    client_id: str,
    num_samples: int | None,
    instance: str = "",
    log: Any = None,
    training_s: float | None = None,
) -> bool:
    """Record that a client is alive (and whether it is training: ``training_s``, as its
    heartbeat says); True the first time it is seen. ``num_samples``: the partition size
    it declares (0 or None says nothing: a known declaration stays). ``instance``: the
    process that says so. A client process restarted gets a new instance and keeps it; two
    processes running with the same id take turns, and that is flagged (warned on ``log``
    once per pair, and shown by ``brokerfl status`` while it goes on)."""
    now = time.monotonic()
    record = state.clients.get(client_id)
    if record is None:
        state.clients[client_id] = ClientRecord(num_samples, now, instance, training_s=training_s)
        state.unable.pop(client_id, None)  # back, restarted: its app runs now
        return True
    if num_samples:
        # The latest declaration is the bound, a rise included: it is the client's own word
        # either way (refusing a rise would stop only a client whose data grew across a
        # restart; a client that means to lie can declare a large partition at its first Join).
        # A rise is logged, and `status` shows each client's declaration, so a client that
        # inflates its weight is seen; strategies that must not trust the count ignore it.
        if record.num_samples and num_samples > record.num_samples and log is not None:
            log.warning(
                "a client declares more samples than before",
                client=client_id,
                before=record.num_samples,
                now=num_samples,
            )
        record.num_samples = num_samples
    if instance and instance != record.instance:
        if instance == record.previous and now - record.last_seen <= state.config.liveness.timeout_s:
            pair = (instance, record.instance)
            if record.duplicate is None or set(record.duplicate) != set(pair):
                record.duplicate = pair
                if log is not None:
                    log.warning(
                        "two processes claim one client id", client=client_id, instances=[bounded(i, 200) for i in pair]
                    )
            record.duplicate_seen = now
        if record.instance:
            record.previous = record.instance
        record.instance = instance
    record.last_seen, record.training_s = now, training_s
    return False


def duplicate_instances(state: ServerState, client_id: str) -> list[str] | None:
    """The two processes claiming ``client_id`` if they still take turns (within the
    liveness timeout), else None."""
    record = state.clients.get(client_id)
    if (
        record is None
        or record.duplicate is None
        or time.monotonic() - record.duplicate_seen > state.config.liveness.timeout_s
    ):
        return None
    return list(record.duplicate)


def outside_federation(state: ServerState, client_id: str) -> str | None:
    """Why ``client_id`` is no member of this run's federation (its ids are the config's
    ``client_ids()``), or None if it is one."""
    config = state.config
    if config.has_client(client_id):
        return None
    return f"client {client_id} is not in the federation of run {config.run} (client ids {config.client_ids_text()})"


def refuse_outsider(state: ServerState, client_id: str, what: str) -> None:
    """Rejected (dead-lettered with the reason) if ``client_id`` is not in the federation."""
    why = outside_federation(state, client_id)
    if why is not None:
        raise Rejected(f"{what}: {why}")


def refresh_client(state: ServerState, client_id: str) -> None:
    """An answer (an update, a failure) is a sign of life too, and the end of its training;
    it refreshes a known client, but makes no unknown id a member of the federation."""
    record = state.clients.get(client_id)
    if record is not None:
        record.last_seen = time.monotonic()
        record.training_s = None


def live_clients(state: ServerState, at: float | None = None) -> list[str]:
    """The clients heard from within the liveness timeout before ``at`` (default: now)."""
    horizon = (time.monotonic() if at is None else at) - state.config.liveness.timeout_s
    return sorted(
        cid for cid, record in state.clients.items() if record.last_seen >= horizon and cid not in state.admin.removed
    )


def awaited_clients(state: ServerState) -> list[str]:
    """The federation's clients not live yet (the operator's removed ones are not awaited)."""
    live = set(live_clients(state))
    return [
        cid
        for cid in state.config.client_ids()
        if cid not in live and cid not in state.admin.removed and cid not in state.unable
    ]


def able_clients(state: ServerState) -> int:
    """The federation's clients that may still take part: not removed by the operator, and
    not out because their app failed at their start."""
    return state.config.clients - len(state.admin.removed | set(state.unable))


def shown_ids(ids: list[str], limit: int = 20) -> str:
    """Client ids for a log line: the first ``limit`` and how many more."""
    return ",".join(ids[:limit]) + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def maybe_begin(ctx: Context[ServerState]):
    state: ServerState = ctx.state
    if state.begun or state.done or len(live_clients(state)) < able_clients(state) or awaited_clients(state):
        return None
    ctx.cancel_timer("join")
    state.begun = True
    return state.begin(ctx)


def check_num_samples(num_samples: int, state: ServerState, what: str) -> None:
    """Refuse a declared sample count that is negative or would outweigh everyone else
    (``strategy.max_num_samples``, the outer cap on what a Join or Heartbeat may declare).
    Client ids are checked before any handler runs (:func:`brokerfl.wire.message.from_wire`)."""
    limit = state.config.strategy.max_num_samples
    if num_samples < 0:
        raise BadUpdate(f"{what} claims {num_samples} samples")
    if num_samples > limit:
        raise BadUpdate(f"{what} claims {num_samples} samples, more than strategy.max_num_samples ({limit})")


def check_claimed_samples(update: ParameterUpdate, state: ServerState) -> None:
    """Refuse an update claiming more samples (its weight in FedAvg) than its client
    declared for its partition (Join, Heartbeat: ``ClientRecord.num_samples``).

    A process that has no declaration of the client yet (a restarted asynchronous server
    folding its predecessor's updates before the client's next heartbeat, a swarm
    aggregator taking over) bounds the claim by ``strategy.max_num_samples`` alone until
    the client's next Heartbeat (every ``liveness.heartbeat_s``) or Join: refusing it would
    throw away work the previous process asked for. The synchronous server samples only
    live clients, which it has heard from: it always has their declaration."""
    claimed = update.num_samples
    if claimed < 1:
        raise BadUpdate(f"num_samples must be positive, got {claimed}")
    check_num_samples(claimed, state, "the update")
    record = state.clients.get(update.client_id)
    declared = None if record is None else record.num_samples
    if declared is not None and claimed > declared:
        said = (
            f"the {declared} it declared for its partition (Join/Heartbeat)"
            if declared
            else "the 0 it declared (its Join and Heartbeats gave no partition size)"
        )
        raise BadUpdate(f"the update claims {claimed} samples, more than {said}")


def check_parameters(parameters: Tensors, state: ServerState) -> None:
    """:func:`check_update` against the current global model with the run's bounds
    (``strategy.max_update_ratio``, ``strategy.max_num_samples``): every path that folds an
    update (synchronous, asynchronous, cyclic, swarm) checks it with this."""
    strategy = state.config.strategy
    check_update(
        parameters,
        state.model.parameters,
        max_distance_ratio=strategy.max_update_ratio,
        max_weight=strategy.max_num_samples,
    )


def drop(ctx: Context[ServerState], update: ParameterUpdate, reason: str) -> list[Outbound]:
    """Ack an update without folding it: its record goes out (confirmed) before the ack."""
    if ctx.state.done:
        extend_drain(ctx)
    return record_drop(
        ctx, update.message_id, update.client_id, reason, round_=update.round, model_version=update.model_version
    )


def record_drop(
    ctx: Context[ServerState], update_id: str, client_id: str, reason: str, *, round_: int, model_version: int
) -> list[Outbound]:
    """The UpdateDropped record of an update acked without being in a model version."""
    state: ServerState = ctx.state
    state.dropped.append((update_id, reason))
    ctx.log.info("update dropped", client=client_id, update=update_id, reason=reason)
    if not state.config.journal:
        return []  # nothing would keep the record
    return [
        Outbound(
            AUDIT,
            UpdateDropped(
                update_id=update_id, client_id=client_id, reason=reason, round=round_, model_version=model_version
            ),
        )
    ]


def already_folded(state: ServerState, update_id: str) -> bool:
    return any(update_id in ids for ids in state.recent_update_ids)


def store_version(
    ctx: Context[ServerState],
    parameters: dict[str, np.ndarray],
    update_ids: list[str],
    *,
    round_: int,
    started: float,
    client_seconds: list[float],
    client_metrics: list[tuple[dict[str, float], int]] = (),
    update_bytes: int = 0,
) -> ModelVersion:
    """Store a new global model version, then ack the updates it holds (commit). Its
    evaluation, journal record and metrics line follow once the messages this handler
    returns (the next round's task) are out: see :func:`score_stored`. ``client_metrics``:
    the folded updates' ``train_`` metrics and sample counts, combined into the line's
    ``metrics`` (brokerfl.wire.app_metrics). The line's ``model_bytes`` is what a task's
    model weighs (what travels: a model that exchanges an adapter only, the adapter's
    bytes); ``update_bytes`` the folded updates' parameters, as they travelled (compressed
    or not)."""
    state: ServerState = ctx.state
    score_stored(ctx)  # an earlier version still waiting is scored (and recorded) first
    parent = state.model
    model = ModelVersion(
        parent.version + 1,
        round_,
        parent.version,
        state.strategy.name,
        list(update_ids),
        parameters,
        sha256=_hash_beside_prepare(state.store, parameters),
        created=time.time(),
    )
    strategy_metrics = state.strategy.round_metrics()  # e.g. the privacy spent so far
    scores = None
    evaluation_error = None
    if state.scores_in_store and state.evaluate is not None:  # on the critical path, by request
        with timings.phase("evaluate"):
            scores, evaluation_error = evaluate_safely(ctx, state.evaluate, parameters, version=parent.version + 1)
    model.metrics = {
        "accuracy": None,
        "loss": None,
        **(scores or {}),
        **strategy_metrics,
    }  # else scores follow (score_stored)
    model.strategy_state = state.strategy.state_arrays()  # stored with the version, atomically
    with timings.phase("store"):
        state.store.put(model)
    state.model = model
    state.recent_update_ids = [*state.recent_update_ids[-4:], set(model.update_ids)]
    ctx.commit()
    record = {
        "round": round_,
        "model_version": model.version,
        "accuracy": None,  # without server test data: see federated evaluation
        "loss": None,
        "num_updates": len(model.update_ids),
        "duration_s": round(time.monotonic() - started, 4),
        "sha256": model.sha256,
        # where the time went, in the server process; clients' training time beside it
        "server_s": {
            k: v for k, v in timings.since(state.timings_at_start).items() if v > 0 and not k.startswith("handle.")
        },
        "client_train_s": round(float(np.mean(client_seconds)), 4) if client_seconds else 0.0,
        "model_bytes": parameters_bytes(parameters),
        "update_bytes": update_bytes,
        **strategy_metrics,
        "metrics": combine(
            list(client_metrics), getattr(state.app, "reducers", None)
        ),  # the app's: train_*, then its evaluation's
    }
    if evaluation_error is not None:
        record["evaluation_error"] = evaluation_error
    state.timings_at_start = timings.snapshot()
    summary = {"sampled": len(state.participants), "dropped": max(0, len(state.dropped) - state.dropped_logged)}
    state.dropped_logged = len(state.dropped)
    state.unscored.append(Unscored(model, parameters, record, scores, summary=summary))
    if state.evaluate is None or scores is not None:
        score_stored(ctx)  # nothing to evaluate: record it now
    else:
        ctx.set_timer("score", 0.0, ScoreStored())
    return model


def parameters_bytes(parameters: Mapping[str, np.ndarray]) -> int:
    """The bytes of the arrays (what they weigh on the wire, give or take the names)."""
    return sum(np.asarray(value).nbytes for value in parameters.values())


def _hash_beside_prepare(store: ModelStore, parameters: dict[str, np.ndarray]) -> str:
    """The new version's sha256, computed on a thread (hashlib releases the GIL) while this
    one does the store's round trip to the broker that needs no hash (``prepare``: the
    models stream's mark), instead of one after the other on the round's critical path."""
    prepare = getattr(store, "prepare", None)
    if prepare is None:
        return parameters_hash(parameters)
    hashing = process_thread("hash").submit(parameters_hash, parameters)
    try:
        prepare()
    finally:
        sha256 = hashing.result()
    return sha256


def finish_run(ctx: Context[ServerState], reason: str, *, failed: bool = False) -> list[Outbound]:
    """Tell the clients to exit; record updates still arriving as dropped for a moment, then stop."""
    state: ServerState = ctx.state
    score_stored(ctx)  # the last version's score is part of the run
    state.done = True
    state.round_open = False
    state.failure = reason if failed else None
    ctx.cancel_timer("join")
    ctx.cancel_timer("round")
    (ctx.log.error if failed else ctx.log.info)("run finished", reason=reason)
    state.drain_ends_by = time.monotonic() + MAX_DRAIN_S
    ctx.set_timer("drain", DRAIN_S, DrainDone())
    out = [to_clients(Exit(reason=reason, round=state.round, model_version=state.model.version))]
    if state.config.journal:  # where the run ended, for accounting (an update after it has no taker)
        out.append(
            Outbound(
                AUDIT, RunFinished(reason=reason, failed=failed, round=state.round, model_version=state.model.version)
            )
        )
    return out


def extend_drain(ctx: Context[ServerState]) -> None:
    """Something still arrives after the run ended: stay DRAIN_S more (within MAX_DRAIN_S)."""
    remaining = ctx.state.drain_ends_by - time.monotonic()
    if remaining > 0:
        ctx.set_timer("drain", min(DRAIN_S, remaining), DrainDone())


def start_round(ctx: Context[ServerState], *, retry: bool = False, live_at: float | None = None):
    """The next round (or the same one again): sample the clients live at ``live_at``
    (default: now) and send the task."""
    state: ServerState = ctx.state
    config = state.config
    if state.admin.paused:  # the operator's resume starts it (handlers/workflows/admin.py)
        state.admin.held_start = "retry" if retry else "next"
        ctx.log.info("paused: no new round starts", round=state.round)
        return None
    if not retry:
        stop = state.strategy.stop_reason()  # e.g. a privacy budget another round would exceed
        if stop is not None:
            return finish_run(ctx, stop)
        state.round += 1
        state.retries = 0
    rng = np.random.default_rng([config.seed, state.round, state.retries])
    state.participants = state.strategy.sample(state.round, live_clients(state, live_at), rng)
    state.strategy.start_round(state.model.parameters)
    state.folded, state.answered, state.client_seconds = {}, set(), []
    state.failed, state.refused, state.update_metrics, state.update_bytes = set(), set(), [], 0
    state.round_open, state.round_started = True, time.monotonic()
    ctx.set_timer("round", config.strategy.round_deadline_s, RoundDeadline(round=state.round))
    if not state.participants:
        ctx.log.warning("no live clients to sample: the round waits for its deadline", round=state.round)
        return None
    ctx.log.info(
        f"round {state.round} started",
        round=state.round,
        model_version=state.model.version,
        sampled=shown_ids(state.participants, WAITING_IDS_SHOWN),
        participants=len(state.participants),
        deadline_s=config.strategy.round_deadline_s,
        **({"retry": state.retries} if retry else {}),
    )
    ctx.set_timer("waiting", waiting_log_s(config.strategy.round_deadline_s), RoundWaiting(round=state.round))
    task = TrainTask(
        round=state.round,
        model_version=state.model.version,
        **task_model_fields(state.config, state.store, state.model),
        participants=state.participants,
        **round_fields(state, state.round),
        deadline=ctx.wall() + config.strategy.round_deadline_s,
    )
    state.session = task.message_id
    return [to_clients(task)]


def round_fields(state: ServerState, round_: int) -> dict[str, Any]:
    """A TrainTask's ``config`` and ``round_config`` for ``round_`` (brokerfl.app.round_config),
    and the fingerprint of the app's base (what does not travel)."""
    settings, round_config = round_settings(state.config, round_, strategy=state.strategy, app=state.app)
    base = state.app.base_fingerprint() if state.app is not None else ""
    return {"config": settings, "round_config": round_config, "base_fingerprint": base}


def app_train_metrics(update: ParameterUpdate) -> dict[str, float]:
    """The app's training metrics an update carries (``train_*``), without the runtime's
    own measure of the training's seconds."""
    return {k: v for k, v in update.metrics.items() if k != "train_s"}


WAITING_LOG_S = 10.0  # at most this long between two lines of an open round naming whom it waits for
WAITING_IDS_SHOWN = 10  # client ids a log line names (then "and K more")


@dataclass(kw_only=True)
class RoundWaiting(Message):
    """Local timer message: say whom the open round still waits for."""

    LOCAL = True


def waiting_log_s(deadline_s: float) -> float:
    """How often an open round's "waiting for" line comes: every WAITING_LOG_S, or at the
    half-deadline if that is sooner."""
    return max(0.5, min(WAITING_LOG_S, deadline_s / 2)) if math.isfinite(deadline_s) else WAITING_LOG_S


def log_waiting(message: RoundWaiting, ctx: Context[ServerState]) -> None:
    """While a round is open: whom it waits for (sampled, no answer yet) and the time left."""
    state: ServerState = ctx.state
    if not state.round_open or message.round != state.round or state.done:
        return
    missing = sorted(set(state.participants) - state.answered - state.failed - state.refused)
    if not missing:
        return
    deadline_s = state.config.strategy.round_deadline_s
    left = deadline_s - (time.monotonic() - state.round_started)
    ctx.log.info(
        f"round {state.round}: waiting for {len(missing)} of {len(state.participants)}",
        round=state.round,
        waiting_for=shown_ids(missing, WAITING_IDS_SHOWN),
        answered=len(state.answered),
        deadline_in_s=round(left, 1) if math.isfinite(left) else None,
    )
    ctx.set_timer("waiting", waiting_log_s(deadline_s), RoundWaiting(round=state.round))


def close_when_every_participant_answered(ctx: Context[ServerState]) -> None:
    """Close the open round at once (replacing its deadline) if every participant has
    answered, with an update or a failed training."""
    state: ServerState = ctx.state
    if state.participants and state.answered | state.failed | state.refused >= set(state.participants):
        ctx.set_timer("round", 0.0, RoundComplete(round=state.round))


MAX_FAILURES_KEPT = 100  # in the server's state (status shows them); the journal keeps every one


def note_failure(message: TrainFailed, ctx: Context[ServerState]) -> TrainFailure:
    """Log and keep a client's report that its training failed (every server handler set)."""
    state: ServerState = ctx.state
    refresh_client(state, message.client_id)
    failure = TrainFailure(
        message.client_id,
        message.round,
        message.model_version,
        bounded(message.task_id, 64),
        bounded(message.error, 300),
    )
    state.train_failures = [*state.train_failures[-(MAX_FAILURES_KEPT - 1) :], failure]
    ctx.log.error(
        "client training failed",
        app=state.config.app,
        function="train()",
        client=failure.client_id,
        round=failure.round,
        model_version=failure.model_version,
        error=failure.error,
    )
    return failure


def decompressed(update: ParameterUpdate, model: dict[str, np.ndarray], config: RunConfig) -> dict[str, np.ndarray]:
    """A compressed update's parameters (brokerfl.wire.compression), against the model it was
    trained on; replay calls this too, so it folds exactly what the server folded."""
    if update.compression != config.compression.method:
        raise BadUpdate(f"update compressed with {update.compression!r}, the run uses {config.compression.method!r}")
    try:
        return decompress(update.parameters, model, update.compression, max_fraction=config.compression.fraction)
    except CompressionError as exc:
        raise BadUpdate(f"compressed update: {exc}") from None


def too_few_answers(ctx: Context[ServerState], why: str, *, missing: list[str] = ()):
    """The round cannot close (fewer than ``min_clients`` updates folded): retry it, or
    finish the run as failed."""
    state: ServerState = ctx.state
    folded = state.strategy.folded()
    ctx.log.warning(
        f"{why}: too few answers",
        folded=folded,
        needed=state.config.strategy.min_clients,
        missing=list(missing),
        failed=sorted(state.failed),
        live=len(live_clients(state)),
    )
    # The folded updates are dropped: their records go out before the commit acks them.
    reason = f"round {state.round} had too few answers and was abandoned"
    records = [
        out
        for uid, client in state.folded.items()
        for out in record_drop(ctx, uid, client, reason, round_=state.round, model_version=state.model.version)
    ]
    ctx.commit()
    state.round_open = False
    if state.config.strategy.on_too_few == "retry" and state.retries < state.config.strategy.max_retries:
        state.retries += 1
        return records + (start_round(ctx, retry=True) or [])
    return records + finish_run(
        ctx,
        f"round {state.round} got {folded} of the {state.config.strategy.min_clients} updates it needs ({why})",
        failed=True,
    )


def close_round(ctx: Context[ServerState]):
    """Store the new model version, then ack the round's updates; then the next round."""
    state: ServerState = ctx.state
    # Who is live is judged as of now, before the store: heartbeats wait in the queue while
    # this loop stores the version (seconds for a model of hundreds of MB), and a client whose
    # heartbeat the server has not read yet is not a silent one.
    live_at = time.monotonic()
    with timings.phase("fold"):
        parameters = state.strategy.finish_round(state.model.parameters)
    model = store_version(
        ctx,
        parameters,
        list(state.folded),
        round_=state.round,
        started=state.round_started,
        client_seconds=state.client_seconds,
        client_metrics=state.update_metrics,
        update_bytes=state.update_bytes,
    )
    state.round_open = False
    ctx.cancel_timer("round")
    if state.round >= state.config.rounds:

        def done(ctx: Context[ServerState]) -> list[Outbound]:
            return rounds_done(ctx, f"{state.config.rounds} rounds done")

        return evaluation.request(ctx, model, live_clients(state, live_at), then=done) or done(ctx)
    return evaluation.request(ctx, model, live_clients(state, live_at)) + (start_round(ctx, live_at=live_at) or [])


def rounds_done(ctx: Context[ServerState], reason: str) -> list[Outbound]:
    """The last round is stored: finish, or first run what follows it (cross-site evaluation)."""
    state: ServerState = ctx.state
    for step in state.on_rounds_done:
        step(ctx)
    hook = state.after_rounds
    return hook(ctx, reason) if hook is not None else finish_run(ctx, reason)
