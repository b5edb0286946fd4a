"""StreamReader: the loop every reader of a stream shares (journal, models store), on both
transports."""

from __future__ import annotations

import pytest

from brokerfl.stream_reader import StreamReader
from brokerfl.topology import RunTopology
from brokerfl.transport import TransportError

from test_transport import envelope


def test_a_reader_yields_acked_deliveries_from_an_offset_and_stops_at_a_mark_published_inside(transport_factory, run_name):
    writer, reader = transport_factory(), transport_factory()
    topology = RunTopology(run_name)
    topology.declare(writer)
    for i in range(3):
        writer.publish(topology.exchange, f"server.m{i}", envelope(i), b"before")
    mark = envelope(99)
    got = []
    with StreamReader(reader, topology.journal_stream, offset="first", silence_s=30, what=lambda s: f"silent {s}") as stream:
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
    with StreamReader(t, topology.journal_stream, offset="next", silence_s=0.3, what=lambda s: f"nothing for {s:g} s") as stream:
        with pytest.raises(TransportError, match=r"nothing for 0.3 s"):
            next(iter(stream))


def test_a_reader_must_be_read_inside_its_with_block(transport_factory, run_name):
    t = transport_factory()
    topology = RunTopology(run_name)
    topology.declare(t)
    with pytest.raises(RuntimeError, match="with block"):
        next(iter(StreamReader(t, topology.journal_stream, offset="first", silence_s=1, what=str)))
