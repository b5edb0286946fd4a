"""The client's handler set: join, train when sampled, evaluate, stop on Exit.

The app's calls (``train``, ``evaluate``) run aside (:meth:`Context.run_aside`: on the
process's lane over RabbitMQ, inline in-process), so the I/O loop goes on meanwhile: AMQP
and liveness heartbeats (which say what the client is training, and for how long), acks,
Exit. A task is held unacked while it trains, and acked once its answer is confirmed: the
ParameterUpdate, or a TrainFailed when the app's ``train`` raised (the server then stops
waiting for this client), or nothing when the training is no longer wanted (its deadline
passed, Exit came, or a newer task: the newer one waits for the lane) and its result is
discarded. Cancelling is cooperative (:func:`brokerfl.app.cancellation_requested`).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brokerfl.app import App, AppContext, AppError, Partition, TrainingCancelled, cancellable, count_samples, load_app
from brokerfl.config import RunConfig, TrainConfig
from brokerfl.handlers.strategies.base import prepare_update
from brokerfl.runtime.handler_table import Cancelled, Context, HandlerSet, LegacyTable, Outbound, Started, to_server
from brokerfl.transports.base import bounded
from brokerfl.wire.app_metrics import TRAIN_PREFIX
from brokerfl.wire.compression import compress
from brokerfl.wire.message import (
    EvaluateResult,
    EvaluateTask,
    Exit,
    Heartbeat,
    Heartbeats,
    Join,
    Leave,
    Message,
    ParameterUpdate,
    TrainFailed,
    TrainTask,
    process_instance,  # names this process in Join and Heartbeat(s)
)

table = LegacyTable("client")  # deprecated: what old-style extra_handlers modules register on (brokerfl.assembly.roles)

ERROR_CHARS = 300  # of a failed training's error, as TrainFailed reports it
# of the error of an app that failed at a client's start (its Leave): the AppError names the app,
# function and client first
UNABLE_ERROR_CHARS = 800
TRAIN = "train"  # the key of the training aside (and of its deadline's timer)


@dataclass
class Training:
    """The task this client is training on (aside)."""

    task: TrainTask
    accepted: float  # time.monotonic() when this client took it
    accepted_wall: float = 0.0  # and the Context's wall time then (a task's deadline is in that time)
    cancelled: str | None = None  # why it is no longer wanted (its result is discarded)

    @property
    def key(self) -> str:  # its held delivery's
        return task_key(self.task)


def task_key(task: Message) -> str:
    return f"task:{task.message_id}"


@dataclass
class ClientState:
    client_id: str
    config: RunConfig
    app: App
    data: Partition  # this client's partition: train data and maybe a local test split
    answered: set[str] = field(default_factory=set)  # task ids this process already answered
    newest_version: int = -1  # the newest model version a task has shown this process
    # the newest global model trained on, kept only where a handler reads it (Gradients, in
    # handlers/gradients.py, whose set's prepare sets keep_last_global): else it would hold a
    # superseded version alive per logical client
    last_global: dict[str, np.ndarray] | None = None
    keep_last_global: bool = False
    local_model: dict[str, np.ndarray] | None = None  # the last training's result, kept by cross-site evaluation's set
    residual: dict[str, np.ndarray] = field(default_factory=dict)  # what compression dropped so far (error feedback)
    residual_version: int = -1  # the model version the residual was last made against
    exit_reason: str | None = None
    beats_alone: bool = True  # False: its process sends one Heartbeats for all its clients (PROCESS_HANDLERS)
    training: Training | None = None  # the task training aside
    waiting: TrainTask | None = None  # a newer task, for when that training is over
    unable: AppError | None = (
        None  # the app failed at this client's start (load_partition, model): it reports and leaves
    )
    app_state: dict[str, Any] = field(default_factory=dict)  # the app's context.state: kept across rounds
    # what answers a finished training (None: a ParameterUpdate, _update); secure aggregation's
    # set answers with its first stage instead (handlers/workflows/secure_client.py)
    make_answer: Callable[[ClientState, TrainTask, dict[str, np.ndarray], dict[str, float], float], Message] | None = (
        None
    )
    secure: dict[str, Any] = field(default_factory=dict)  # secure aggregation's sessions, by task id (its secrets)

    def training_s(self) -> float | None:
        """Seconds since this client took the task it trains on; None: not training."""
        return None if self.training is None else round(time.monotonic() - self.training.accepted, 3)


CLIENT = HandlerSet("client", needs=(ClientState,))


def make_state(config: RunConfig, client_id: str) -> ClientState:
    """The client's partition of the app's data: partition ``int(client_id) % clients``.
    An app that fails here (its ``load_partition``, ``model``, the warm-up's training)
    makes a client that only reports it (:func:`report_unable`), so a process's other
    logical clients (and a simulation) go on without it."""
    app = load_app(config)
    try:
        data = app.load_partition(
            _partition_index(client_id, config.clients), config.clients, config.seed, client_id=client_id
        )
        app.check_model()
        state = ClientState(client_id, config, app, data, app_state=load_app_state(config, client_id))
        # torch's first call costs ~1 s, which would otherwise land in the first task (and be
        # multiplied by a client_slowdown)
        app.warm_up(data.train)
    except AppError as exc:
        state = ClientState(client_id, config, app, Partition(None), exit_reason="its app failed at start", unable=exc)
    return state


def app_state_file(config: RunConfig, client_id: str) -> Path | None:
    """Where ``client_state_dir`` keeps this client's ``context.state`` (None: not kept)."""
    if config.client_state_dir is None:
        return None
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in client_id)  # ids are checked; still a file name
    return Path(config.client_state_dir) / config.run / f"client-{safe}-{zlib.crc32(client_id.encode()):08x}.json"


