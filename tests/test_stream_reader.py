"""StreamReader: the loop every reader of a stream shares (journal, models store), on both
transports."""

from __future__ import annotations

import pytest
from test_transport import envelope, wait_for

from brokerfl.transports.base import TransportError
from brokerfl.transports.stream_reader import StreamReader
from brokerfl.transports.topology import RunTopology


def test_a_reader_yields_acked_deliveries_from_an_offset_and_stops_at_a_mark_published_inside(
    transport_factory, run_name
):
    writer, reader = transport_factory(), transport_factory()
    topology = RunTopology(run_name)
    topology.declare(writer)
    for i in range(3):
        writer.publish(topology.exchange, f"server.m{i}", envelope(i), b"before")
    mark = envelope(99)
    got = []
    with StreamReader(
        reader, topology.journal_stream, offset="first", silence_s=30, what=lambda s: f"silent {s}"
    ) as stream:
        writer.publish(topology.exchange, "audit.mark", mark, b"")
        for delivery in stream:
            if delivery.envelope.message_id == mark.message_id:
                break
            got.append(delivery.envelope.headers["i"])
    assert got == [0, 1, 2]
    # Acked and cancelled: a second reader from "next" sees only what comes after it.
    with StreamReader(reader, topology.journal_stream, offset="next", silence_s=30, what=lambda s: "silent") as stream:
        later = envelope(7)
        writer.publish(topology.exchange, "server.later", later, b"after")
        assert next(iter(stream)).envelope.message_id == later.message_id


def test_a_silent_stream_is_a_transport_error_worded_by_the_caller(transport_factory, run_name):
    t = transport_factory()
    topology = RunTopology(run_name)
    topology.declare(t)
    with StreamReader(
        t, topology.journal_stream, offset="next", silence_s=0.3, what=lambda s: f"nothing for {s:g} s"
    ) as stream:
        with pytest.raises(TransportError, match=r"nothing for 0.3 s"):
            next(iter(stream))


def test_a_reader_must_be_read_inside_its_with_block(transport_factory, run_name):
    t = transport_factory()
    topology = RunTopology(run_name)
    topology.declare(t)
    with pytest.raises(RuntimeError, match="with block"):
        next(iter(StreamReader(t, topology.journal_stream, offset="first", silence_s=1, what=str)))


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_leaving_a_stream_with_deliveries_in_flight_keeps_the_connection(amqp_factory, run_name):
    """A stream takes acks only: RabbitMQ answers a basic.reject or basic.nack of a stream
    delivery by closing the whole connection (540 NOT_IMPLEMENTED). Readers leave a stream
    while deliveries are still coming (the journal reader stops at its mark, the models
    store at a version), and the deliveries pika holds undispatched or receives before
    cancel-ok must be dropped, not rejected: the connection (with its other consumers and
    their unacked deliveries) survives every such exit."""
    writer, reader = amqp_factory(), amqp_factory()
    topology = RunTopology(run_name)
    topology.declare(writer)
    for i in range(300):
        writer.publish(topology.exchange, f"server.m{i}", envelope(i), b"x" * 64)
    generation = reader._connection.generation
    for _attempt in range(10):
        with StreamReader(
            reader, topology.journal_stream, offset="first", prefetch=64, silence_s=30, what=lambda s: f"silent {s}"
        ) as stream:
            # a round trip on the same connection: meanwhile pika queues the stream's
            # deliveries undispatched, and more are on their way when the reader leaves
            reader.queue_info(topology.journal_stream)
            assert next(iter(stream)).envelope.headers["i"] == 0
        reader.queue_info(topology.journal_stream)  # the broker's close, if any, is read here
    reader.poll(0.2)
    assert reader._connection.generation == generation, (
        "the broker closed the reader's connection (a stream delivery was rejected)"
    )


@pytest.mark.timeout(60)
def test_a_nack_of_a_stream_delivery_only_returns_credit(transport_factory, run_name):
    """A stream keeps every message and takes no nack (RabbitMQ would close the
    connection): on either transport a nack, requeued or not, settles the delivery like an
    ack, nothing comes back, and the consumer reads on."""
    writer, reader = transport_factory(), transport_factory()
    topology = RunTopology(run_name)
    topology.declare(writer)
    for i in range(4):
        writer.publish(topology.exchange, f"server.m{i}", envelope(i), b"")
    got = []
    reader.consume(topology.journal_stream, got.append, prefetch=1, offset="first")
    for requeue in (True, False, True, False):
        seen = len(got)
        wait_for(reader, lambda seen=seen: len(got) > seen)
        reader.nack(got[-1], requeue=requeue)
    reader.poll(0.3)
    assert [d.envelope.headers["i"] for d in got] == [0, 1, 2, 3]
    assert not any(d.redelivered for d in got)
