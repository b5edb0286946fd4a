"""Broker behaviour, on both transports (local and AMQP), plus AMQP-only failure modes.

Every wait is a poll with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
import xxhash
from test_chunks_spill import corrupted

from brokerfl.transports.amqp import chunks
from brokerfl.transports.base import REASON_HEADER, Delivery, Transport, TransportError, UnroutableError, body_size
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.codec import decode, encode_parts
from brokerfl.wire.message import Envelope

KiB, MiB = 1024, 1024**2
SMALL_CHUNKS = {"chunk_size": 64 * KiB}  # AMQP option; the local transport ignores it


def envelope(i: int = 0, **headers) -> Envelope:
    return Envelope(
        type="test_message",
        message_id=uuid.uuid4().hex,
        sender="tester",
        timestamp=time.time(),
        headers={"i": i, **headers},
    )


def wait_for(transports: Transport | list[Transport], done: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll ``transports`` until ``done()`` or the deadline (then fail)."""
    transports = transports if isinstance(transports, list) else [transports]
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        for t in transports:
            t.poll(0.05)


def collect(transport: Transport, queue: str, **consume_options) -> tuple[list[Delivery], str]:
    got: list[Delivery] = []
    tag = transport.consume(queue, got.append, **consume_options)
    return got, tag


