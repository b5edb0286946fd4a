"""Liveness: who is sampled, what a server without clients says, and which queued tasks a
returning client skips. The server and client workers run on the local transport."""

from __future__ import annotations

import time

import numpy as np
import structlog

from brokerfl.assembly.roles import client_worker, server_worker, topology_for
from brokerfl.config import load_config
from brokerfl.handlers.datasets import load_dataset
from brokerfl.handlers.trainer import init_parameters
from brokerfl.handlers.workflows.server_state import live_clients, start_round
from brokerfl.runtime.handler_table import Context, to_client, to_clients, to_server
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import Heartbeat, Join, TrainTask, from_wire


def step_until(worker, condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        worker.step(0.05)


def taken(admin, queue, kind):
    out = []
    while (delivery := admin.get(queue)) is not None:
        admin.ack(delivery)
        if delivery.envelope.type == kind:
            out.append(from_wire(delivery.envelope, delivery.body))
    return out


def make_server(**overrides):
    config = load_config(
        None,
        {
            "clients": 3,
            "strategy.min_clients": 2,
            "strategy.join_timeout_s": 0.3,
            "liveness.timeout_s": 0.5,
            **overrides,
        },
    )
    broker = LocalBroker()
    admin = LocalTransport(broker)
    topology = topology_for(config, journal=False)
    topology.declare(admin)
    client_queues = [topology.declare_client(admin, cid) for cid in config.client_ids()]
    server = server_worker(LocalTransport(broker), config, MemoryModelStore(), MetricsLog(None), journal=False)
    return config, admin, topology, client_queues, server


def test_only_clients_that_beat_are_sampled():
    config, admin, topology, client_queues, server = make_server()
    server.start()
    server.publish(
        [
            to_server(Join(client_id="0", num_samples=10)),
            to_server(Join(client_id="1", num_samples=10)),
            to_server(Join(client_id="2", num_samples=10)),
        ]
    )
    server.step(0.0)
    tasks = taken(admin, client_queues[0], "train_task")
    assert [t.participants for t in tasks] == [["0", "1", "2"]]  # everyone live: begun at once

    # Clients 0 and 1 keep beating, 2 falls silent: after the timeout it is not sampled.
    state = server.state
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline:
        server.publish([to_server(Heartbeat(client_id="0")), to_server(Heartbeat(client_id="1"))])
        server.step(0.1)
    assert live_clients(state) == ["0", "1"]
    # the next round samples from the live ones only
    context = Context(role=server.name, run=topology.run, state=state, log=server.log, clock=server.clock)
    (outbound,) = start_round(context)
    assert outbound.message.participants == ["0", "1"]


def test_a_server_without_live_clients_says_so():
    config, admin, topology, client_queues, server = make_server()
    with structlog.testing.capture_logs() as logs:
        server.start()
        step_until(server, lambda: any(e["event"] == "no live clients: waiting" for e in logs))
    assert not server.state.begun
    # one client shows up by heartbeat alone (as after a server restart), then a second:
    server.publish(
        [to_server(Heartbeat(client_id="0", num_samples=5)), to_server(Heartbeat(client_id="2", num_samples=5))]
    )
    step_until(server, lambda: server.state.begun)
    assert taken(admin, client_queues[0], "train_task")[0].participants == ["0", "2"]


def test_a_returning_client_skips_superseded_and_expired_tasks():
    config = load_config(None, {"clients": 2})
    broker = LocalBroker()
    admin = LocalTransport(broker)
    topology = topology_for(config, journal=False)
    client = client_worker(LocalTransport(broker), config, "0", journal=False)
    data = load_dataset("digits")
    params = init_parameters(data.num_features, config.model.hidden, data.num_classes, seed=0)
    # What waited in the durable queue while the client was away, oldest first:
    queued = [
        TrainTask(round=1, model_version=0, parameters=params, participants=["0"], deadline=time.time() - 5),  # expired
        TrainTask(round=3, model_version=2, parameters=params, participants=["1"]),  # not sampled, but shows v2
        TrainTask(round=2, model_version=1, parameters=params, participants=["0"]),  # superseded by v2
        TrainTask(round=3, model_version=2, parameters=params, participants=["0"], deadline=time.time() + 60),
    ]
    client.publish([to_clients(t) for t in queued])
    with structlog.testing.capture_logs() as logs:
        client.start()
        while client.step(0.0):
            pass
    updates = taken(admin, topology.server_queue, "parameter_update")
    assert [u.task_id for u in updates] == [queued[3].message_id]
    events = [e["event"] for e in logs]
    assert "task past its deadline; skipped" in events
    assert "task for a superseded model version; skipped" in events
    # a task it already answered (redelivered) is skipped too
    client.publish([to_client("0", queued[3])])
    while client.step(0.0):
        pass
    assert taken(admin, topology.server_queue, "parameter_update") == []
    assert np.isfinite(updates[0].parameters["0.weight"]).all()


def test_a_process_beats_once_for_all_its_clients_and_not_at_all_without_liveness():
    from brokerfl.assembly.roles import client_process_worker
    from brokerfl.wire.message import Heartbeats

    config = load_config(None, {"clients": 3, "liveness.heartbeat_s": 0.05, "liveness.timeout_s": 0.5})
    broker = LocalBroker()
    admin = LocalTransport(broker)
    topology = topology_for(config, journal=False)
    topology.declare(admin)
    transport = LocalTransport(broker)
    clients = [client_worker(transport, config, cid, journal=False) for cid in config.client_ids()]
    beat = client_process_worker(transport, config, clients)
    for worker in [*clients, beat]:
        worker.start()
    assert all(c.next_timer_in() is None for c in clients)  # no client beats alone
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        time.sleep(max(0.0, beat.next_timer_in()))
        beat.fire_due_timers()
    sent = []
    while (delivery := admin.get(topology.server_queue)) is not None:
        admin.ack(delivery)
        sent.append(from_wire(delivery.envelope, delivery.body))
    kinds = [m.TYPE for m in sent]
    assert kinds.count("join") == 3 and "heartbeat" not in kinds and kinds.count("heartbeats") >= 3
    assert all(
        m.clients == {cid: c.state.data.train[1].size for cid, c in zip("012", clients)}
        for m in sent
        if isinstance(m, Heartbeats)
    )

    # the server takes the federation from one Heartbeats message (as after a restart)
    _, _, _, client_queues, server = make_server()
    server.start()
    server.publish([to_server(next(m for m in sent if isinstance(m, Heartbeats)))])
    step_until(server, lambda: server.state.begun)
    assert sorted(server.state.clients) == ["0", "1", "2"]

    # a client that exited is left out; when none is left the beat stops
    for c in clients:
        c.state.exit_reason = "exit"
    time.sleep(max(0.0, beat.next_timer_in()))
    beat.fire_due_timers()
    assert beat.stopped

    # liveness off (simulate): no heartbeats at all
    off = load_config(None, {"clients": 3, "liveness.timeout_s": float("inf")})
    quiet = [client_worker(transport, off, cid, journal=False) for cid in ("5", "6")]
    assert client_process_worker(transport, off, quiet) is None
    for worker in quiet:
        worker.start()
    assert all(w.next_timer_in() is None for w in quiet)


def test_a_slow_store_of_the_version_does_not_make_live_clients_look_silent(monkeypatch):
    """Heartbeats wait in the server's queue while it stores a version (seconds for a model
    of hundreds of MB): the next round samples the clients live when the round closed (each
    just sent its update), not those whose heartbeats the server read during the store."""
    from brokerfl.handlers.workflows import server_state
    from brokerfl.wire.message import ParameterUpdate

    config, admin, topology, client_queues, server = make_server(**{"liveness.timeout_s": 10.0})
    server.start()
    server.publish([to_server(Join(client_id=c, num_samples=10)) for c in ("0", "1", "2")])
    server.step(0.0)
    (task,) = taken(admin, client_queues[0], "train_task")
    assert task.participants == ["0", "1", "2"]

    stalled = {"s": 0.0}  # the server's clock runs on by the store's seconds
    monkeypatch.setattr(server_state.time, "monotonic", lambda real=time.monotonic: real() + stalled["s"])
    store_put = server.state.store.put

    def slow_put(model):
        stalled["s"] += 12.0  # a large version, stored while the heartbeats queue up: longer than the timeout
        return store_put(model)

    monkeypatch.setattr(server.state.store, "put", slow_put)
    server.publish(
        [
            to_server(
                task.reply(
                    ParameterUpdate, client_id=c, task_id=task.message_id, parameters=task.parameters, num_samples=10
                )
            )
            for c in ("0", "1", "2")
        ]
    )
    step_until(server, lambda: server.state.round == 2)
    (next_task,) = taken(admin, client_queues[0], "train_task")
    assert next_task.participants == ["0", "1", "2"]
