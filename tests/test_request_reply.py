"""Request/reply (RabbitMQ's direct reply-to) on both transports: a request reaches its
queue's consumer with a private reply address; the reply reaches only its requester; no
responder means None after the timeout; a reply to a requester that is gone is dropped."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from brokerfl.transports.base import Delivery, TransportError, UnroutableError
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.message import Envelope


def envelope(kind: str = "ask") -> Envelope:
    return Envelope(
        type=kind, message_id=uuid.uuid4().hex, sender="tester", timestamp=time.time(), headers={"run": "x"}
    )


def serve(transport, queue: str, stop: threading.Event, seen: list[Delivery]) -> None:
    """A responder: answers every request with its body reversed."""

    def answer(delivery: Delivery) -> None:
        seen.append(delivery)
        transport.reply(delivery, envelope("answer"), delivery.body[::-1])
        transport.ack(delivery)

    transport.consume(queue, answer)
    while not stop.is_set():
        transport.poll(0.05)


def test_a_request_gets_its_reply(transport_factory, run_name):
    topology = RunTopology(run_name, journal=False)
    requester, responder = transport_factory(), transport_factory()
    topology.declare(requester)
    stop, seen = threading.Event(), []
    thread = threading.Thread(target=serve, args=(responder, topology.server_queue, stop, seen), daemon=True)
    thread.start()
    try:
        for body in (b"abc", b"xyz"):
            reply = requester.request(topology.exchange, "server.ask", envelope(), body, timeout=10)
            assert reply is not None
            reply_envelope, reply_body = reply
            assert reply_body == body[::-1] and reply_envelope.type == "answer"
        assert all(d.reply_to for d in seen) and seen[0].reply_to != seen[1].reply_to  # one private address per request
    finally:
        stop.set()
        thread.join(10)


def test_no_responder_times_out_and_the_request_expires(transport_factory, run_name):
    topology = RunTopology(run_name, journal=False)
    requester, responder = transport_factory(), transport_factory()
    topology.declare(requester)
    started = time.monotonic()
    assert requester.request(topology.exchange, "server.ask", envelope(), b"anyone?", timeout=0.5) is None
    assert time.monotonic() - started >= 0.5
    assert responder.get(topology.server_queue) is None  # nobody waits for it any more: gone


def test_a_reply_to_a_requester_that_is_gone_is_dropped(transport_factory, run_name):
    topology = RunTopology(run_name, journal=False)
    requester, responder = transport_factory(), transport_factory()
    topology.declare(requester)
    taken: list[Delivery] = []
    tag = responder.consume(topology.server_queue, taken.append)

    def take_and_leave() -> None:  # the responder takes the request but answers only after the wait
        deadline = time.monotonic() + 10
        while not taken and time.monotonic() < deadline:
            responder.poll(0.05)

    thread = threading.Thread(target=take_and_leave)
    thread.start()
    assert requester.request(topology.exchange, "server.ask", envelope(), b"slow", timeout=1.0) is None
    thread.join(15)
    assert taken and taken[0].reply_to
    responder.reply(taken[0], envelope("answer"), b"too late")  # dropped, no error
    responder.ack(taken[0])
    with pytest.raises(TransportError):
        responder.reply(Delivery("q", "", "k", envelope(), b"", False, None), envelope("answer"), b"")
    # both connections still work, and the late reply did not reach the next request
    responder.cancel(tag)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(responder, topology.server_queue, stop, []), daemon=True)
    thread.start()
    try:
        reply = requester.request(topology.exchange, "server.ask", envelope(), b"again", timeout=10)
        assert reply is not None and reply[1] == b"niaga"
    finally:
        stop.set()
        thread.join(10)


def test_a_request_nobody_can_receive_is_unroutable(transport_factory, run_name):
    topology = RunTopology(run_name, journal=False)
    requester = transport_factory()
    topology.declare(requester)
    with pytest.raises(UnroutableError):
        requester.request(topology.exchange, "nobody.ask", envelope(), b"?", timeout=0.5)