def settle_quietly(transport: Transport, timeout: float = 0.3) -> None:
    """Poll for a while, to show that nothing (more) arrives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        transport.poll(0.05)


def queue_names(run: str, *names: str) -> list[str]:
    return [f"brokerfl.{run}.{n}" for n in names]


# ---------------------------------------------------------------- both transports


def test_topic_routing(transport_factory, run_name):
    t = transport_factory()
    exchange = f"brokerfl.{run_name}"
    t.declare_exchange(exchange)
    patterns = {
        "server": "server.#",
        "client7": "client.7.#",
        "star": "client.*.task",
        "bare": "client.*",
        "all": "#",
        "exact": "client.8.task",
        "mid": "client.#.extra",
        "tail": "#.task",
    }
    queues = {}
    for name, pattern in patterns.items():
        queues[name] = f"{exchange}.{name}"
        t.declare_queue(queues[name])
        t.bind(queues[name], exchange, pattern)
    expected = {
        "server.update": {"server", "all"},
        "server": {"server", "all"},  # '#' matches zero words
        "client.7.task": {"client7", "star", "all", "tail"},
        "client.7.task.extra": {"client7", "all", "mid"},  # '*' is exactly one word
        "client.8.task": {"star", "all", "exact", "tail"},
        "client.8": {"bare", "all"},
        "client.extra": {"bare", "all", "mid"},  # '#' inside a pattern matches zero words too
        "task": {"all", "tail"},
        "clients.exit": {"all"},
    }
    for key in expected:
        t.publish(exchange, key, envelope(), key.encode())
    for name, queue in queues.items():
        bodies = set()
        while (d := t.get(queue)) is not None:
            bodies.add(d.body.decode())
            t.ack(d)
        assert bodies == {k for k, names in expected.items() if name in names}, name
    for name in ("all", "bare", "mid"):  # their bindings go with them
        t.delete_queue(queues.pop(name))
    with pytest.raises(UnroutableError):
        t.publish(exchange, "client.extra", envelope(), b"")


def test_fifo_per_queue_and_envelope_roundtrip(transport_factory, run_name):
    producer, consumer = transport_factory(), transport_factory()
    (queue,) = queue_names(run_name, "fifo")
    producer.declare_queue(queue)
    sent = [envelope(i, run=run_name, round=3, ratio=0.25) for i in range(30)]
    for i, env in enumerate(sent):
        producer.publish("", queue, env, b"%d" % i)
    got, _ = collect(consumer, queue)
    wait_for(consumer, lambda: len(got) == 30)
    assert [d.body for d in got] == [b"%d" % i for i in range(30)]
    # exact float timestamp, float header, sender; stamped with the publisher's user
    assert [d.envelope for d in got] == [dataclasses.replace(e, user_id=producer.user) for e in sent]
    assert producer.user  # the connection's login (guest here)
    assert not any(d.redelivered for d in got)
    assert got[0].routing_key == queue and got[0].queue == queue
    for d in got:
        consumer.ack(d)
    consumer.close()
    assert producer.queue_info(queue).messages_ready == 0  # acked: gone, not requeued


def test_nack_requeue_is_redelivered_first(transport_factory, run_name):
    t = transport_factory()
    (queue,) = queue_names(run_name, "q")
    t.declare_queue(queue)
    first, second = envelope(1), envelope(2)
    t.publish("", queue, first, b"1")
    t.publish("", queue, second, b"2")
    got, _ = collect(t, queue, prefetch=1)
    wait_for(t, lambda: len(got) == 1)
    assert got[0].envelope.message_id == first.message_id and not got[0].redelivered
    t.nack(got[0], requeue=True)
    wait_for(t, lambda: len(got) == 2)
    assert got[1].envelope.message_id == first.message_id and got[1].redelivered and got[1].body == b"1"
    t.ack(got[1])
    wait_for(t, lambda: len(got) == 3)
    assert got[2].envelope.message_id == second.message_id and not got[2].redelivered
    t.ack(got[2])
    with pytest.raises(TransportError):
        t.ack(got[2])  # settled twice


def test_nack_without_requeue_and_dead_letter_go_to_the_dead_letter_queue(transport_factory, run_name):
    t = transport_factory()
    queue, dead = queue_names(run_name, "work", "dead")
    t.declare_queue(dead)
    t.declare_queue(queue, kind="quorum", dead_letter_queue=dead)
    rejected, poisoned = envelope(1), envelope(2)
    t.publish("", queue, rejected, b"rejected")
    t.publish("", queue, poisoned, b"poisoned")
    got, _ = collect(t, queue)
    wait_for(t, lambda: len(got) == 2)
    t.nack(got[0], requeue=False)
    t.dead_letter(got[1], "unknown message type")
    dead_letters = {}
    deadline = time.monotonic() + 10
    while len(dead_letters) < 2 and time.monotonic() < deadline:  # broker dead-lettering is asynchronous
        if (d := t.get(dead)) is not None:
            dead_letters[d.envelope.message_id] = d
            t.ack(d)
    assert set(dead_letters) == {rejected.message_id, poisoned.message_id}
    assert dead_letters[rejected.message_id].body == b"rejected"
    assert dead_letters[poisoned.message_id].body == b"poisoned"
    assert dead_letters[poisoned.message_id].envelope.headers[REASON_HEADER] == "unknown message type"
    t.close()
    other = transport_factory()
    assert other.queue_info(queue).messages_ready == 0


@pytest.mark.parametrize("how", ["cancel", "close"])
def test_unacked_messages_of_a_departed_consumer_are_redelivered(transport_factory, run_name, how):
    first, second = transport_factory(), transport_factory()
    (queue,) = queue_names(run_name, "q")
    first.declare_queue(queue)
    for i in range(5):
        first.publish("", queue, envelope(i), b"%d" % i)
    got, tag = collect(first, queue, prefetch=3)
    wait_for(first, lambda: len(got) == 3)
    first.ack(got[0])  # this one stays acked
    if how == "cancel":
        first.cancel(tag)
    else:
        first.close()
    again, _ = collect(second, queue)
    wait_for(second, lambda: len(again) == 4)
    assert [d.body for d in again] == [b"1", b"2", b"3", b"4"]
    # 1 and 2 were seen and left unacked; 3 may have been prefetched unseen (AMQP flags
    # it redelivered, the local broker never handed it out); 4 was never delivered.
    assert [d.redelivered for d in again[:2]] == [True, True] and not again[3].redelivered
    if how == "cancel":
        settle_quietly(first, 0.2)
        assert len(got) == 3  # the cancelled consumer gets nothing more


def test_prefetch_bounds_unacked_deliveries(transport_factory, run_name):
    producer, t = transport_factory(), transport_factory()
    (queue,) = queue_names(run_name, "q")
    producer.declare_queue(queue)
    for i in range(6):
        producer.publish("", queue, envelope(i), b"%d" % i)
    got, _ = collect(t, queue, prefetch=2)
    wait_for(t, lambda: len(got) == 2)
    settle_quietly(t)
    assert len(got) == 2
    t.ack(got[0])
    wait_for(t, lambda: len(got) == 3)
    settle_quietly(t)
    assert len(got) == 3
    for d in got[1:]:
        t.ack(d)
    wait_for(t, lambda: len(got) == 5)
    assert [d.body for d in got] == [b"%d" % i for i in range(5)]


def test_unroutable_publish_raises(transport_factory, run_name):
    t = transport_factory()
    exchange = f"brokerfl.{run_name}"
    (queue,) = queue_names(run_name, "server")
    t.declare_exchange(exchange)
    t.declare_queue(queue)
    t.bind(queue, exchange, "server.#")
    with pytest.raises(UnroutableError):
        t.publish(exchange, "client.7.task", envelope(), b"x")
    with pytest.raises(UnroutableError):
        t.publish("", f"{queue}.missing", envelope(), b"x")
    t.publish(exchange, "server.update", envelope(), b"routed")  # the transport still works
    assert t.get(queue).body == b"routed"


def test_stream_consumed_from_first(transport_factory, run_name):
    t = transport_factory(**SMALL_CHUNKS)
    topology = RunTopology(run_name)
    topology.declare(t)
    big = os.urandom(200 * KiB)  # chunked on AMQP; a stream reassembles too
    bodies = [b"a", big, b"c"]
    for i, body in enumerate(bodies):
        t.publish(topology.exchange, f"server.m{i}", envelope(i), body)
    reader = transport_factory()
    got, _ = collect(reader, topology.journal_stream, prefetch=10, offset="first")
    wait_for(reader, lambda: len(got) == 3)
    assert [d.body for d in got] == bodies
    assert [d.routing_key for d in got] == ["server.m0", "server.m1", "server.m2"]
    for d in got:
        reader.ack(d)


def test_chunked_body_is_one_delivery_settled_whole(transport_factory, run_name):
    producer, consumer = transport_factory(**SMALL_CHUNKS), transport_factory()
    queue, dead = queue_names(run_name, "server", "dead")
    producer.declare_queue(dead)
    producer.declare_queue(queue, kind="quorum", dead_letter_queue=dead)
    body = os.urandom(3 * MiB + 123)  # 49 chunks of 64 KiB
    sent = envelope(7, run=run_name)
    producer.publish("", queue, sent, body)
    producer.publish("", queue, envelope(8), b"small")
    got, tag = collect(consumer, queue, prefetch=1)
    wait_for(consumer, lambda: len(got) == 1)
    assert got[0].body == body and isinstance(got[0].body, bytes)
    assert got[0].envelope == dataclasses.replace(sent, user_id=producer.user)
    settle_quietly(consumer, 0.2)
    assert len(got) == 1  # prefetch counts whole messages
    consumer.nack(got[0], requeue=True)  # every chunk goes back...
    # (a quorum queue on RabbitMQ 3.x requeues at the back, so "small" may come first)
    wait_for(consumer, lambda: len(got) == 2)
    consumer.ack(got[1])  # every chunk is acked
    wait_for(consumer, lambda: len(got) == 3)
    consumer.ack(got[2])
    big = [d for d in got[1:] if d.envelope.message_id == sent.message_id]
    assert len(big) == 1 and big[0].body == body and big[0].redelivered  # ...and comes back whole
    assert {d.body for d in got[1:]} == {body, b"small"}
    consumer.cancel(tag)  # would requeue any chunk left unacked
    assert producer.queue_info(queue).messages_ready == 0


def test_a_body_given_as_its_buffers_arrives_as_the_joined_bytes(transport_factory, run_name):
    # what a worker publishes: the encoded body's buffers (the tensors' own memory), which the
    # AMQP transport hands pika as they are (GatheredBody): pika's frames are the only copy
    producer, consumer = transport_factory(**SMALL_CHUNKS), transport_factory()
    queue = queue_names(run_name, "server")[0]
    producer.declare_queue(queue, kind="quorum")
    rng = np.random.default_rng(1)
    weights = rng.standard_normal(400_000).astype(np.float32)
    big = encode_parts({"w": weights, "b": rng.integers(0, 9, 1001), "note": "x"})
    small = encode_parts({"w": np.arange(10, dtype=np.float32)})
    assert body_size(big) > 64 * KiB > body_size(small)  # chunked, and not
    producer.publish("", queue, envelope(1), big)
    producer.publish("", queue, envelope(2), small)
    got, tag = collect(consumer, queue, prefetch=2)
    wait_for(consumer, lambda: len(got) == 2)
    assert [d.body for d in got] == [b"".join(big), b"".join(small)] and all(isinstance(d.body, bytes) for d in got)
    assert np.array_equal(decode(got[0].body)["w"], weights)
    for d in got:
        consumer.ack(d)
    consumer.cancel(tag)
    with pytest.raises(TypeError):
        producer.publish("", queue, envelope(3), memoryview(b"x"))


def test_split_of_a_body_s_buffers_is_the_split_of_its_bytes():
    rng = np.random.default_rng(2)
    for n in (0, 1, 1000, 50_000):
        parts = encode_parts(
            {"a": rng.standard_normal(n).astype(np.float32), "b": rng.integers(0, 9, n // 3), "s": "x"}
        )
        body = b"".join(parts)
        for chunk_size in (1, 7, 64, 4096, 10**6):
            if len(body) // chunk_size > 20_000:
                continue
            from_parts, from_bytes = (
                list(chunks.split(parts, chunk_size, "m")),
                list(chunks.split(body, chunk_size, "m")),
            )
            assert from_parts == from_bytes  # the same bytes and headers, checksum included
            assert all(type(part) is bytes for part, _ in from_parts)
            assert from_parts[-1][1][chunks.XXH3_HEADER] == xxhash.xxh3_128_hexdigest(body)


def test_chunked_messages_from_two_publishers_interleave(transport_factory, run_name):
    (queue,) = queue_names(run_name, "server")
    consumer = transport_factory()
    consumer.declare_queue(queue, kind="quorum")
    publishers = [transport_factory(**SMALL_CHUNKS) for _ in range(2)]
    bodies = [os.urandom(2 * MiB + 1), os.urandom(3 * MiB - 1)]
    envelopes = [envelope(0), envelope(1)]
    errors: list[BaseException] = []

    def send(i: int) -> None:
        try:
            publishers[i].publish("", queue, envelopes[i], bodies[i])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    got, _ = collect(consumer, queue, prefetch=1)
    wait_for(consumer, lambda: len(got) == 1, timeout=30)
    settle_quietly(consumer, 0.1)
    assert len(got) == 1  # prefetch=1 holds, even with two messages partly received
    consumer.ack(got[0])
    wait_for(consumer, lambda: len(got) == 2, timeout=30)
    consumer.ack(got[1])
    for thread in threads:
        thread.join()
    assert not errors
    by_id = {d.envelope.message_id: d.body for d in got}
    assert by_id == {envelopes[0].message_id: bodies[0], envelopes[1].message_id: bodies[1]}


def test_get_reassembles_chunked_messages(transport_factory, run_name):
    t = transport_factory(**SMALL_CHUNKS)
    (queue,) = queue_names(run_name, "q")
    t.declare_queue(queue)
    bodies = [os.urandom(300 * KiB), b"small", os.urandom(200 * KiB)]
    for i, body in enumerate(bodies):
        t.publish("", queue, envelope(i), body)
    got = [t.get(queue) for _ in bodies]
    assert [d.body for d in got] == bodies
    assert t.get(queue) is None
    t.nack(got[0])  # requeued whole
    again = t.get(queue)
    assert again.body == bodies[0] and again.redelivered
    for d in [*got[1:], again]:
        t.ack(d)
    assert t.get(queue) is None


def test_callbacks_may_publish_and_settle(transport_factory, run_name):
    t = transport_factory()
    requests, replies = queue_names(run_name, "requests", "replies")
    t.declare_queue(requests)
    t.declare_queue(replies)
    for i in range(5):
        t.publish("", requests, envelope(i), b"%d" % i)

    def answer(d: Delivery) -> None:
        t.publish("", replies, envelope(int(d.body)), d.body + b"!")  # confirmed inside the callback
        t.ack(d)

    t.consume(requests, answer, prefetch=2)
    got, _ = collect(t, replies)
    ran = 0
    deadline = time.monotonic() + 15
    while len(got) < 5 and time.monotonic() < deadline:
        ran += t.poll(0.05)
    assert [d.body for d in got] == [b"%d!" % i for i in range(5)]
    assert ran >= 10  # poll counts the callbacks it ran: 5 requests and 5 replies
    assert t.queue_info(requests).messages_ready == 0


# ---------------------------------------------------------------- AMQP only


@pytest.mark.broker
def test_unreachable_broker_is_one_clear_error(capfd):
    from brokerfl.transports.amqp import AmqpTransport

    url = "amqp://guest:s3cret@127.0.0.1:1/"
    started = time.monotonic()
    with pytest.raises(TransportError) as info:
        AmqpTransport(url, connect_timeout=2)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "127.0.0.1:1" in message and "s3cret" not in message and "***" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


@pytest.mark.broker
def test_wrong_password_is_one_clear_error(amqp_url):
    from brokerfl.transports.amqp import AmqpTransport

    bad = (
        amqp_url.replace("://", "://nobody-here:wrong@", 1)
        if "@" not in amqp_url
        else "amqp://nobody-here:wrong@" + amqp_url.split("@", 1)[1]
    )
    with pytest.raises(TransportError, match="ACCESS_REFUSED|authentication"):
        AmqpTransport(bad)


@pytest.mark.broker
def test_oversized_message_is_a_clear_error_not_a_hang(amqp_factory, amqp_url, run_name):
    t = amqp_factory(chunk_size=1024 * MiB)  # chunking off, in effect
    (queue,) = queue_names(run_name, "big")
    t.declare_queue(queue)
    with pytest.raises(TransportError, match="max_message_size"):
        t.publish(
            "", queue, envelope(), bytes(128 * MiB + 1)
        )  # above the default limit (128 MiB on 3.x, 16 MiB on 4.x)
    t.publish("", queue, envelope(), b"still works")
    assert t.get(queue).body == b"still works"


@pytest.mark.broker
def test_redeclare_with_other_arguments_is_a_clear_error(amqp_factory, amqp_url, run_name):
    t = amqp_factory()
    (queue,) = queue_names(run_name, "q")
    t.declare_queue(queue)
    with pytest.raises(TransportError, match="x-queue-type"):
        t.declare_queue(queue, kind="quorum")
    t.declare_queue(queue)  # the declaring channel was reopened
    assert t.queue_info(queue).messages_ready == 0
    with pytest.raises(TransportError, match="no queue"):
        t.queue_info(queue + ".missing")


@pytest.mark.broker
@pytest.mark.parametrize("spill_min_bytes", [None, 0], ids=["in-ram", "spilled"])
def test_interleaved_and_corrupt_chunks(amqp_factory, amqp_url, run_name, spill_min_bytes):
    """Chunks of two messages interleaved chunk by chunk in one queue are reassembled by
    message id; a message whose checksum fails is dead-lettered, every chunk, with the reason
    and its bytes as received (whether reassembly held them in RAM or in a file)."""
    from brokerfl.transports.amqp import chunks
    from brokerfl.transports.amqp.properties import DEAD_CHUNK_HEADER

    t = amqp_factory(spill_min_bytes=spill_min_bytes)
    queue, dead = queue_names(run_name, "server", "dead")
    t.declare_queue(dead)
    t.declare_queue(queue, dead_letter_queue=dead)
    a, b, bad = os.urandom(10 * KiB), os.urandom(7 * KiB), os.urandom(5 * KiB)
    ea, eb, ebad = envelope(1), envelope(2), envelope(3)
    lists = [chunked(ea, a, 2 * KiB), chunked(eb, b, 2 * KiB), chunked(ebad, bad, 2 * KiB)]
    props, part = lists[2][1]
    lists[2][1] = (props, corrupted(part))  # in transit
    publish_raw(amqp_url, queue, [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)])
    got, _ = collect(t, queue, prefetch=1)
    wait_for(t, lambda: len(got) == 1)
    t.ack(got[0])
    wait_for(t, lambda: len(got) == 2)
    t.ack(got[1])
    assert {d.envelope.message_id: d.body for d in got} == {ea.message_id: a, eb.message_id: b}
    # the dead-letter queue holds the corrupt message's chunks, each with the reason
    dead_letters = read_raw(amqp_url, dead, 3, poll=t, bodies=True)
    assert sorted(body for _, body in dead_letters) == sorted(part for _, part in lists[2])
    dead_letters = [headers for headers, _ in dead_letters]
    # each says which chunk it was, in one string (not chunk headers: nothing reassembles a dead letter)
    assert all(
        "checksum mismatch" in h[REASON_HEADER]
        and h[DEAD_CHUNK_HEADER].endswith(f" of {ebad.message_id}")
        and chunks.CHUNK_OF_HEADER not in h
        for h in dead_letters
    )
    settle_quietly(t, 0.2)
    assert len(got) == 2


def publish_raw(url: str, queue: str, messages: list) -> None:
    """Publish (properties, body) pairs with plain pika, in this order."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.confirm_delivery()
    for properties, body in messages:
        channel.basic_publish("", queue, body, properties)
    connection.close()