def load_app_state(config: RunConfig, client_id: str) -> dict[str, Any]:
    """The client's ``context.state`` as its last training left it (``client_state_dir``),
    or empty."""
    path = app_state_file(config, client_id)
    if path is None or not path.exists():
        return {}
    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AppError(
            f"app {config.app!r}: client {client_id}'s saved context.state in {path} cannot be read: {exc}"
        ) from None
    if not isinstance(loaded, dict):
        raise AppError(f"app {config.app!r}: client {client_id}'s saved context.state in {path} is not a JSON object")
    return loaded


def save_app_state(config: RunConfig, client_id: str, app_state: dict[str, Any]) -> None:
    """Write ``context.state`` (JSON) atomically beside the others, if ``client_state_dir`` is set."""
    path = app_state_file(config, client_id)
    if path is None:
        return
    try:
        text = json.dumps(app_state, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise AppError(
            f"app {config.app!r}: context.state must hold JSON values to be kept in client_state_dir: {exc}"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def num_samples(state: ClientState) -> int:
    return count_samples(state.data.train)


def _partition_index(client_id: str, clients: int) -> int:
    # numeric ids map to their partition; other ids hash to one, stably across processes
    return (int(client_id) if client_id.isdigit() else zlib.crc32(client_id.encode())) % clients


def training_seed(seed: int, client_id: str, round_: int) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(client_id.encode()), round_]).generate_state(1)[0])


@dataclass(kw_only=True)
class HeartbeatDue(Message):
    """Local timer message: time to tell the server this client is alive."""

    LOCAL = True


@dataclass(kw_only=True)
class Trained(Message):
    """Local: the training aside is over (``error``: what it raised instead)."""

    LOCAL = True
    task_id: str
    result: Any = None  # (parameters, metrics, seconds)
    error: BaseException | None = None


@dataclass(kw_only=True)
class TrainingOverdue(Message):
    """Local timer message: the deadline of the task in training passed."""

    LOCAL = True
    task_id: str


@dataclass(kw_only=True)
class Evaluated(Message):
    """Local: an evaluation aside is over."""

    LOCAL = True
    task: EvaluateTask
    scores: dict[str, float] | None = None
    error: BaseException | None = None


def liveness_on(config: RunConfig) -> bool:
    """Does the server judge liveness by heartbeats? (``simulate`` turns it off: an infinite
    timeout, under which heartbeats would be messages nobody needs.)"""
    return math.isfinite(config.liveness.timeout_s)


@CLIENT.on(Started)
def join(message: Started, ctx: Context):
    state: ClientState = ctx.state
    if state.unable is not None:
        return report_unable(ctx)
    if state.beats_alone and liveness_on(state.config):
        ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    ctx.log.info("joined: Join sent to the server", num_samples=num_samples(state))
    return [to_server(Join(client_id=state.client_id, num_samples=num_samples(state), instance=process_instance()))]


