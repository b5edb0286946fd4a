"""Local training runs beside the I/O loop: a client keeps its connection, its heartbeats
and its acks going while it trains; training no longer wanted is cancelled and its task
acked; an app whose ``train`` raises is reported (TrainFailed) and its round does not wait
for the deadline. The app: ``tests/slow_apps.py``."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from brokerfl.assembly.roles import client_worker, topology_for
from brokerfl.assembly.simulate import SimulationError, simulate
from brokerfl.config import load_config
from brokerfl.storage.accounting import account_run
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.transports.local import LocalTransport
from brokerfl.wire.message import Exit, ParameterUpdate, TrainTask, from_wire, to_wire
from tests import slow_apps

APP = "tests.slow_apps"


def slow_config(run: str, **overrides):
    return load_config(None, {"run": run, "app": APP, **overrides})


def step_until(workers, done, timeout: float, what: str) -> float:
    """Step the workers until ``done()``; the seconds it took (AssertionError past ``timeout``)."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        for worker in workers:
            if not worker.stopped:
                worker.step(0.05)
    return time.monotonic() - started


def server_messages(transport, topology) -> list:
    """What reached the server queue (taken off it)."""
    out = []
    while (delivery := transport.get(topology.server_queue)) is not None:
        out.append(from_wire(delivery.envelope, delivery.body))
        transport.ack(delivery)
    return out


def task(config, version: int, **train) -> TrainTask:
    return TrainTask(
        round=version + 1,
        model_version=version,
        participants=["0"],
        parameters={"w": np.zeros(4, np.float32)},
        config=config.train.model_copy(update=train).model_dump(),
        deadline=0.0,
    )


# ---------------------------------------------------------------- cancellation (both transports)


@pytest.fixture
def lone_client(transport_factory, run_name):
    """Client 0 of a slow app (training takes 60 s unless a task says otherwise), training
    aside (as over RabbitMQ) on either transport, and a second connection to feed it."""
    config = slow_config(run_name, clients=1, app_options={"train_s": 60.0})
    worker = client_worker(transport_factory(), config, "0")
    worker.work_inline = False  # the in-process transport trains inline unless told
    admin = transport_factory()
    worker.start()
    yield config, worker, admin, topology_for(config)
    worker.stop()


def send(admin, topology, key: str, message) -> None:
    admin.publish(topology.exchange, key, *to_wire(message))


def _training(worker, calls_before: int) -> bool:
    return worker.state.training is not None and len(slow_apps.CALLS) > calls_before


@pytest.mark.timeout(60)
def test_exit_stops_a_client_in_training_at_once_and_acks_its_task(lone_client):
    config, worker, admin, topology = lone_client
    calls = len(slow_apps.CALLS)
    send(admin, topology, "clients.train_task", task(config, 0))
    step_until([worker], lambda: _training(worker, calls), 20, "the training starts")
    send(admin, topology, "clients.exit", Exit(reason="run over"))
    took = step_until([worker], lambda: worker.stopped, 20, "the client stops on Exit")
    assert took < 10  # not the 60 s the training would take
    call = slow_apps.CALLS[-1]
    deadline = time.monotonic() + 10
    while not call["cancelled"] and time.monotonic() < deadline:  # the lane's thread sees the flag between steps
        time.sleep(0.05)
    assert call["cancelled"] and not call["finished"]
    assert admin.queue_info(topology.client_queue("0")).messages_ready == 0  # acked, not requeued by the stop
    assert not [m for m in server_messages(admin, topology) if isinstance(m, ParameterUpdate)]


@pytest.mark.timeout(60)
def test_a_training_past_its_deadline_is_cancelled_discarded_and_acked(transport_factory, run_name):
    config = slow_config(run_name, clients=1, app_options={"train_s": 60.0})
    worker = client_worker(transport_factory(), config, "0")
    worker.work_inline = False
    admin = transport_factory()
    topology = topology_for(config)
    worker.start()
    calls = len(slow_apps.CALLS)
    overdue = task(config, 0)
    overdue.deadline = time.time() + 1.0
    send(admin, topology, "clients.train_task", overdue)
    step_until([worker], lambda: _training(worker, calls), 20, "the training starts")
    step_until([worker], lambda: worker.state.training is None, 20, "the overdue training is given up")
    assert slow_apps.CALLS[-1]["cancelled"]
    assert worker.held == [] and admin.queue_info(topology.client_queue("0")).messages_ready == 0
    assert not worker.stopped  # a cancelled training ends nothing else: the next task trains
    send(admin, topology, "clients.train_task", task(config, 1, max_batches=2))
    answered = []
    step_until(
        [worker],
        lambda: (
            answered.extend(m for m in server_messages(admin, topology) if isinstance(m, ParameterUpdate)) or answered
        ),
        20,
        "the next task is answered",
    )
    assert [u.model_version for u in answered] == [1]
    worker.stop()