def chunked(env: Envelope, body: bytes, chunk_size: int) -> list:
    from brokerfl.transports.amqp import chunks
    from brokerfl.transports.amqp.properties import to_properties

    return [(to_properties(env, headers), part) for part, headers in chunks.split(body, chunk_size, env.message_id)]


@pytest.mark.broker
def test_duplicate_chunks_of_a_publisher_retry_are_settled_with_their_message(amqp_factory, amqp_url, run_name):
    t = amqp_factory()
    (queue,) = queue_names(run_name, "q")
    t.declare_queue(queue)
    env, body = envelope(), os.urandom(5 * KiB)
    parts = chunked(env, body, 2 * KiB)
    # a retry after a lost confirm resends a chunk; one more copy arrives after the end
    publish_raw(amqp_url, queue, [parts[0], parts[1], parts[1], parts[2], parts[2]])
    got, _ = collect(t, queue, prefetch=1)
    wait_for(t, lambda: len(got) == 1)
    settle_quietly(t, 0.2)
    assert len(got) == 1 and got[0].body == body
    t.ack(got[0])
    settle_quietly(t, 0.2)
    assert len(got) == 1
    t.close()
    assert amqp_factory().queue_info(queue).messages_ready == 0  # every copy was acked


@pytest.mark.broker
def test_held_chunked_messages_are_handed_out_one_per_poll(amqp_factory, run_name):
    """Chunked messages that complete together (their last chunks arrived in one read) are
    handed out one per poll, so each can be handled (and its body freed) before the next
    is reassembled; none is lost, and the consumer may hold them all (logical prefetch)."""
    producer, consumer = amqp_factory(**SMALL_CHUNKS), amqp_factory()
    (queue,) = queue_names(run_name, "q")
    producer.declare_queue(queue, kind="quorum")
    bodies = [os.urandom(3 * 64 * KiB - 100 - i) for i in range(6)]  # 3 chunks each
    for i, body in enumerate(bodies):
        producer.publish("", queue, envelope(i), body)
    got: list[Delivery] = []
    tag = consumer.consume(queue, got.append, prefetch=16)
    handed = []
    deadline = time.monotonic() + 15
    while len(got) < len(bodies) and time.monotonic() < deadline:
        handed.append(consumer.poll(0.05))
    assert [d.body for d in got] == bodies  # none acked: all six held at once
    assert max(handed) == 1
    for d in got:
        consumer.ack(d)
    consumer.cancel(tag)
    assert producer.queue_info(queue).messages_ready == 0


