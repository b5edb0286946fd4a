"""Handler dispatch through a worker, on both transports: dead-lettering with reasons,
ack after the handler's output is published, hold/commit, timers."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest

from brokerfl.runtime.handler_table import HandlerTable, Started, to_clients
from brokerfl.runtime.worker import Worker
from brokerfl.transports.base import REASON_HEADER
from brokerfl.transports.topology import RunTopology, routing_key
from brokerfl.wire.message import Envelope, Heartbeat, Join, Message, ParameterUpdate, to_wire


@dataclass(kw_only=True)
class Ping(Message):
    """A type the test tables know, to check dispatch."""

    n: int


@dataclass(kw_only=True)
class Unhandled(Message):
    """Registered, but no table in this file handles it."""


def wait_for(condition, *steppers, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached before the deadline")
        for step in steppers:
            step(0.05)


def drain(transport, queue, *, expect, timeout=10.0):
    """Take ``expect`` messages from a queue (acking them), waiting up to ``timeout``."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        delivery = transport.get(queue)
        if delivery is None:
            time.sleep(0.02)  # basic.get has no wait; a short poll interval under a deadline
            continue
        transport.ack(delivery)
        got.append(delivery)
    return got


@pytest.fixture
def topology(transport_factory, run_name):
    topo = RunTopology(run_name, journal=False)
    admin = transport_factory()
    topo.declare(admin)
    yield topo, admin
    topo.delete(admin, ["a"])


def make_worker(transport, topo, table, state=None):
    worker = Worker(
        transport, topo, topo.server_queue, table, state if state is not None else {}, name="server", prefetch=10
    )
    worker.start()
    return worker


def publish(transport, topo, message: Message):
    envelope, body = to_wire(message)
    transport.publish(topo.exchange, routing_key("server", message.TYPE), envelope, body)


def test_unknown_type_bad_body_missing_handler_and_raising_handler_are_dead_lettered(transport_factory, topology):
    topo, admin = topology
    table = HandlerTable("server")
    seen = []

    @table.on(Ping)
    def on_ping(message, ctx):
        if message.n == 13:
            raise ValueError("unlucky number")
        seen.append(message.n)

    worker = make_worker(transport_factory(), topo, table)
    publish(admin, topo, Ping(n=1))
    admin.publish(
        topo.exchange,
        "server.mystery",
        Envelope("mystery", "id-mystery", "test", time.time(), {}),
        b"\xce\x00\x00\x00\x01\x80\xc6\x00\x00\x00\x00",
    )
    admin.publish(
        topo.exchange, "server.ping", Envelope("ping", "id-garbage", "test", time.time(), {}), b"not msgpack at all"
    )
    publish(admin, topo, Unhandled())
    publish(admin, topo, Ping(n=13))
    publish(admin, topo, Ping(n=2))
    wait_for(lambda: seen == [1, 2], worker.step)

    dead = drain(admin, topo.dead_queue, expect=4)
    reasons = {d.envelope.type: d.envelope.headers[REASON_HEADER] for d in dead}
    assert "unknown message type 'mystery'" in reasons["mystery"]
    assert "no handler for message type 'unhandled'" in reasons["unhandled"]
    assert any("raised ValueError: unlucky number" in r for r in reasons.values())
    assert any("undecodable" in r for r in reasons.values())
    assert worker.dead_lettered == 4 and worker.handled == 2
    assert worker.dead_letter_kinds == {
        "undecodable": 2,
        "unhandled": 1,
        "failed": 1,
    }  # as decided, not read back from the reasons
    # the poison messages left the server queue: nothing waits there any more
    assert admin.queue_info(topo.server_queue).messages_ready == 0


def test_handler_output_is_published_before_the_ack(transport_factory, topology):
    topo, admin = topology
    client_queue = topo.declare_client(admin, "a")
    table = HandlerTable("server")

    @table.on(Join)
    def welcome(message, ctx):
        return [to_clients(Heartbeat(client_id=message.client_id))]

    worker = make_worker(transport_factory(), topo, table)
    publish(admin, topo, Join(client_id="a"))
    wait_for(lambda: worker.handled == 1, worker.step)
    out = drain(admin, client_queue, expect=1)
    assert [d.envelope.type for d in out] == ["heartbeat"]
    assert out[0].envelope.sender == "server"
    assert out[0].envelope.headers["run"] == topo.run


def test_held_messages_stay_unacked_until_commit(transport_factory, topology):
    """Updates are held until the model they went into is stored; a crash before the
    commit redelivers them, after it does not."""
    topo, admin = topology
    table = HandlerTable("server")
    folded = []

    @table.on(ParameterUpdate)
    def fold(update, ctx):
        folded.append((update.message_id, ctx.redelivered))
        ctx.hold()
        if update.num_samples == 3:
            ctx.commit()

    def update(n):
        return ParameterUpdate(client_id="a", task_id="t", parameters={"w": np.ones(2, np.float32)}, num_samples=n)

    first = transport_factory()
    worker = make_worker(first, topo, table)
    publish(admin, topo, update(1))
    publish(admin, topo, update(2))
    wait_for(lambda: len(folded) == 2, worker.step)
    first.close()  # the process dies before committing

    second = transport_factory()
    worker = make_worker(second, topo, table)
    wait_for(lambda: len(folded) == 4, worker.step)
    assert [redelivered for _, redelivered in folded] == [False, False, True, True]
    assert [mid for mid, _ in folded[2:]] == [mid for mid, _ in folded[:2]]
    publish(admin, topo, update(3))
    wait_for(lambda: len(folded) == 5, worker.step)
    assert worker.held == []
    second.close()

    third = transport_factory()
    worker = make_worker(third, topo, table)
    # nothing comes back once committed: poll for a while, with a deadline
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        worker.step(0.1)
    assert len(folded) == 5
    third.close()


