"""What a provisioned client may do within its own rights, and what the broker refuses it:
no configuring (its queue's arguments are the project's: no reject-publish, no dead-letter
rerouting, no deleting), per-user connection and channel limits, a maximum message size;
client queues that, full, drop their oldest instead of nacking the server; dead letters
that keep a bounded excerpt of a huge body.

The own-queue tests provision a run into a vhost of the test broker (``provision_on_broker``);
the limits test starts a node of its own (``max_message_size`` is a node setting in 3.10):
``BROKERFL_LIMITS_NODE`` / ``BROKERFL_LIMITS_PORT``, else derived from the test broker's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions as px
import pytest
from rabbit_nodes import node_env
from test_security import ROOT, connect, run_federation, secure_config, wait_for

from brokerfl.assembly.roles import client_worker, topology_for
from brokerfl.ops.provision import BrokerLimits, provision
from brokerfl.runtime.handler_table import HandlerTable
from brokerfl.runtime.identity import client_user, server_user
from brokerfl.runtime.worker import Worker
from brokerfl.transports.base import (
    DEAD_LETTER_EXCERPT_BYTES,
    ORIGINAL_LENGTH_HEADER,
    REASON_HEADER,
)
from brokerfl.transports.topology import QueueMissing, RunTopology
from brokerfl.wire.message import Envelope, Exit, to_wire

MiB = 1024**2


def _refusal(url: str, operation) -> int:
    """The AMQP reply code with which the broker refused ``operation(channel)`` (0: allowed)."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        operation(connection.channel())
        return 0
    except (px.ChannelClosedByBroker, px.ConnectionClosedByBroker) as exc:
        return exc.reply_code
    finally:
        if connection.is_open:
            connection.close()


def own_queue_attacks(run: str, client_id: str) -> dict[str, Callable[[Any], Any]]:
    """What a client tried on its own queue to stall or hijack the federation."""
    topology = RunTopology(run)
    queue = topology.client_queue(client_id)
    return {
        # every broadcast nacked: no round makes progress
        "reject-publish": lambda ch: ch.queue_declare(
            queue, durable=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        ),
        # the server's messages republished as clients.exit, under the server's user_id
        "dead-letter rerouting": lambda ch: ch.queue_declare(
            queue,
            durable=True,
            arguments={
                "x-dead-letter-exchange": topology.exchange,
                "x-dead-letter-routing-key": "clients.exit",
                "x-message-ttl": 0,
            },
        ),
        "delete": lambda ch: ch.queue_delete(queue),
        "re-declare": lambda ch: ch.queue_declare(queue, durable=True),
        "bind": lambda ch: ch.queue_bind(queue, topology.exchange, "server.#"),
        "policy-free twin": lambda ch: ch.queue_declare(f"{queue}-mine", durable=True),
    }


def test_a_client_may_not_configure_its_queue_and_the_federation_trains_while_it_tries(provision_on_broker):
    config = secure_config("r" + uuid.uuid4().hex[:10], clients=3, rounds=3)
    done = provision_on_broker(config)
    run = config.run
    url = done.env(client_user(run, "1"))["BROKERFL_AMQP_URL"]
    attacks = own_queue_attacks(run, "1")
    finished = threading.Event()
    refusals: dict[str, set[int]] = {name: set() for name in attacks}
    rounds_tried = [0]

    def attacker() -> None:
        while not finished.is_set():
            for name, operation in attacks.items():
                refusals[name].add(_refusal(url, operation))
            rounds_tried[0] += 1
            finished.wait(0.2)

    thread = threading.Thread(target=attacker, daemon=True)

    def connect_as(client_id):
        if client_id == "1" and not thread.is_alive():
            thread.start()  # from before client 1 runs until the run has ended
        return connect(done, server_user(run) if client_id is None else client_user(run, client_id))

    try:
        records, _, server_transport = run_federation(config, connect_as)
        server_transport.close()
    finally:
        finished.set()
        thread.join(60)
    assert [r["num_updates"] for r in records] == [config.clients] * config.rounds  # every client, every round
    assert rounds_tried[0] >= 1
    assert refusals == {name: {403} for name in attacks}, refusals