@pytest.mark.broker
def test_incomplete_chunked_message_is_dead_lettered_after_chunk_timeout(amqp_factory, amqp_url, run_name):
    from brokerfl.transports.amqp.properties import DEAD_CHUNK_HEADER, to_properties

    t = amqp_factory(chunk_timeout=0.3)
    queue, dead = queue_names(run_name, "q", "dead")
    t.declare_queue(dead)
    t.declare_queue(queue, dead_letter_queue=dead)
    orphan = envelope()
    parts = chunked(orphan, os.urandom(5 * KiB), 2 * KiB)
    publish_raw(amqp_url, queue, parts[:2] + [(to_properties(envelope()), b"whole")])  # its publisher died
    got, _ = collect(t, queue, prefetch=1)
    wait_for(t, lambda: len(got) == 1)
    assert got[0].body == b"whole"  # partial chunks do not count against prefetch
    t.ack(got[0])
    dead_letters = read_raw(amqp_url, dead, 2, poll=t)
    assert [h[DEAD_CHUNK_HEADER].split(" ")[0] for h in dead_letters] == ["0/3", "1/3"]
    assert all(
        "only 2 of 3 chunks" in h[REASON_HEADER] and h[DEAD_CHUNK_HEADER].endswith(f" of {orphan.message_id}")
        for h in dead_letters
    )