@pytest.mark.timeout(60)
def test_a_newer_task_cancels_the_training_and_trains_next(lone_client):
    """The first task's training (60 s) is no longer wanted once a newer task comes: it is
    cancelled, the newer one trains when the lane is free, and only it is answered; both
    tasks are acked."""
    config, worker, admin, topology = lone_client
    calls = len(slow_apps.CALLS)
    first = task(config, 0)
    send(admin, topology, "clients.train_task", first)
    step_until([worker], lambda: _training(worker, calls), 20, "the first training starts")
    newer = task(config, 1, max_batches=2)
    send(admin, topology, "clients.train_task", newer)
    answered = []
    took = step_until(
        [worker],
        lambda: (
            answered.extend(m for m in server_messages(admin, topology) if isinstance(m, ParameterUpdate)) or answered
        ),
        30,
        "the newer task is answered",
    )
    assert took < 20 and [u.task_id for u in answered] == [newer.message_id]
    assert slow_apps.CALLS[calls]["cancelled"]
    step_until([worker], lambda: worker.state.training is None, 10, "the client is idle")
    assert worker.held == [] and admin.queue_info(topology.client_queue("0")).messages_ready == 0


# ---------------------------------------------------------------- a failing app, in-process


@pytest.mark.timeout(120)
def test_a_failing_app_is_reported_and_its_round_does_not_wait_for_the_deadline(run_name):
    config = slow_config(
        run_name,
        clients=3,
        rounds=2,
        app_options={"fail_partitions": [1]},
        **{"strategy.min_clients": 2, "strategy.round_deadline_s": 600.0},
    )
    started = time.monotonic()
    result = simulate(config, journal=True)
    assert time.monotonic() - started < 60
    assert [r["num_updates"] for r in result.records if "evaluation" not in r] == [2, 2]
    failures = result.server_state.train_failures
    assert [(f.client_id, f.round) for f in failures] == [("1", 1), ("1", 2)]
    assert (
        failures[0].error.startswith("ValueError: boom in partition 1")
        and "\n" not in failures[0].error
        and "\x1b" not in failures[0].error
    )
    report = account_run(LocalTransport(result.broker), topology_for(config, journal=True), result.store)
    assert report.ok, report.summary()
    assert "training failures: 2 (clients 1)" in report.summary()


@pytest.mark.timeout(120)
def test_when_every_participant_fails_the_too_few_path_is_taken_at_once(run_name):
    config = slow_config(
        run_name,
        clients=2,
        rounds=2,
        app_options={"fail_partitions": [0, 1]},
        **{"strategy.min_clients": 1, "strategy.round_deadline_s": 600.0, "strategy.on_too_few": "stop"},
    )
    started = time.monotonic()
    with pytest.raises(SimulationError, match="round 1 got 0 of the 1 updates it needs"):
        simulate(config)
    assert time.monotonic() - started < 60


# ---------------------------------------------------------------- over RabbitMQ, separate processes


def _federation(amqp_url: str, run: str, tmp_path: Path, *, clients: int, rounds: int, url_query: str = "", **config):
    from test_faults import Federation

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run": run, "seed": 0, "app": APP, **config}))
    url = amqp_url + (("&" if "?" in amqp_url else "?") + url_query if url_query else "")
    return Federation(url, run, tmp_path, clients=clients, rounds=rounds, config=str(path))


def _status(amqp_url: str, config) -> dict | None:
    from brokerfl.runtime.operator_commands import StatusRequest, ask
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.base import TransportError

    with AmqpTransport(amqp_url) as transport:
        try:
            reply = ask(transport, topology_for(config), StatusRequest(), timeout=5)
        except TransportError:  # no server queue yet: the server is starting
            return None
    return None if reply is None else reply.status