def test_a_provisioned_client_checks_its_queue_and_says_so_when_it_is_missing(provision_on_broker):
    config = secure_config("r" + uuid.uuid4().hex[:10], clients=2, rounds=1)
    done = provision_on_broker(config)
    run = config.run
    with connect(done, client_user(run, "0")) as client, connect(done, f"{run}-admin") as admin:
        assert client_worker(client, config, "0").queue == RunTopology(run).client_queue("0")  # no declare needed
        admin.delete_queue(RunTopology(run).client_queue("0"))  # as if the definitions had not been imported
        with pytest.raises(
            QueueMissing,
            match=r"your queue 'brokerfl\..*\.client\.0' is missing: has the operator imported the definitions",
        ):
            client_worker(client, config, "0")
    # the command, with the client's credentials file as its environment
    env = {**os.environ, **done.env(client_user(run, "0"))}
    cli = subprocess.run(
        [sys.executable, "-m", "brokerfl.cli", "client", "configs/digits_fedavg.yaml", "--clients", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert cli.returncode == 3, cli.stdout + cli.stderr
    assert (
        f"brokerfl client: your queue 'brokerfl.{run}.client.0' is missing: has the operator imported the definitions"
        in cli.stderr
    )


def test_a_full_client_queue_drops_its_oldest_and_never_nacks_the_server(provision_on_broker):
    """drop-head, not reject-publish: a client that does not consume cannot make the
    server's broadcasts nack (with reject-publish every round would stall). The dead-letter
    queue is capped the same way."""
    config = secure_config("r" + uuid.uuid4().hex[:10], clients=2, rounds=1)
    done = provision_on_broker(config, limits=BrokerLimits(client_queue_messages=5, dead_queue_messages=5))
    run = config.run
    topology = topology_for(config)
    sent = []
    with connect(done, server_user(run)) as server, connect(done, f"{run}-admin") as admin:
        for n in range(20):
            envelope, body = to_wire(Exit(run=run, reason=f"broadcast {n}"))
            server.publish(topology.exchange, "clients.exit", envelope, body)  # confirmed, never nacked
            server.publish(topology.exchange, "dead.exit", envelope, body)
            sent.append(envelope.message_id)
        for queue in (topology.client_queue("0"), topology.client_queue("1"), topology.dead_queue):
            wait_for(lambda queue=queue: admin.queue_info(queue).messages_ready == 5, 30, f"{queue} at its cap")
            kept = []
            while (d := admin.get(queue)) is not None:
                kept.append(d.envelope.message_id)
                admin.ack(d)
            assert kept == sent[-5:], queue  # the newest five


def test_what_a_client_still_sees_of_other_queues(provision_on_broker):
    """RabbitMQ 3.10 checks no permission on a passive queue.declare: a client learns
    whether any queue of its run's vhost exists, its ready count and its consumer count
    (docs/concepts/broker-rights.md). It reads, takes, binds or deletes none of them. If a later
    RabbitMQ refuses the look, this test says so and the docs should follow."""
    config = secure_config("r" + uuid.uuid4().hex[:10], clients=2, rounds=1)
    done = provision_on_broker(config)
    run = config.run
    topology = topology_for(config)
    with connect(done, server_user(run)) as server:
        server.publish(topology.exchange, "client.1.exit", *to_wire(Exit(run=run)))
    url = done.env(client_user(run, "0"))["BROKERFL_AMQP_URL"]
    seen = {}

    def look(ch):
        seen["ok"] = ch.queue_declare(topology.client_queue("1"), passive=True).method

    assert _refusal(url, look) == 0
    assert (seen["ok"].message_count, seen["ok"].consumer_count) == (1, 0)
    assert _refusal(url, lambda ch: ch.basic_get(topology.client_queue("1"))) == 403
    assert _refusal(url, lambda ch: ch.queue_purge(topology.client_queue("1"))) == 403


def _server_worker_of_nothing(transport, topology) -> Worker:
    """A server worker whose table handles nothing: what it receives is dead-lettered."""
    return Worker(transport, topology, topology.server_queue, HandlerTable("server"), None, name="server", prefetch=4)


@pytest.mark.timeout(180)
def test_a_dead_letter_of_a_huge_message_keeps_its_reason_and_an_excerpt(transport_factory, run_name):
    topology = RunTopology(run_name)
    transport = transport_factory()
    topology.declare(transport)
    worker = _server_worker_of_nothing(transport, topology)
    worker.start()
    huge = os.urandom(20 * MiB)  # past one chunk: the AMQP transport sends it as two messages
    publisher = transport_factory()
    publisher.publish(
        topology.exchange,
        "server.parameter_update",
        Envelope("parameter_update", "huge-1", "client.0", time.time(), {}),
        huge,
    )
    deadline = time.monotonic() + 120
    while worker.dead_lettered < 1:
        assert time.monotonic() < deadline, "the huge message was not dead-lettered"
        worker.step(0.2)
    dead = wait_for(lambda: transport.get(topology.dead_queue), 30, "the dead letter")
    transport.ack(dead)
    assert dead.envelope.message_id == "huge-1"
    assert dead.envelope.headers[REASON_HEADER].startswith("undecodable 'parameter_update' message")
    assert dead.envelope.headers[ORIGINAL_LENGTH_HEADER] == len(huge)
    assert dead.body == huge[:DEAD_LETTER_EXCERPT_BYTES]
    worker.stop()


# ---------------------------------------------------------------- limits, on a node of the test's own


def _limits_node_settings(amqp_url: str) -> tuple[str, int]:
    """BROKERFL_LIMITS_NODE / BROKERFL_LIMITS_PORT, else derived from the test broker's
    (``h9@localhost`` on 5685 -> ``h9lim@localhost`` on 6085: +100 is the TLS node's, +200 the
    cluster's, +300 the management test's)."""
    base = (os.environ.get("BROKERFL_RABBITMQ_NODE") or "rabbit@localhost").split("@")[0]
    name = os.environ.get("BROKERFL_LIMITS_NODE") or f"{base}lim@localhost"
    port = int(os.environ.get("BROKERFL_LIMITS_PORT") or (urlsplit(amqp_url).port or 5672) + 400)
    return name, port


@pytest.fixture
def limits_node(amqp_url):
    """A node of the test's own that loads a run's definitions and the ``rabbitmq.conf``
    fragment provision writes (``max_message_size``); stopped and removed after."""
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        if os.environ.get("BROKERFL_REQUIRE_BROKER") == "1":
            pytest.fail("starting a RabbitMQ node needs rabbitmq-server and root")
        pytest.skip(
            "starting a RabbitMQ node needs rabbitmq-server and root (to hand the node directory to the rabbitmq user)"
        )
    node, port = _limits_node_settings(amqp_url)
    base = Path(tempfile.mkdtemp(prefix="brokerfl-limits-"))
    config = secure_config("lim" + uuid.uuid4().hex[:8], clients=2, rounds=3)
    done = provision(config, base / "provision", host="localhost", port=port)
    shutil.copy(done.rabbitmq_conf, base / "rabbitmq.conf")
    (base / "enabled_plugins").write_text("[].\n")
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=True)
    base.chmod(0o755)
    env = node_env(node, port, base)
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            ["rabbitmqctl", "-n", node, "wait", "--timeout", "90", str(base / "pid")],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        wait_for(lambda: connect(done, f"{config.run}-admin").close() or True, 60, "the definitions loaded")
        yield config, done
    finally:
        subprocess.run(["rabbitmqctl", "-n", node, "stop"], env=env, capture_output=True, timeout=120, check=False)
        shutil.rmtree(base, ignore_errors=True)


def _connections_until_refused(url: str, most: int) -> tuple[int, str]:
    """Open connections until the broker refuses one (or ``most``); closes them; (opened, why)."""
    opened, why = [], ""
    try:
        while len(opened) < most:
            opened.append(pika.BlockingConnection(pika.URLParameters(url)))
    except px.AMQPConnectionError as exc:
        why = repr(exc)
    finally:
        for connection in opened:
            connection.close()
    return len(opened), why


def _channels_until_refused(url: str, most: int) -> tuple[int, str]:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    opened, why = 0, ""
    try:
        while opened < most:
            connection.channel()
            opened += 1
    except (px.ConnectionClosedByBroker, px.ChannelClosedByBroker) as exc:
        why = f"{exc.reply_code} {exc.reply_text}"
    finally:
        if connection.is_open:
            connection.close()
    return opened, why


@pytest.mark.timeout(420)
def test_connections_channels_and_sizes_past_the_limits_are_refused_while_the_run_goes_on(limits_node):
    config, done = limits_node
    run = config.run
    limits = BrokerLimits()
    topology = topology_for(config)
    url = done.env(client_user(run, "0"))["BROKERFL_AMQP_URL"]
    outcome: dict[str, object] = {}
    errors: list[BaseException] = []

    def attack() -> None:
        try:
            with connect(done, f"{run}-admin") as admin:  # once client 0 consumes: the run is under way
                wait_for(lambda: admin.queue_info(topology.client_queue("0")).consumers >= 1, 120, "client 0 consuming")
            outcome["connections"] = _connections_until_refused(url, 10 * limits.client_connections)
            outcome["channels"] = _channels_until_refused(url, 10 * limits.client_channels)
            key = "server.parameter_update"
            outcome["one byte too many"] = _refusal(
                url,
                lambda ch: (
                    ch.confirm_delivery(),
                    ch.basic_publish(topology.exchange, key, b"x" * (limits.max_message_bytes + 1)),
                ),
            )
            outcome["at the limit"] = _refusal(
                url,
                lambda ch: (
                    ch.confirm_delivery(),
                    ch.basic_publish(
                        topology.exchange,
                        key,
                        b"x" * limits.max_message_bytes,
                        pika.BasicProperties(
                            type="parameter_update", message_id="junk-1", user_id=client_user(run, "0")
                        ),
                    ),
                ),
            )
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=attack, daemon=True)

    def connect_as(client_id):
        if client_id == "0":
            thread.start()
        return connect(done, server_user(run) if client_id is None else client_user(run, client_id))

    records, _, server_transport = run_federation(config, connect_as)
    thread.join(120)
    try:
        assert not errors, errors
        assert [r["num_updates"] for r in records] == [config.clients] * config.rounds
        opened, why = outcome["connections"]
        assert opened < limits.client_connections and "connection limit" in why, (
            outcome
        )  # client 0's own two are counted too
        opened, why = outcome["channels"]
        assert opened < limits.client_channels and why.startswith("530") and "channels" in why, outcome
        assert outcome["one byte too many"] == 406 and outcome["at the limit"] == 0, outcome
        # the junk at the limit reached the server, which dead-lettered a bounded copy of it
        dead_letters = {}
        while (d := server_transport.get(topology.dead_queue)) is not None:
            dead_letters[d.envelope.message_id] = d
            server_transport.ack(d)
        junk = dead_letters["junk-1"]
        assert (
            len(junk.body) == DEAD_LETTER_EXCERPT_BYTES
            and junk.envelope.headers[ORIGINAL_LENGTH_HEADER] == limits.max_message_bytes
        )
    finally:
        server_transport.close()


