"""AMQP only: a broker that stops answering one connection (as a RabbitMQ channel did whose
quorum queue lost its leader: the publisher confirm never came, and pika waits for it
without a limit while heartbeats keep the connection alive). A TCP proxy between the
transport and the broker freezes the broker's side of the connections open at the time.
The local transport has no connection that could stop answering.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import pytest
from test_transport import envelope

from brokerfl.transports.amqp import AmqpTransport
from brokerfl.transports.base import Delivery, TransportError

pytestmark = pytest.mark.broker


class FreezingProxy:
    """Forwards TCP to the broker; :meth:`freeze` stops passing the broker's bytes to the
    connections open now (they stay open: nothing tells the client), new ones work.
    :meth:`sever` closes the connections open now; ``handshake_cuts`` = n closes each of
    the next n new connections in the middle of its AMQP handshake (as a broker going down
    again while clients reconnect does)."""

    def __init__(self, host: str, port: int, listen_port: int = 0) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", listen_port))
        self.port = self.listener.getsockname()[1]
        self.frozen: set[int] = set()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.handshake_cuts = 0
        self.cut = 0  # connections cut in their handshake so far
        self.closed_by_client: set[int] = set()  # connections (their index) the client closed
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            broker = socket.create_connection(self.target)
            self.pairs.append((client, broker))
            index = len(self.pairs) - 1
            cut = self.handshake_cuts > 0
            self.handshake_cuts -= cut
            threading.Thread(target=self._pump, args=(client, broker, None, cut, index), daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, index), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, index: int | None, cut: bool = False, client_of: int | None = None
    ) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    if client_of is not None:
                        self.closed_by_client.add(client_of)
                    break
                sent += 1
                if cut and sent == 2:  # the client's answer to connection.start (its login)
                    self.cut += 1
                    break
                while index in self.frozen and not self.closed:
                    time.sleep(0.05)  # a test proxy's idle wait, not synchronisation
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def freeze(self) -> None:
        self.frozen.update(range(len(self.pairs)))

    def sever(self) -> None:
        for pair in self.pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for pair in self.pairs:
            for s in pair:
                s.close()


@pytest.fixture
def proxied_url(amqp_url):
    parts = urlsplit(amqp_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    netloc = parts.netloc.rsplit("@", 1)
    yield (
        proxy,
        urlunsplit(parts._replace(netloc=(netloc[0] + "@" if len(netloc) > 1 else "") + f"127.0.0.1:{proxy.port}")),
    )
    proxy.close()


def test_a_publish_whose_confirm_never_comes_is_published_again_on_a_new_connection(
    amqp_factory, proxied_url, run_name
):
    """A consumer holds a delivery and the process publishes; the broker's side of the
    connection goes silent. The publish returns (on a new connection) within about
    ``confirm_timeout``, instead of waiting forever; the held delivery comes back (its
    connection was aborted) and nothing is lost."""
    proxy, url = proxied_url
    admin = amqp_factory()
    queue = f"brokerfl.{run_name}.unanswered"
    admin.declare_queue(queue, kind="quorum")
    transport = AmqpTransport(url, confirm_timeout=1.0, max_reconnect_s=30)
    amqp_factory.made.append(transport)  # closed with the others
    got: list[Delivery] = []
    transport.consume(queue, got.append, prefetch=1)
    first = envelope(1)
    admin.publish("", queue, first, b"held")
    deadline = time.monotonic() + 15
    while not got and time.monotonic() < deadline:
        transport.poll(0.05)
    assert [d.envelope.message_id for d in got] == [first.message_id]

    proxy.freeze()
    second = envelope(2)
    started = time.monotonic()
    transport.publish("", queue, second, b"published while frozen")
    took = time.monotonic() - started
    assert took < 15, took  # about confirm_timeout plus a reconnect; before: forever

    transport.ack(got[0])  # of the aborted connection: dropped (logged), the broker redelivers it
    copies: Counter[str] = Counter()

    def take(d: Delivery) -> None:
        copies[d.envelope.message_id] += 1
        transport.ack(d)

    got.clear()
    deadline = time.monotonic() + 30
    while set(copies) != {first.message_id, second.message_id} and time.monotonic() < deadline:
        transport.poll(0.05)
        while got:
            take(got.pop(0))
    assert set(copies) == {first.message_id, second.message_id}, copies
    assert copies[first.message_id] == 1  # redelivered once, after its connection was aborted
    # the frozen connection's copy of the publish may have reached the queue too: at-least-once
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and admin.queue_info(queue).messages_ready:
        transport.poll(0.05)
        while got:
            take(got.pop(0))
    assert admin.queue_info(queue).messages_ready == 0
    assert copies[second.message_id] in (1, 2)


def test_a_connection_cut_in_its_handshake_while_reconnecting_is_retried(amqp_factory, proxied_url, run_name):
    """Two broker restarts close together: the second one cuts the new connection in its
    handshake, which pika reports as a "probable authentication error". That is retried
    (it was taken for bad credentials: a server gave up at once, "could not reconnect
    within 60 s", 1.5 s after the first loss), while a real refusal still fails at once."""
    proxy, url = proxied_url
    admin = amqp_factory()
    queue = f"brokerfl.{run_name}.q"
    admin.declare_queue(queue)
    transport = AmqpTransport(url, max_reconnect_s=30)
    amqp_factory.made.append(transport)
    transport.publish("", queue, envelope(1), b"before")
    proxy.handshake_cuts = 2
    proxy.sever()
    transport.publish("", queue, envelope(2), b"after")  # reconnects through two cut handshakes
    assert proxy.cut == 2
    assert admin.queue_info(queue).messages_ready == 2

    parts = urlsplit(url)
    wrong = urlunsplit(parts._replace(netloc=f"guest:wrong@127.0.0.1:{proxy.port}"))
    started = time.monotonic()
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        AmqpTransport(wrong, max_reconnect_s=30)
    assert time.monotonic() - started < 10  # not retried for max_reconnect_s


def _poll_until(transport: AmqpTransport, condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        transport.poll(0.05)


@pytest.mark.timeout(120)
def test_connections_given_up_on_are_closed_at_once(amqp_factory, proxied_url, run_name):
    """The broker's side of the connections goes silent; the publish whose confirm never
    comes gives them up and goes on on new ones. Both old connections are closed by the
    client at once, the publishing one too (pika's abort only stops using a socket and leaves
    it open until its I/O loop runs again, which it never does on a dropped connection: the
    broker kept it, and whatever its channels held, until heartbeats timed it out, and for
    ever without heartbeats, as here)."""
    proxy, url = proxied_url
    admin = amqp_factory()
    queue = f"brokerfl.{run_name}.given-up"
    admin.declare_queue(queue, kind="quorum")
    transport = AmqpTransport(url, confirm_timeout=1.0, max_reconnect_s=30, heartbeat=0)
    amqp_factory.made.append(transport)
    got: list[Delivery] = []
    transport.consume(queue, got.append, prefetch=1)
    admin.publish("", queue, envelope(1), b"held")
    _poll_until(transport, lambda: got, 15)
    assert len(got) == 1
    old = [
        transport._connection.conn,
        transport._connection.publisher,
    ]  # kept alive here: no garbage collection closes them
    assert len(proxy.pairs) == 2

    proxy.freeze()
    transport.publish("", queue, envelope(2), b"published while frozen")
    deadline = time.monotonic() + 10
    while proxy.closed_by_client != {0, 1} and time.monotonic() < deadline:
        time.sleep(0.05)  # the proxy's threads see the close; polled with a deadline
    assert proxy.closed_by_client >= {0, 1}, (proxy.closed_by_client, [c.is_open for c in old])


@pytest.mark.timeout(120)
def test_a_transport_whose_reconnect_failed_connects_again_on_its_next_call(amqp_factory, proxied_url, run_name):
    """The broker is away for longer than ``max_reconnect_s`` (a cluster slow to fail
    over): the publish that noticed fails with a TransportError, and the worker gives its
    delivery back (a nack). The transport's next calls connect again and carry on: the
    delivery comes back, a publish goes through. Before, the failed reconnect left it
    without a connection and every later call raised AttributeError ('NoneType' object has
    no attribute 'process_data_events'): the process died once the broker was back."""
    proxy, url = proxied_url
    admin = amqp_factory()
    queue = f"brokerfl.{run_name}.slow-failover"
    admin.declare_queue(queue, kind="quorum")
    transport = AmqpTransport(url, max_reconnect_s=1.0)
    amqp_factory.made.append(transport)
    got: list[Delivery] = []
    transport.consume(queue, got.append, prefetch=1)
    first = envelope(1)
    admin.publish("", queue, first, b"in hand")
    _poll_until(transport, lambda: got, 15)
    assert [d.envelope.message_id for d in got] == [first.message_id]

    proxy.handshake_cuts = 10**6  # every new connection is cut in its handshake: the broker is away
    proxy.sever()
    with pytest.raises(TransportError, match="could not reconnect"):
        transport.publish("", queue, envelope(2), b"while the broker is away")
    transport.nack(got.pop())  # as the worker does: its connection is gone, the broker has it back
    proxy.handshake_cuts = 0  # the broker is back

    _poll_until(transport, lambda: got, 30)
    assert [d.envelope.message_id for d in got] == [first.message_id]
    assert got[0].redelivered
    transport.ack(got[0])
    second = envelope(3)
    transport.publish("", queue, second, b"after")
    _poll_until(transport, lambda: len(got) > 1, 15)
    assert [d.envelope.message_id for d in got[1:]] == [second.message_id]
    transport.ack(got[1])
    assert admin.queue_info(queue).messages_ready == 0


def test_deliveries_in_hand_when_the_broker_closes_the_connection_are_processed(amqp_factory, broker, run_name):
    """Three consumers on one connection, as in a client process (prefetch 1); each handler
    publishes its answer (confirmed) and acks; one of them holds its deliveries and acks them
    two at a time (as the server holds updates until a commit; prefetch 2). The broker closes every connection
    twice mid-run. Every message is answered, whatever was in hand or in flight came back,
    and once the consumers are closed nothing is left unacked."""
    why_not = broker.can_restart()  # the same condition: a local rabbitmqctl
    if why_not:
        pytest.skip(f"needs rabbitmqctl for the test broker: {why_not}")
    admin = amqp_factory()
    worker = amqp_factory(max_reconnect_s=60)
    queues = [f"brokerfl.{run_name}.in{i}" for i in range(3)]
    answers = f"brokerfl.{run_name}.answers"
    for q in [*queues, answers]:
        admin.declare_queue(q, kind="quorum")
    sent = {q: [] for q in queues}
    for i in range(8):
        for q in queues:
            env = envelope(i)
            admin.publish("", q, env, b"task")
            sent[q].append(env.message_id)
    answered: Counter[str] = Counter()
    held: list[Delivery] = []

    def handler(hold: bool):
        def on_delivery(d: Delivery) -> None:
            worker.publish("", answers, envelope(0, answers=d.envelope.message_id), b"answer")
            answered[d.envelope.message_id] += 1
            if hold:
                held.append(d)
                if len(held) >= 2:  # a "commit"
                    for h in held:
                        worker.ack(h)
                    held.clear()
            else:
                worker.ack(d)

        return on_delivery

    for i, q in enumerate(queues):
        worker.consume(q, handler(hold=i == 0), prefetch=2 if i == 0 else 1)  # room for what it holds
    everything = {m for ids in sent.values() for m in ids}
    for closes in (1, 2):
        deadline = time.monotonic() + 60
        while len(answered) < 6 * closes and time.monotonic() < deadline:
            worker.poll(0.05)
        assert len(answered) >= 6 * closes, answered
        broker.rabbitmqctl("close_all_connections", "test: the broker closes every connection")
    deadline = time.monotonic() + 90
    while set(answered) != everything and time.monotonic() < deadline:
        worker.poll(0.05)
    assert set(answered) == everything, len(everything - set(answered))
    assert all(n <= 3 for n in answered.values()), answered  # a copy per connection at most
    for h in held:
        worker.ack(h)
    worker.close()  # what is still unacked goes back to its queue
    assert [admin.queue_info(q).messages_ready for q in queues] == [0, 0, 0]
    assert admin.queue_info(answers).messages_ready >= len(everything)


def test_a_nacked_publish_is_published_again_on_a_new_channel(amqp_factory, amqp_url, run_name):
    """A full queue that rejects publishes (``x-overflow: reject-publish``) makes the broker
    nack. The transport publishes again with backoff, each time on a new channel (RabbitMQ
    3.10 kept nacking a channel whose first publish to a quorum queue came while its leader
    was being re-elected: see tests/test_cluster.py), and the publish returns once there is
    room, with the message in the queue exactly once."""
    import pika

    queue = f"brokerfl.{run_name}.full"
    raw = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = raw.channel()
        ch.queue_declare(queue, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        transport = amqp_factory()
        transport.publish("", queue, envelope(1), b"fills the queue")
        first_channel = transport._connection.pub
        published = threading.Event()
        failure: list[BaseException] = []

        def publish() -> None:
            try:
                transport.publish("", queue, envelope(2), b"nacked until there is room")
                published.set()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                failure.append(exc)

        thread = threading.Thread(target=publish)
        thread.start()
        deadline = time.monotonic() + 20
        while transport._connection.pub is first_channel and time.monotonic() < deadline and not failure:
            time.sleep(0.01)  # polling the transport's state with a deadline
        assert transport._connection.pub is not first_channel, "the nacked publish stayed on its channel"
        assert not first_channel.is_open
        assert not published.is_set()
        method, _, body = ch.basic_get(queue, auto_ack=True)  # room for one
        assert body == b"fills the queue"
        thread.join(timeout=30)
        assert not thread.is_alive() and not failure, failure
        assert published.is_set()
        method, _, body = ch.basic_get(queue, auto_ack=True)
        assert body == b"nacked until there is room"
        assert ch.basic_get(queue, auto_ack=True)[0] is None  # exactly once
    finally:
        if raw.is_open:
            raw.channel().queue_delete(queue)
            raw.close()