def read_raw(url: str, queue: str, n: int, poll: Transport, timeout: float = 10.0, bodies: bool = False) -> list:
    """The headers (with ``bodies``: ``(headers, body)``) of the next ``n`` messages of
    ``queue``, taken with plain pika (acked), polling ``poll`` meanwhile."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    found = []
    deadline = time.monotonic() + timeout
    while len(found) < n and time.monotonic() < deadline:
        poll.poll(0.02)
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            found.append((properties.headers, body) if bodies else properties.headers)
    connection.close()
    return found


@pytest.mark.broker
def test_survives_a_broker_restart(amqp_factory, amqp_url, run_name, restart_broker):
    producer = amqp_factory(max_reconnect_s=60, chunk_size=64 * KiB)
    consumer = amqp_factory(max_reconnect_s=60)
    topology = RunTopology(run_name)
    topology.declare(producer)
    queue = topology.declare_client(producer, "c1")
    published: list[str] = []

    def send(body: bytes = b"x") -> None:
        env = envelope(len(published))
        producer.publish(topology.exchange, "client.c1.task", env, body)
        published.append(env.message_id)

    for _ in range(10):
        send()
    send(os.urandom(300 * KiB))  # chunked
    received: dict[str, Delivery] = {}
    unacked: list[Delivery] = []
    acking = False

    copies: Counter[str] = Counter()

    def on_delivery(d: Delivery) -> None:
        received.setdefault(d.envelope.message_id, d)
        copies[d.envelope.message_id] += 1
        consumer.ack(d) if acking else unacked.append(d)

    consumer.consume(queue, on_delivery, prefetch=3)
    wait_for(consumer, lambda: len(received) == 3)
    held = list(received.values())
    consumer.ack(unacked.pop(0))  # acked before the restart: must not come back
    # Restart while publishing: publishes during the outage wait for the broker.
    restarting = threading.Thread(target=restart_broker)
    restarting.start()
    while restarting.is_alive():
        send(os.urandom(200 * KiB) if len(published) % 2 else b"x")  # chunked ones too
        consumer.poll(0)  # the consumer notices too, and reconnects by itself
    restarting.join()
    send()  # a publish after the restart works
    assert held[1] in unacked
    for d in unacked:
        consumer.ack(d)  # some from the dead connection: logged and dropped, not a crash
    acking = True
    missing = lambda: set(published) - set(received)  # noqa: E731
    wait_for(consumer, lambda: not missing(), timeout=60)  # the same consumer resumes
    assert len(published) > 12
    assert copies[held[0].envelope.message_id] == 1  # acked before the restart: not redelivered
    assert copies[held[1].envelope.message_id] == 2  # unacked at the restart: redelivered
    settle_quietly(consumer, 0.3)
    consumer.close()
    assert producer.queue_info(queue).messages_ready == 0  # all acked after the restart


def test_assembler_checks_xxh3_and_the_older_sha256_checksum():
    """Chunks carry an XXH3-128 checksum; bodies chunked by older versions (a journal keeps
    them) carry SHA-256 and are still checked. A body that does not match is Corrupt."""
    import dataclasses
    import hashlib

    from brokerfl.transports.amqp import chunks

    body = os.urandom(10 * KiB)
    infos = [chunks.parse(headers) for _, headers in chunks.split(body, 4 * KiB, "m")]
    assert infos[-1].xxh3 is not None and infos[-1].sha256 is None
    older = infos[:-1] + [dataclasses.replace(infos[-1], xxh3=None, sha256=hashlib.sha256(body).hexdigest())]
    parts = [body[i : i + 4 * KiB] for i in range(0, len(body), 4 * KiB)]
    for case in (infos, older):
        a = chunks.Assembler()
        outcomes = [a.add(info, part, handle=i) for i, (info, part) in enumerate(zip(case, parts))]
        assert isinstance(outcomes[-1], chunks.Complete) and outcomes[-1].body == body
        a = chunks.Assembler()
        outcomes = [
            a.add(info, corrupted(part) if i == 1 else part, handle=i)
            for i, (info, part) in enumerate(zip(case, parts))
        ]
        assert isinstance(outcomes[-1], chunks.Corrupt) and "checksum mismatch" in outcomes[-1].reason