def test_the_run_registry_takes_the_servers_records_only_and_only_the_admin_reads_it(provision_on_broker):
    """The run registry (brokerfl.ops.runs) of a provisioned run: the server appends through
    the run's exchange (topic ``runs.*``); a client may neither route a record to it nor read
    it; the server may not read it (other runs' records may share the vhost); the admin lists
    the run from it."""
    from brokerfl.ops.runs import list_runs
    from brokerfl.runtime.identity import admin_user
    from brokerfl.runtime.operator_commands import RunRecord
    from brokerfl.transports.topology import REGISTRY_STREAM

    config = secure_config("r" + uuid.uuid4().hex[:10], clients=2, rounds=1)
    done = provision_on_broker(config)
    run = config.run
    topology = topology_for(config)
    with connect(done, server_user(run)) as server:
        server.publish(topology.exchange, "runs.run_record", *to_wire(RunRecord(event="started", run=run, rounds=1)))
    forged = to_wire(RunRecord(event="finished", run=run, reason="forged"))[1]

    def publish_record(ch):
        ch.confirm_delivery()
        ch.basic_publish(topology.exchange, "runs.run_record", forged, pika.BasicProperties(type="run_record"))

    def read_registry(ch):
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(REGISTRY_STREAM, lambda *_: None, arguments={"x-stream-offset": "first"})

    client_url = done.env(client_user(run, "0"))["BROKERFL_AMQP_URL"]
    assert _refusal(client_url, publish_record) == 403
    assert _refusal(client_url, read_registry) == 403
    assert _refusal(done.env(server_user(run))["BROKERFL_AMQP_URL"], read_registry) == 403
    with connect(done, admin_user(run)) as admin:
        (summary,) = [s for s in list_runs(admin, timeout=10) if s.run == run]
    assert summary.state == "crashed" and summary.rounds == 1  # recorded, and no server consumes its queue


