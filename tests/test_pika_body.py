"""Chunks between pika and brokerfl without a chunk-sized copy. Publishing: GatheredBody,
from which pika writes the same frames as from the joined bytes (pika's own framing code
is run here, without a broker; over RabbitMQ see also
tests/test_transport.py::test_a_body_given_as_its_buffers_arrives_as_the_joined_bytes).
Receiving: a large chunk as pika's Fragments, placed or spilled part by part, with the
same outcomes, bit for bit, as from one bytes object."""

from __future__ import annotations

import os
import time
import types

import numpy as np
import pika.connection
import pytest
from pika import spec
from test_chunks_spill import corrupted

from brokerfl.transports.amqp import chunks
from brokerfl.transports.amqp.pika_body import (
    FRAGMENTS_MIN_BYTES,
    FragmentKeepingAssembler,
    Fragments,
    GatheredBody,
)


def _views(rng: np.random.Generator, sizes: list[int]) -> list[memoryview]:
    return [memoryview(rng.integers(0, 256, n, dtype=np.uint8)).cast("B") for n in sizes]


def frames_pika_writes(body: bytes, frame_body: int = 1000) -> list[bytes]:
    """What pika 1.3's ``Connection._send_message`` hands the socket for one publish."""
    written: list[bytes] = []
    connection = types.SimpleNamespace(_body_max_length=frame_body, _output_marshaled_frames=written.extend)
    method = spec.Basic.Publish(exchange="", routing_key="q", mandatory=True)
    pika.connection.Connection._send_message(connection, 1, method, (spec.BasicProperties(headers={"a": 1}), body))
    return written


@pytest.mark.parametrize("sizes", [[0], [1], [5000], [999, 1, 1000, 0, 3001], [1] * 37, [2500, 2500]])
def test_pika_writes_the_same_frames_from_the_views_as_from_the_joined_bytes(sizes):
    views = _views(np.random.default_rng(len(sizes)), sizes)
    joined = b"".join(views)
    gathered = GatheredBody(views)
    assert len(gathered) == len(joined) and bool(gathered) == bool(joined)
    assert frames_pika_writes(gathered) == frames_pika_writes(joined)


def test_any_slice_is_the_slice_of_the_joined_bytes():
    rng = np.random.default_rng(3)
    views = _views(rng, [7, 0, 300, 1, 64, 128])
    joined, gathered = b"".join(views), GatheredBody(views)
    for start in range(-3, len(joined) + 3, 5):
        for stop in (start - 1, start, start + 1, start + 70, len(joined), len(joined) + 9, None):
            assert gathered[start:stop] == joined[start:stop]
    assert bytes(gathered) == joined and gathered == joined and gathered != joined + b"x"


def test_a_gathered_body_refuses_what_pika_never_asks():
    gathered = GatheredBody([memoryview(b"abc")])
    with pytest.raises(TypeError):
        gathered[0]
    with pytest.raises(ValueError):
        gathered[::2]
    with pytest.raises(TypeError):
        hash(gathered)  # not the empty bytes' hash


def test_each_chunk_s_views_are_the_chunk_and_the_checksum_covers_them_all():
    parts = _views(np.random.default_rng(5), [10_000, 3, 70_000])
    body = b"".join(parts)
    as_views = list(chunks.split_views(parts, 4096, "m"))
    as_bytes = list(chunks.split(body, 4096, "m"))
    assert [(b"".join(v), h) for v, h in as_views] == as_bytes
    assert [frames_pika_writes(GatheredBody(v)) for v, _ in as_views] == [frames_pika_writes(p) for p, _ in as_bytes]


# ---------------------------------------------------------------- receiving: Fragments

KiB, MiB = 1024, 1024**2


def fragmented(part: bytes, rng: np.random.Generator) -> Fragments:
    """``part`` as pika's body frames might have cut it (uneven pieces, some empty)."""
    cuts = sorted(int(c) for c in rng.integers(0, len(part) + 1, 5))
    return Fragments([part[a:b] for a, b in zip([0, *cuts], [*cuts, len(part)])])


def parts_of(body: bytes, chunk_size: int, mid: str) -> list[tuple[chunks.ChunkInfo, bytes]]:
    return [(chunks.parse(headers), part) for part, headers in chunks.split(body, chunk_size, mid)]


@pytest.mark.parametrize("spill", [False, True])
def test_chunks_received_as_fragments_reassemble_bit_exactly_placed_or_spilled(spill):
    rng = np.random.default_rng(7)
    body = rng.bytes(3 * 16 * KiB + 123)
    parts = parts_of(body, 16 * KiB, "m")
    a = chunks.Assembler(spill_min_bytes=0 if spill else None, ram_partials=0)
    order = [2, 0, 0, 3, 1]  # out of order, and a publisher's retry of chunk 0
    outcomes = [a.add(parts[i][0], fragmented(parts[i][1], rng), handle=n) for n, i in enumerate(order)]
    assert all(isinstance(o, chunks.Held) for o in outcomes[:-1])
    done = outcomes[-1]
    assert isinstance(done, chunks.Complete) and type(done.body) is bytes and done.body == body
    assert done.handles == [1, 4, 0, 3, 2]  # index order, then the duplicate