def test_started_and_timers_run_locally(transport_factory, topology):
    topo, _ = topology
    table = HandlerTable("server")
    events = []

    @table.on(Started)
    def on_start(message, ctx):
        events.append("started")
        ctx.set_timer("tick", 0.05, Ping(n=1))
        ctx.set_timer("never", 0.05, Ping(n=99))
        ctx.cancel_timer("never")

    @table.on(Ping)
    def on_ping(message, ctx):
        events.append(message.n)
        if message.n < 3:
            ctx.set_timer("tick", 0.01, Ping(n=message.n + 1))
        else:
            ctx.stop()

    worker = make_worker(transport_factory(), topo, table)
    wait_for(lambda: worker.stopped, worker.step)
    assert events == ["started", 1, 2, 3]


def test_a_forged_local_message_is_dead_lettered(transport_factory, topology):
    """Starts and timer messages are a worker's own: one arriving over the transport could
    restart a server's state or close a round early, so it is refused."""
    topo, admin = topology
    table = HandlerTable("server")
    started = []

    @table.on(Started)
    def on_start(message, ctx):
        started.append(message.message_id)

    worker = make_worker(transport_factory(), topo, table)
    publish(admin, topo, Started())
    wait_for(lambda: worker.dead_lettered == 1, worker.step)
    assert len(started) == 1  # only the worker's own start
    (dead,) = drain(admin, topo.dead_queue, expect=1)
    assert "local to a worker" in dead.envelope.headers[REASON_HEADER]
    assert worker.dead_letter_kinds == {"refused": 1}


def test_effects_marked_once_sent_wait_for_a_successful_publish(transport_factory, topology, monkeypatch):
    """A handler's "done" (e.g. a client's task answered) must not run ahead of what was
    sent: when publishing its output fails, the message is requeued and handled again, and
    only then, once the output is confirmed, does the effect apply (else a client whose
    answer failed to publish during a failover marks the task answered and skips it)."""
    from brokerfl.transports.base import TransportError

    topo, admin = topology
    client_queue = topo.declare_client(admin, "a")
    table = HandlerTable("server")
    answered: set[str] = set()
    handled: list[str] = []

    @table.on(Join)
    def answer(message, ctx):
        handled.append(message.message_id)
        if message.message_id in answered:
            return None  # what the client does with a task it already answered
        ctx.once_sent(lambda: answered.add(message.message_id))
        return [to_clients(Heartbeat(client_id=message.client_id))]

    worker = make_worker(transport_factory(), topo, table)
    real_publish = worker.publish_wire
    failures = []

    def publish_failing_once(wire, **kwargs):
        if not failures:
            failures.append(1)
            raise TransportError("the connection keeps failing (test)")
        return real_publish(wire, **kwargs)

    monkeypatch.setattr(worker, "publish_wire", publish_failing_once)
    join = Join(client_id="a")
    publish(admin, topo, join)
    wait_for(lambda: len(handled) == 2 and worker.handled == 1, worker.step)
    assert handled == [join.message_id, join.message_id]  # requeued after the failure, handled again
    assert answered == {join.message_id}  # marked only after the second, successful publish
    out = drain(admin, client_queue, expect=1)
    assert [d.envelope.type for d in out] == ["heartbeat"]  # sent once
    assert admin.queue_info(topo.server_queue).messages_ready == 0


def test_a_refusing_handler_keeps_its_timers_a_crashing_one_does_not(transport_factory, topology):
    """A Rejected message is the handler's verdict: what it decided before refusing stands,
    timers included (the server closes a round whose last answer was a refused update).
    Any other exception drops them. A local message whose handler fails becomes a
    HandlerFailed for the table."""
    from brokerfl.runtime.handler_table import HandlerFailed, Rejected

    topo, admin = topology
    table = HandlerTable("server")
    events = []

    @table.on(Ping)
    def on_ping(message, ctx):
        events.append(message.n)
        if message.n == 1:
            ctx.set_timer("after-refusal", 0.0, Ping(n=10))
            raise Rejected("refused, but decided")
        if message.n == 2:
            ctx.set_timer("after-crash", 0.0, Ping(n=20))
            raise RuntimeError("crashed")
        if message.n == 10:
            raise RuntimeError("a local message's handler failed")

    @table.on(HandlerFailed)
    def on_failed(message, ctx):
        events.append(message.failed_type)
        ctx.stop()

    worker = make_worker(transport_factory(), topo, table)
    publish(admin, topo, Ping(n=2))
    publish(admin, topo, Ping(n=1))
    wait_for(lambda: worker.stopped, worker.step)
    assert events == [2, 1, 10, "ping"]
    assert len(drain(admin, topo.dead_queue, expect=2)) == 2
