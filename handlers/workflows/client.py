"""The client's handler set: join, train when sampled, evaluate, stop on Exit."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from brokerfl.app import App, Partition, count_samples, load_app
from brokerfl.compression import compress
from brokerfl.config import RunConfig, TrainConfig
from brokerfl.handler_table import Context, HandlerTable, Started, to_server
from brokerfl.message import EvaluateResult, EvaluateTask, Exit, Gradients, Heartbeat, Heartbeats, Join, Message, ParameterUpdate, TrainTask
from brokerfl.message import process_instance  # names this process in Join and Heartbeat(s)
from handlers.strategies.base import prepare_update

table = HandlerTable("client")


@dataclass
class ClientState:
    client_id: str
    config: RunConfig
    app: App
    data: Partition  # this client's partition: train data and maybe a local test split
    answered: set[str] = field(default_factory=set)  # task ids this process already answered
    newest_version: int = -1  # the newest model version a task has shown this process
    # the newest global model trained on, kept only where a handler reads it (Gradients, the
    # README's example): else it would hold a superseded version alive per logical client
    last_global: dict[str, np.ndarray] | None = None
    residual: dict[str, np.ndarray] = field(default_factory=dict)  # what compression dropped so far (error feedback)
    residual_version: int = -1  # the model version the residual was last made against
    exit_reason: str | None = None
    beats_alone: bool = True  # False: its process sends one Heartbeats for all its clients (process_table)


def make_state(config: RunConfig, client_id: str) -> ClientState:
    """The client's partition of the app's data: partition ``int(client_id) % clients``."""
    app = load_app(config)
    data = app.load_partition(_partition_index(client_id, config.clients), config.clients, config.seed, client_id=client_id)
    state = ClientState(client_id, config, app, data)
    # torch's first call costs ~1 s, which would otherwise land in the first task (and be
    # multiplied by a client_slowdown)
    app.warm_up(data.train)
    return state


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


def liveness_on(config: RunConfig) -> bool:
    """Does the server judge liveness by heartbeats? (``simulate`` turns it off: an infinite
    timeout, under which heartbeats would be messages nobody needs.)"""
    return math.isfinite(config.liveness.timeout_s)


@table.on(Started)
def join(message: Started, ctx: Context):
    state: ClientState = ctx.state
    if state.beats_alone and liveness_on(state.config):
        ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    return [to_server(Join(client_id=state.client_id, num_samples=num_samples(state), instance=process_instance()))]


@table.on(HeartbeatDue)
def beat(message: HeartbeatDue, ctx: Context):
    state: ClientState = ctx.state
    ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    return [to_server(Heartbeat(client_id=state.client_id, num_samples=num_samples(state), instance=process_instance()))]


@table.on(TrainTask)
def train(task: TrainTask, ctx: Context):
    state: ClientState = ctx.state
    superseded = task.model_version < state.newest_version
    state.newest_version = max(state.newest_version, task.model_version)
    if state.client_id not in task.participants:
        return None
    # Tasks wait in the durable queue while a client is away; on its return, answering old
    # ones would only make updates the server drops.
    if task.message_id in state.answered:
        ctx.log.info("task already answered; skipped", task=task.message_id)
        return None
    if superseded:
        ctx.log.info("task for a superseded model version; skipped", task=task.message_id, model_version=task.model_version, newest=state.newest_version)
        return None
    if task.deadline and time.time() > task.deadline:
        ctx.log.info("task past its deadline; skipped", task=task.message_id, round=task.round, late_s=round(time.time() - task.deadline, 1))
        return None
    settings = TrainConfig.model_validate(task.config) if task.config else state.config.train
    started = time.perf_counter()
    parameters, metrics = state.app.train(task.parameters, state.data.train, settings, training_seed(state.config.seed, state.client_id, task.round))
    slowdown = state.config.client_slowdown.get(state.client_id, 1.0)
    if slowdown > 1.0:  # a straggler, for benchmarks: as if its hardware were this much slower
        time.sleep((slowdown - 1.0) * (time.perf_counter() - started))
    parameters = prepare_update(state.config, state.client_id, task.round, task.parameters, parameters)  # e.g. local DP's clip and noise
    method = state.config.compression.method
    if method != "none":
        parameters = _compressed(state, task, parameters)
    # Answered once the update is confirmed: if publishing it fails, the task is requeued
    # and must be trained again, not skipped as answered.
    ctx.once_sent(lambda: state.answered.add(task.message_id))
    if table.handler_for(Gradients.TYPE) is not None:
        state.last_global = task.parameters
    update = task.reply(
        ParameterUpdate,
        client_id=state.client_id,
        task_id=task.message_id,
        parameters=parameters,
        num_samples=int(metrics["num_samples"]),
        metrics={"train_loss": float(metrics.get("loss", float("nan"))), "train_s": time.perf_counter() - started},
        compression="" if method == "none" else method,
    )
    return [to_server(update)]


def _compressed(state: ClientState, task: TrainTask, parameters: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The delta against the task's model, compressed (brokerfl.compression), with error
    feedback. The residual carries over only to a newer model: a task for the version it was
    made against, or an older one (a round sent again, a server restarted from its store),
    starts afresh rather than add what may already have been folded."""
    settings = state.config.compression
    residual = state.residual if task.model_version > state.residual_version else {}
    wire, residual = compress(parameters, task.parameters, settings.method, residual=residual, fraction=settings.fraction,
                              trainable=state.app.trainable(), min_size=settings.min_size,
                              rng=np.random.default_rng([state.config.seed, zlib.crc32(state.client_id.encode()), task.round, 1]))
    state.residual = residual if settings.error_feedback else {}
    state.residual_version = task.model_version
    return wire


@table.on(EvaluateTask)
def evaluate_locally(task: EvaluateTask, ctx: Context):
    state: ClientState = ctx.state
    if task.participants and state.client_id not in task.participants:
        return None
    # on the local test split when the app gives one, else on the training partition
    scores = state.app.evaluate(task.parameters, state.data.test if state.data.test is not None else state.data.train)
    result = task.reply(EvaluateResult, client_id=state.client_id, task_id=task.message_id, loss=scores["loss"], accuracy=scores["accuracy"], num_samples=int(scores["num_samples"]))
    return [to_server(result)]


@table.on(Exit)
def leave(message: Exit, ctx: Context):
    ctx.state.exit_reason = message.reason or "exit"
    ctx.stop()


# ---------------------------------------------------------------- one heartbeat per process

process_table = HandlerTable("client-process")


@dataclass
class ProcessState:
    """The logical clients of one process, for their shared heartbeat."""

    config: RunConfig
    clients: list[ClientState]


def make_process_state(config: RunConfig, clients: list[ClientState]) -> ProcessState:
    for client in clients:
        client.beats_alone = False
    return ProcessState(config, clients)


@process_table.on(Started)
def start_beating(message: Started, ctx: Context):
    ctx.set_timer("heartbeat", ctx.state.config.liveness.heartbeat_s, HeartbeatDue())


@process_table.on(HeartbeatDue)
def beat_for_all(message: HeartbeatDue, ctx: Context):
    """One Heartbeats for every client of this process still running (stop when none is)."""
    state: ProcessState = ctx.state
    alive = {c.client_id: num_samples(c) for c in state.clients if c.exit_reason is None}
    if not alive:
        ctx.stop()
        return None
    ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    return [to_server(Heartbeats(clients=alive, instance=process_instance()))]