def _wait_for_status(amqp_url: str, config, fed, good, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status(amqp_url, config)
        if status is not None and good(status):
            return status
        if fed.server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no status with {what} within {timeout} s (last: {status}): {fed.log_tail()}")
        time.sleep(0.5)  # a status request every half second, under a deadline


def _json_lines(text: str) -> list[dict]:
    """A process's log lines (JSON, as written when not on a terminal)."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def _rendered(status: dict) -> str:
    from rich.console import Console

    from brokerfl.cli.operate import render

    console = Console(file=io.StringIO(), width=200)
    console.print(render({"server": status, "queues": {}, "journal_max_bytes": None, "journal_max_age": None}))
    return console.file.getvalue()


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_training_longer_than_the_amqp_heartbeat_keeps_every_connection(amqp_url, run_name, tmp_path):
    """AMQP heartbeat 2 s, training 12 s (longer than liveness.timeout_s too), 2 rounds:
    no process loses its connection, and during training the server's status shows every
    sampled client live and training."""
    strategy = {"name": "fedavg", "fraction": 1.0, "min_clients": 2, "round_deadline_s": 120.0}
    fed = _federation(
        amqp_url,
        run_name,
        tmp_path,
        clients=2,
        rounds=2,
        url_query="heartbeat=2",
        app_options={"train_s": 12.0},
        strategy=strategy,
    )
    config = slow_config(run_name, clients=2)
    try:
        fed.start()

        def all_training(status: dict) -> bool:
            clients = {c["id"]: c for c in status["clients"]}
            sampled = status["participants"]
            return bool(sampled) and all(
                cid in clients and clients[cid]["live"] and (clients[cid]["training_s"] or 0) > 0 for cid in sampled
            )

        status = _wait_for_status(amqp_url, config, fed, all_training, 120, "every sampled client live and training")
        assert sorted(status["participants"]) == ["0", "1"]
        assert status["round"] == 1 and sum(c["live"] for c in status["clients"]) == 2
        shown = _rendered(status)
        assert "live 2 of 2" in shown and "training" in shown
        fed.finish(timeout=200)
        report = fed.accounting()
    finally:
        fed.cleanup()
    assert report.ok, report.summary()
    logs = {path.name: path.read_text() for path in fed.logs.glob("*.log")}
    assert len(logs) == 3
    for name, text in logs.items():
        assert "amqp.connection_lost" not in text, f"{name}:\n{text[-3000:]}"
        assert "settle_dropped" not in text and "already answered" not in text, name
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "evaluation" not in r]
    assert [r["num_updates"] for r in records] == [2, 2]


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_a_failing_app_over_rabbitmq_is_reported_and_the_round_closes_at_once(amqp_url, run_name, tmp_path):
    """Client 1's ``train`` raises in every round (deadline 600 s): the rounds close with
    the other two's updates long before it; the server's log and status name client 1 and
    its error (printable); accounting lists the failures and passes."""
    strategy = {"name": "fedavg", "fraction": 1.0, "min_clients": 2, "round_deadline_s": 600.0}
    fed = _federation(
        amqp_url,
        run_name,
        tmp_path,
        clients=3,
        rounds=3,
        app_options={"train_s": 2.0, "fail_partitions": [1]},
        strategy=strategy,
    )
    config = slow_config(run_name, clients=3)
    try:
        fed.start()
        status = _wait_for_status(amqp_url, config, fed, lambda s: bool(s["train_failures"]), 120, "a training failure")
        failure = status["train_failures"][0]
        assert failure["client_id"] == "1" and failure["error"].startswith("ValueError: boom in partition 1")
        assert "\n" not in failure["error"] and "\x1b" not in failure["error"]
        assert "boom in partition 1" in _rendered(status)
        fed.finish(timeout=200)
        report = fed.accounting()
    finally:
        fed.cleanup()
    assert report.ok, report.summary()
    assert "training failures: 3 (clients 1)" in report.summary()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "evaluation" not in r]
    assert [r["num_updates"] for r in records] == [2, 2, 2]
    assert all(r["duration_s"] < 60 for r in records), records
    server_log = next(p for p in sorted(fed.logs.glob("*.log")) if "server" in p.name).read_text()
    logged = [line for line in _json_lines(server_log) if line.get("event") == "client training failed"]
    assert [(line["client"], line["round"]) for line in logged] == [("1", 1), ("1", 2), ("1", 3)]
    assert all(
        line["error"].startswith("ValueError: boom in partition 1") and "\x1b" not in line["error"] for line in logged
    )


@pytest.mark.broker
@pytest.mark.timeout(60)
def test_the_amqp_heartbeat_comes_from_the_url_unless_given(amqp_url):
    from brokerfl.transports.amqp import DEFAULT_HEARTBEAT_S, AmqpTransport

    short = amqp_url + ("&" if "?" in amqp_url else "?") + "heartbeat=2"
    for url, options, expected in ((short, {}, 2), (amqp_url, {}, DEFAULT_HEARTBEAT_S), (short, {"heartbeat": 0}, 0)):
        with AmqpTransport(url, **options) as transport:
            assert transport._connection.conn._impl.params.heartbeat == expected, (url, options)


@pytest.mark.timeout(60)
def test_the_default_torch_loop_stops_between_batches_when_cancelled():
    import threading

    import torch

    from brokerfl.app import TrainingCancelled, cancellable
    from brokerfl.app.torch_adapter import sgd

    model = torch.nn.Linear(4, 2)
    data = (torch.randn(64, 4), torch.randint(0, 2, (64,)))
    before = [p.detach().clone() for p in model.parameters()]
    cancelled = threading.Event()
    cancelled.set()
    with cancellable(cancelled), pytest.raises(TrainingCancelled, match="after 0 batches"):
        sgd(model, data, epochs=1, batch_size=8, lr=0.1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # not one step taken
    with cancellable(threading.Event()):  # not cancelled: trains as ever
        sgd(model, data, epochs=1, batch_size=8, lr=0.1)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