def report_unable(
    ctx: Context, reason: str = "its app failed at start", event: str = "the app failed at this client's start"
) -> list[Outbound]:
    """The app cannot run for this client: say so to the server (a Leave with the error:
    it stops waiting for this client and names it) and stop this client only."""
    state: ClientState = ctx.state
    error = bounded(
        str(state.unable), UNABLE_ERROR_CHARS
    )  # the AppError's own text: it names the app, the function and the client
    # with its traceback: this log is the app developer's (the server gets the one line)
    ctx.log.error(
        f"{event}: reporting it to the server and leaving",
        error=bounded(str(state.unable), 500),
        exc_info=state.unable,
    )
    ctx.stop()
    return [to_server(Leave(client_id=state.client_id, reason=reason, error=error))]


def other_base(ctx: Context, task: TrainTask | EvaluateTask) -> list[Outbound] | None:
    """A task from a server whose base (what does not travel, brokerfl.app's ``exchanged``)
    is not this client's: the received entries would be trained on another model. The
    client cannot take part: it says so and leaves (None: the bases agree)."""
    state: ClientState = ctx.state
    mine = state.app.base_fingerprint()
    if task.base_fingerprint == mine:
        return None
    theirs = bounded(task.base_fingerprint, 32) or "none: the whole model travels"
    state.unable = AppError(
        f"app {state.config.app!r}: client {state.client_id}'s base (what does not travel) differs from the "
        f"server's (fingerprint {mine or 'none: the whole model travels'} here, {theirs} at the server): model(), "
        "its app_options, exchanged() and any file model() loads must be the same on every side"
    )
    return report_unable(
        ctx, "its base model differs from the server's", "this client's base differs from the server's"
    )


@CLIENT.on(HeartbeatDue)
def beat(message: HeartbeatDue, ctx: Context):
    state: ClientState = ctx.state
    ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    return [
        to_server(
            Heartbeat(
                client_id=state.client_id,
                num_samples=num_samples(state),
                instance=process_instance(),
                training_s=state.training_s(),
            )
        )
    ]


@CLIENT.on(TrainTask)
def train(task: TrainTask, ctx: Context):
    state: ClientState = ctx.state
    superseded = task.model_version < state.newest_version
    state.newest_version = max(state.newest_version, task.model_version)
    if state.client_id not in task.participants:
        ctx.log.info(f"round {task.round}: not sampled", model_version=task.model_version)
        return None
    ctx.log.info(f"round {task.round}: task received", model_version=task.model_version, task=task.message_id)
    if (unable := other_base(ctx, task)) is not None:
        return unable
    # Tasks wait in the durable queue while a client is away; on its return, answering old
    # ones would only make updates the server drops.
    if task.message_id in state.answered:
        ctx.log.info("task already answered; skipped", task=task.message_id)
        return None
    if superseded:
        ctx.log.info(
            "task for a superseded model version; skipped",
            task=task.message_id,
            model_version=task.model_version,
            newest=state.newest_version,
        )
        return None
    busy = state.training
    if busy is not None and busy.task.message_id == task.message_id:
        # a copy the broker redelivered (the connection was lost): held with the one in
        # training, and acked with it (the lost connection's delivery cannot be any more)
        ctx.hold(busy.key)
        return None
    if task.deadline and ctx.wall() > task.deadline:
        ctx.log.info(
            "task past its deadline; skipped",
            task=task.message_id,
            round=task.round,
            late_s=round(ctx.wall() - task.deadline, 1),
        )
        return None
    if busy is not None:  # the newer task waits for the lane; the training is not wanted any more
        cancel_training(ctx, state, f"a newer task came (round {task.round}, model version {task.model_version})")
        if state.waiting is not None:
            ctx.log.info("waiting task superseded by a newer one; skipped", task=state.waiting.message_id)
            ctx.commit(task_key(state.waiting))
        state.waiting = task
        ctx.hold(task_key(task))
        return None
    return start_training(ctx, task)


