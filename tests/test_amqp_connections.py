"""The AMQP transport publishes on a connection of its own.

While pika waits for a publish's confirm it reads whatever arrives on that connection. When
publishing shared the consumers' connection, a server waiting for the confirm of its model's
publish read the chunks of incoming updates meanwhile, up to the prefetch (16 MiB each),
before anything could spill them: its memory peaked above 5x the model in some runs
(docs/benchmarks/server-memory.md).
"""

from __future__ import annotations

import time

import pytest
from test_transport import envelope

from brokerfl.transports.base import Delivery

pytestmark = pytest.mark.broker


def test_waiting_for_a_confirm_reads_no_deliveries(amqp_factory, run_name):
    sender, transport = amqp_factory(), amqp_factory()
    inbound, outbound = f"brokerfl.{run_name}.inbound", f"brokerfl.{run_name}.outbound"
    for queue in (inbound, outbound):
        sender.declare_queue(queue)
    got: list[Delivery] = []
    transport.consume(inbound, got.append, prefetch=16)
    sent = [envelope(i) for i in range(8)]
    for e in sent:
        sender.publish("", inbound, e, b"x" * 100_000)
    deadline = time.monotonic() + 15  # the broker has sent them all to the consumer
    while sender.queue_info(inbound).messages_ready and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sender.queue_info(inbound).messages_ready == 0

    transport.publish("", outbound, envelope(99), b"y" * 100_000)
    consumer = next(iter(transport._consumers.consumers.values()))
    # pika's per-channel queue of deliveries read off the socket and not yet dispatched
    assert not consumer.channel._pending_events, "the publish read deliveries while it waited for its confirm"
    assert not transport._consumers.received

    deadline = time.monotonic() + 15
    while len(got) < len(sent) and time.monotonic() < deadline:
        transport.poll(0.05)
    assert [d.envelope.message_id for d in got] == [e.message_id for e in sent]
    for d in got:
        transport.ack(d)


def test_an_idle_publishing_connection_is_kept_alive_by_polling(amqp_factory, run_name):
    """pika sends heartbeats only inside its calls; a process that polls and does not
    publish for longer than two heartbeats must not lose its publishing connection."""
    transport = amqp_factory(heartbeat=1)
    queue = f"brokerfl.{run_name}.idle"
    transport.declare_queue(queue)
    transport.consume(queue, lambda d: None, prefetch=1)
    generation = transport._connection.generation
    deadline = time.monotonic() + 5  # the broker closes a connection silent for 2 heartbeats
    while time.monotonic() < deadline:
        transport.poll(0.2)
    assert transport._connection.publisher.is_open
    transport.publish("", queue, envelope(1), b"after an idle spell")
    assert transport._connection.generation == generation, "the publishing connection was lost while idle and reopened"
