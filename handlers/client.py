"""The client's handler set: join, train when sampled, evaluate, stop on Exit."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import numpy as np

from brokerfl.config import RunConfig, TrainConfig
from brokerfl.handler_table import Context, HandlerTable, Started, to_server
from brokerfl.message import EvaluateResult, EvaluateTask, Exit, Heartbeat, Join, Message, ParameterUpdate, TrainTask
from handlers.datasets import load_dataset, partition
from handlers.trainer import evaluate, init_parameters, train_local

table = HandlerTable("client")


@dataclass
class ClientState:
    client_id: str
    config: RunConfig
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    answered: set[str] = field(default_factory=set)  # task ids this process already answered
    newest_version: int = -1  # the newest model version a task has shown this process
    last_global: dict[str, np.ndarray] | None = None  # the newest global model trained on
    exit_reason: str | None = None


def make_state(config: RunConfig, client_id: str) -> ClientState:
    """The client's partition of the dataset: partition ``int(client_id) % clients``."""
    data = load_dataset(config.data.dataset, test_fraction=config.data.test_fraction, seed=config.seed)
    parts = partition(data.y_train, config.clients, config.data.partition, alpha=config.data.alpha, seed=config.seed)
    index = _partition_index(client_id, config.clients)
    rows = parts[index]
    state = ClientState(client_id, config, data.x_train[rows], data.y_train[rows], data.num_classes)
    _warm_up(state)
    return state


def _warm_up(state: ClientState) -> None:
    """One throwaway step at start-up: torch's first call costs ~1 s, which would otherwise
    land in the first task (and be multiplied by a client_slowdown)."""
    parameters = init_parameters(state.x.shape[1], state.config.model.hidden, state.num_classes, seed=0)
    train_local(parameters, state.x[:2], state.y[:2], hidden=state.config.model.hidden, num_classes=state.num_classes, epochs=1, batch_size=2, lr=0.0, max_batches=1)


def _partition_index(client_id: str, clients: int) -> int:
    # numeric ids map to their partition; other ids hash to one, stably across processes
    return (int(client_id) if client_id.isdigit() else zlib.crc32(client_id.encode())) % clients


def training_seed(seed: int, client_id: str, round_: int) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(client_id.encode()), round_]).generate_state(1)[0])


@dataclass(kw_only=True)
class HeartbeatDue(Message):
    """Local timer message: time to tell the server this client is alive."""

    LOCAL = True


@table.on(Started)
def join(message: Started, ctx: Context):
    state: ClientState = ctx.state
    ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    return [to_server(Join(client_id=state.client_id, num_samples=len(state.y)))]


@table.on(HeartbeatDue)
def beat(message: HeartbeatDue, ctx: Context):
    state: ClientState = ctx.state
    ctx.set_timer("heartbeat", state.config.liveness.heartbeat_s, HeartbeatDue())
    return [to_server(Heartbeat(client_id=state.client_id, num_samples=len(state.y)))]


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
    parameters, metrics = train_local(
        task.parameters,
        state.x,
        state.y,
        hidden=state.config.model.hidden,
        num_classes=state.num_classes,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        proximal_mu=settings.proximal_mu,
        max_batches=settings.max_batches,
        seed=training_seed(state.config.seed, state.client_id, task.round),
    )
    slowdown = state.config.client_slowdown.get(state.client_id, 1.0)
    if slowdown > 1.0:  # a straggler, for benchmarks: as if its hardware were this much slower
        time.sleep((slowdown - 1.0) * (time.perf_counter() - started))
    state.answered.add(task.message_id)
    state.last_global = task.parameters
    update = task.reply(
        ParameterUpdate,
        client_id=state.client_id,
        task_id=task.message_id,
        parameters=parameters,
        num_samples=int(metrics["num_samples"]),
        metrics={"train_loss": float(metrics["loss"]), "train_s": time.perf_counter() - started},
    )
    return [to_server(update)]


@table.on(EvaluateTask)
def evaluate_locally(task: EvaluateTask, ctx: Context):
    state: ClientState = ctx.state
    if task.participants and state.client_id not in task.participants:
        return None
    scores = evaluate(task.parameters, state.x, state.y, hidden=state.config.model.hidden, num_classes=state.num_classes)
    result = task.reply(EvaluateResult, client_id=state.client_id, task_id=task.message_id, loss=scores["loss"], accuracy=scores["accuracy"], num_samples=int(scores["num_samples"]))
    return [to_server(result)]


@table.on(Exit)
def leave(message: Exit, ctx: Context):
    ctx.state.exit_reason = message.reason or "exit"
    ctx.stop()