def start_training(ctx: Context, task: TrainTask) -> None:
    """Hold the task and train on it aside; :func:`answer_task` takes the outcome."""
    state: ClientState = ctx.state
    settings = TrainConfig.model_validate(task.config) if task.config else state.config.train
    seed = training_seed(state.config.seed, state.client_id, task.round)
    slowdown = state.config.client_slowdown.get(state.client_id, 1.0)
    app, data = state.app, state.data.train
    context = AppContext(
        round=task.round,
        client_id=state.client_id,
        model_version=task.model_version,
        config=dict(task.round_config),
        state=state.app_state,
    )

    def work(cancelled: threading.Event) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
        started = time.perf_counter()
        with cancellable(cancelled):
            parameters, metrics = app.train(task.parameters, data, settings, seed, context)
        save_app_state(state.config, state.client_id, state.app_state)  # aside: a file write
        if slowdown > 1.0:  # a straggler, for benchmarks: as if its hardware were this much slower
            cancelled.wait((slowdown - 1.0) * (time.perf_counter() - started))
        return parameters, metrics, time.perf_counter() - started

    ctx.hold(task_key(task))
    state.training = Training(task, time.monotonic(), ctx.wall())
    if task.deadline:
        ctx.set_timer(
            TRAIN, max(0.0, task.deadline - ctx.wall()), TrainingOverdue(task_id=task.message_id, round=task.round)
        )
    ctx.log.info(f"round {task.round}: training", model_version=task.model_version, slowdown=slowdown)
    ctx.run_aside(
        TRAIN,
        work,
        lambda result, error: Trained(task_id=task.message_id, round=task.round, result=result, error=error),
    )
    return None


def cancel_training(ctx: Context, state: ClientState, why: str) -> None:
    training = state.training
    if training is None or training.cancelled is not None:
        return
    training.cancelled = why
    ctx.cancel_aside(TRAIN)
    ctx.log.info(
        "training no longer wanted: cancelling it", task=training.task.message_id, round=training.task.round, reason=why
    )


@CLIENT.on(TrainingOverdue)
def give_up_overdue(message: TrainingOverdue, ctx: Context):
    state: ClientState = ctx.state
    if state.training is not None and state.training.task.message_id == message.task_id:
        cancel_training(ctx, state, "its deadline passed")


@CLIENT.on(Trained)
def answer_task(message: Trained, ctx: Context):
    """The training is over: answer its task (an update, or the failure), or discard the
    result of a training no longer wanted; ack the task once that is confirmed; then the
    task waiting, if one is."""
    state: ClientState = ctx.state
    training = state.training
    if training is None or training.task.message_id != message.task_id:  # pragma: no cover - one training at a time
        return None
    state.training = None
    task = training.task
    ctx.cancel_timer(TRAIN)
    ctx.commit(training.key)
    out = []
    if training.cancelled is None and message.error is None and (late_s := _late_by(training, message.result[2])) > 0:
        # A training that outlived its task's deadline, whose timer could not fire first:
        # in `simulate`, training runs inline and its time is not the federation's
        # (brokerfl.transports.local.InlineWorkClock), so it is judged by its own duration.
        training.cancelled = f"its deadline passed (late by {late_s:.1f} s)"
    if training.cancelled is not None:
        ctx.log.info(
            "training result discarded",
            task=task.message_id,
            round=task.round,
            reason=training.cancelled,
            stopped_early=isinstance(message.error, (TrainingCancelled, Cancelled)),
        )
    elif message.error is not None:
        error = failure_text(message.error)
        # with its traceback: this log is the app developer's (the server gets the one line)
        ctx.log.error(
            "training failed: reporting it to the server",
            task=task.message_id,
            round=task.round,
            error=error,
            exc_info=message.error,
        )
        ctx.once_sent(lambda: state.answered.add(task.message_id))
        out = [to_server(task.reply(TrainFailed, client_id=state.client_id, task_id=task.message_id, error=error))]
    else:
        answer = (state.make_answer or _update)(state, task, *message.result)
        out = [to_server(answer)]
        # Answered once the update is confirmed: if publishing it fails, the task is requeued
        # and must be trained again, not skipped as answered.
        ctx.once_sent(lambda: state.answered.add(task.message_id))
        # its line, once it is out; the effect holds neither the update nor the context (a
        # cycle through ctx would keep the update's arrays alive until the next collection)
        log, event = ctx.log, f"round {task.round}: update sent"
        sent = {"kind": answer.TYPE, **_sent_line(answer, message.result[1], message.result[2])}
        ctx.once_sent(lambda: log.info(event, **sent))
    waiting, state.waiting = state.waiting, None
    if waiting is not None:
        if waiting.deadline and ctx.wall() > waiting.deadline:
            ctx.log.info(
                "task past its deadline; skipped",
                task=waiting.message_id,
                round=waiting.round,
                late_s=round(ctx.wall() - waiting.deadline, 1),
            )
            ctx.commit(task_key(waiting))
        else:
            start_training(ctx, waiting)
    return out