def test_each_participant_publishes_its_own_logs_only_and_only_the_admin_reads_them(provision_on_broker):
    """The logs exchange takes a client's records under its own routing key only, the
    server's under ``server.log_records`` only; the logs stream is the admin's to read."""
    from brokerfl.runtime.remote_log import LogRecords

    config = secure_config("r" + uuid.uuid4().hex[:10], clients=2, rounds=1)
    done = provision_on_broker(config)
    run = config.run
    topology = topology_for(config)
    client_url = done.env(client_user(run, "0"))["BROKERFL_AMQP_URL"]
    server_url = done.env(server_user(run))["BROKERFL_AMQP_URL"]
    admin_url = done.env(f"{run}-admin")["BROKERFL_AMQP_URL"]
    envelope, body = to_wire(LogRecords(run=run, records=['{"event": "x"}']))

    def publish(key: str):
        def operation(ch):
            ch.confirm_delivery()
            ch.basic_publish(topology.logs_exchange, key, body)

        return operation

    def consume(ch):  # from the next record on: none is delivered (a stream takes no nack at the close)
        ch.basic_qos(prefetch_count=1)
        ch.basic_consume(topology.logs_stream, lambda *a: None, arguments={"x-stream-offset": "next"})

    assert _refusal(client_url, publish("client.0.log_records")) == 0
    assert _refusal(client_url, publish("client.1.log_records")) == 403  # another client's
    assert _refusal(client_url, publish("server.log_records")) == 403  # the server's
    assert _refusal(client_url, consume) == 403
    assert _refusal(server_url, publish("server.log_records")) == 0
    assert _refusal(server_url, publish("client.0.log_records")) == 403
    assert _refusal(server_url, consume) == 403
    assert _refusal(admin_url, consume) == 0
    # the shipper and the reader as the processes run them: the client's batch is read back
    # as client 0's; the raw publishes above carry no user_id and are skipped
    from brokerfl.ops.remote_logs import Skipped, read_log_batches, records
    from brokerfl.runtime.log import LogBuffer
    from brokerfl.runtime.remote_log import flush, log_shipper

    with connect(done, client_user(run, "0")) as client, connect(done, f"{run}-admin") as admin:
        shipper = log_shipper(client, topology, "client.0", buffer=LogBuffer())
        shipper.state.buffer.add({"time": 1.0, "level": "info", "event": "hello from 0", "client": "1"})
        flush(shipper)
        skipped = Skipped()
        shown = list(records(read_log_batches(admin, topology), run, enforce_identity=True, skipped=skipped))
    assert [(r["site"], r["client"], r["event"]) for r in shown] == [("client.0", "0", "hello from 0")]
    assert sum(skipped.counts.values()) == 2  # client 0's and the server's raw publishes