def test_uneven_chunks_received_as_fragments_are_joined_as_they_came():
    rng = np.random.default_rng(8)
    body = rng.bytes(40 * KiB)
    infos = [chunks.parse(h) for _, h in chunks.split(body, 16 * KiB, "m")]
    sizes = [10 * KiB, 20 * KiB, 10 * KiB]  # another publisher's chunking: not placed
    pieces = [body[: sizes[0]], body[sizes[0] : sizes[0] + sizes[1]], body[sizes[0] + sizes[1] :]]
    a = chunks.Assembler()
    outcomes = [a.add(info, fragmented(piece, rng), handle=i) for i, (info, piece) in enumerate(zip(infos, pieces))]
    assert isinstance(outcomes[-1], chunks.Complete) and outcomes[-1].body == body


def test_a_corrupt_message_received_as_fragments_gives_back_bytes_as_received():
    rng = np.random.default_rng(9)
    parts = parts_of(rng.bytes(40 * KiB), 16 * KiB, "m")
    sent = [part if i != 1 else corrupted(part) for i, (_, part) in enumerate(parts)]
    for spill in (None, 0):
        a = chunks.Assembler(spill_min_bytes=spill, ram_partials=0)
        outcomes = [a.add(info, fragmented(s, rng), handle=i) for i, ((info, _), s) in enumerate(zip(parts, sent))]
        corrupt = outcomes[-1]
        assert isinstance(corrupt, chunks.Corrupt) and "checksum mismatch" in corrupt.reason
        assert corrupt.bodies == sent and all(type(b) is bytes for b in corrupt.bodies)


def _frames(headers: dict, body: bytes, frame_body: int = 64 * KiB) -> list:
    deliver = pika.frame.Method(1, spec.Basic.Deliver(consumer_tag="c", delivery_tag=1, exchange="", routing_key="q"))
    header = pika.frame.Header(1, len(body), spec.BasicProperties(headers=headers))
    return [deliver, header] + [pika.frame.Body(1, body[i : i + frame_body]) for i in range(0, len(body), frame_body)]


def _received(headers: dict, body: bytes) -> bytes | Fragments:
    assembler = FragmentKeepingAssembler(chunks.CHUNK_HEADER)
    results = [assembler.process(f) for f in _frames(headers, body)]
    assert all(r is None for r in results[:-1])
    return results[-1][2]


def test_pika_hands_on_a_large_chunk_as_its_fragments_and_anything_else_joined():
    body = os.urandom(FRAGMENTS_MIN_BYTES + 5)
    chunk = _received({chunks.CHUNK_HEADER: "0/2"}, body)
    assert isinstance(chunk, Fragments) and len(chunk.parts) > 1 and bytes(chunk) == body
    assert _received({chunks.CHUNK_HEADER: "0/2"}, body) is not chunk  # a new list per message
    whole = _received({"other": 1}, body)
    assert type(whole) is bytes and whole == body  # not a chunk: as pika gives it
    small = _received({chunks.CHUNK_HEADER: "0/2"}, body[: 100 * KiB])
    assert type(small) is bytes and small == body[: 100 * KiB]  # a small join costs nothing
    assert _received({chunks.CHUNK_HEADER: "0/1"}, b"") == b""


@pytest.mark.broker
def test_large_chunks_over_rabbitmq_arrive_whole_and_a_malformed_one_is_dead_lettered_with_its_length_and_an_excerpt(
    amqp_factory, amqp_url, run_name
):
    from brokerfl.transports.amqp.properties import to_properties
    from brokerfl.transports.base import DEAD_LETTER_EXCERPT_BYTES, ORIGINAL_LENGTH_HEADER
    from brokerfl.wire.message import Envelope

    producer, consumer = amqp_factory(chunk_size=MiB + 3), amqp_factory()
    queue, dead = f"brokerfl.{run_name}.q", f"brokerfl.{run_name}.dead"
    consumer.declare_queue(dead)
    consumer.declare_queue(queue, kind="quorum", dead_letter_queue=dead)
    body = os.urandom(3 * MiB + 77)  # 3 chunks of >= 1 MiB, and a short one
    producer.publish("", queue, Envelope(type="t", message_id="big", sender="s", timestamp=0.0), body)
    malformed = os.urandom(2 * MiB)
    properties = to_properties(
        Envelope(type="t", message_id="bad", sender="s", timestamp=0.0),
        {chunks.CHUNK_HEADER: "x/y", chunks.CHUNK_OF_HEADER: "bad"},
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.basic_publish("", queue, malformed, properties)
    got: list = []
    consumer.consume(queue, got.append, prefetch=4)
    deadline = time.monotonic() + 20
    while not got and time.monotonic() < deadline:
        consumer.poll(0.05)
    assert len(got) == 1 and got[0].body == body
    consumer.ack(got[0])
    dead_letter = None
    while dead_letter is None and time.monotonic() < deadline:
        consumer.poll(0.05)
        _, dead_properties, dead_letter = channel.basic_get(dead, auto_ack=True)
    connection.close()
    # the chunk's first bytes, joined from its fragments, and its length: never the whole body
    assert dead_letter == malformed[:DEAD_LETTER_EXCERPT_BYTES]
    assert dead_properties.headers[ORIGINAL_LENGTH_HEADER] == len(malformed)