SHOWN_TRAIN_METRICS = 4  # of an update's train metrics, in its log line


def _sent_line(answer: Message, metrics: dict[str, float], seconds: float) -> dict[str, Any]:
    """What the "update sent" line says: its bytes, the training's seconds, a few metrics."""
    parameters = getattr(answer, "parameters", None) or {}
    shown = {
        f"train_{name}": round(float(value), 4)
        for name, value in list(metrics.items())[: SHOWN_TRAIN_METRICS + 1]
        if name != "num_samples" and isinstance(value, int | float)
    }
    return {
        "bytes": sum(int(getattr(value, "nbytes", 0)) for value in parameters.values()),
        "train_s": round(seconds, 2),
        **dict(list(shown.items())[:SHOWN_TRAIN_METRICS]),
    }


def _late_by(training: Training, seconds: float) -> float:
    """Seconds by which a training of ``seconds`` finished past its task's deadline (<= 0:
    in time), counted from when this client took the task."""
    deadline = training.task.deadline
    return training.accepted_wall + seconds - deadline if deadline else 0.0


def failure_text(error: BaseException) -> str:
    """What TrainFailed says of an exception: its type and message, bounded and printable
    (the server shows it in its log and in ``brokerfl status``)."""
    if isinstance(error, AppError) and error.__cause__ is not None:  # the app's own exception, not the wrapper's
        error = error.__cause__
    return bounded(f"{type(error).__name__}: {error}", ERROR_CHARS)


def _update(
    state: ClientState, task: TrainTask, parameters: dict[str, np.ndarray], metrics: dict[str, float], seconds: float
) -> ParameterUpdate:
    parameters = prepare_update(
        state.config, state.client_id, task.round, task.parameters, parameters
    )  # e.g. local DP's clip and noise
    method = state.config.compression.method
    if method != "none":
        parameters = _compressed(state, task, parameters)
    if state.keep_last_global:
        state.last_global = task.parameters
    return task.reply(
        ParameterUpdate,
        client_id=state.client_id,
        task_id=task.message_id,
        parameters=parameters,
        num_samples=int(metrics["num_samples"]),
        metrics=update_metrics(metrics, seconds),
        compression="" if method == "none" else method,
    )


def update_metrics(metrics: dict[str, float], seconds: float) -> dict[str, float]:
    """An update's metrics: every one ``train`` returned (numbers, checked by the app layer)
    with the ``train_`` prefix, and ``train_s``, the training's seconds."""
    out = {
        f"{TRAIN_PREFIX}{name}": float(value)
        for name, value in metrics.items()
        if name != "num_samples" and name != "s"
    }
    out.setdefault("train_loss", float("nan"))
    out["train_s"] = seconds
    return out


def _compressed(state: ClientState, task: TrainTask, parameters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The delta against the task's model, compressed (brokerfl.wire.compression), with error
    feedback. The residual carries over only to a newer model: a task for the version it was
    made against, or an older one (a round sent again, a server restarted from its store),
    starts afresh rather than add what may already have been folded."""
    settings = state.config.compression
    residual = state.residual if task.model_version > state.residual_version else {}
    state.residual = {}  # compress lets go of each earlier residual as it adds it: not two residuals at once
    wire, residual = compress(
        parameters,
        task.parameters,
        settings.method,
        residual=residual,
        fraction=settings.fraction,
        trainable=state.app.trainable(),
        min_size=settings.min_size,
        rng=np.random.default_rng([state.config.seed, zlib.crc32(state.client_id.encode()), task.round, 1]),
    )
    state.residual = residual if settings.error_feedback else {}
    state.residual_version = task.model_version
    return wire


@CLIENT.on(EvaluateTask)
def evaluate_locally(task: EvaluateTask, ctx: Context):
    state: ClientState = ctx.state
    if task.participants and state.client_id not in task.participants:
        return None
    if (unable := other_base(ctx, task)) is not None:
        return unable
    # on the local test split when the app gives one, else on the training partition
    app, data = state.app, state.data.test if state.data.test is not None else state.data.train
    key = f"evaluate:{task.message_id}"
    ctx.hold(key)
    context = AppContext(
        round=task.round, client_id=state.client_id, model_version=task.model_version, state=state.app_state
    )
    ctx.run_aside(
        key,
        lambda cancelled: app.evaluate(task.parameters, data, context),
        lambda scores, error: Evaluated(task=task, scores=scores, error=error, round=task.round),
    )


@CLIENT.on(Evaluated)
def answer_evaluation(message: Evaluated, ctx: Context):
    state: ClientState = ctx.state
    task = message.task
    ctx.commit(f"evaluate:{task.message_id}")
    if message.error is not None:
        ctx.log.error(
            "evaluation failed: reporting it to the server",
            task=task.message_id,
            error=bounded(str(message.error), 500),
            exc_info=message.error,
        )
        # the server stops waiting for this client's scores, and names it
        failed = task.reply(
            EvaluateResult,
            client_id=state.client_id,
            task_id=task.message_id,
            loss=float("nan"),
            accuracy=float("nan"),
            num_samples=0,
            error=bounded(str(message.error), ERROR_CHARS),
        )
        return [to_server(failed)]
    scores = message.scores
    metrics = {name: float(value) for name, value in scores.items() if name != "num_samples"}
    ctx.log.info(
        f"round {task.round}: evaluation done",
        model_version=task.model_version,
        **{name: round(value, 4) for name, value in list(metrics.items())[:SHOWN_TRAIN_METRICS]},
    )
    result = task.reply(
        EvaluateResult,
        client_id=state.client_id,
        task_id=task.message_id,
        loss=metrics.get("loss", float("nan")),
        accuracy=metrics.get("accuracy", float("nan")),
        num_samples=int(scores["num_samples"]),
        metrics=metrics,
    )
    return [to_server(result)]


@CLIENT.on(Exit)
def leave(message: Exit, ctx: Context):
    state: ClientState = ctx.state
    state.exit_reason = message.reason or "exit"
    ctx.log.info("Exit received: stopping", reason=bounded(state.exit_reason, 300))
    cancel_training(ctx, state, "the client exits")  # its thread is a daemon: the process does not wait for it
    ctx.commit()  # tasks held (in training, waiting): their answers are not wanted any more
    ctx.stop()


# ---------------------------------------------------------------- one heartbeat per process

PROCESS_HANDLERS = HandlerSet("client process")


@dataclass
class ProcessState:
    """The logical clients of one process, for their shared heartbeat."""

    config: RunConfig
    clients: list[ClientState]


def make_process_state(config: RunConfig, clients: list[ClientState]) -> ProcessState:
    for client in clients:
        client.beats_alone = False
    return ProcessState(config, clients)


@PROCESS_HANDLERS.on(Started)
def start_beating(message: Started, ctx: Context):
    ctx.set_timer("heartbeat", ctx.state.config.liveness.heartbeat_s, HeartbeatDue())


@PROCESS_HANDLERS.on(HeartbeatDue)
def beat_for_all(message: HeartbeatDue, ctx: Context):
    """One Heartbeats for every client of this process still running (stop when none is)."""
    state: ProcessState = ctx.state
    running = [c for c in state.clients if c.exit_reason is None]
    if not running:
        ctx.stop()
        return None
    ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    training = {c.client_id: seconds for c in running if (seconds := c.training_s()) is not None}
    return [
        to_server(
            Heartbeats(
                clients={c.client_id: num_samples(c) for c in running}, training=training, instance=process_instance()
            )
        )
    ]


# what a run's clients compose (brokerfl.assembly.roles adds cross-site evaluation's set and the
# extra_handlers' sets); PROCESS_HANDLERS is the table of a process's shared heartbeat
HANDLERS = (CLIENT,)
