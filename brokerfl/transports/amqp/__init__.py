"""The AMQP transport: pika's BlockingConnection against RabbitMQ.

Semantics match :mod:`brokerfl.transports.local` (see :mod:`brokerfl.transports.base`).
:class:`AmqpTransport` (this module: construction, topology, publishing, request/reply)
is composed of parts, one concept each, each given what it needs when it is made:
:class:`~brokerfl.transports.amqp.connection.AmqpConnection` (connect, reconnect, retry,
publish with confirms, error classification), :class:`~brokerfl.transports.amqp.consuming.Consumers`
(consumers, reassembly, hand-out, ``get``, settling what it handed out) and
:class:`~brokerfl.transports.amqp.settling.Settler` (ack, nack and dead-lettering of AMQP
deliveries); :mod:`~brokerfl.transports.amqp.deliveries` has the records they share. How
it works:

- **Envelope.** AMQP properties and headers (:mod:`brokerfl.transports.amqp.properties`).
- **Channels.** One confirm-mode channel publishes (``mandatory``: unroutable is an error),
  on a connection of its own (so waiting for a confirm reads no deliveries); on the other,
  one declares (a refused redeclare closes it, so it is reopened), one serves ``get``, and
  each consumer has its own: ``cancel`` closes it, which is the only way to make RabbitMQ
  give back a consumer's unacked deliveries (``basic.cancel`` leaves them unacked). A
  stream takes acks only (a nack or reject closes the connection): a nack of a stream
  delivery is sent as an ack, and on a stream consumer's way out pika drops what it holds
  instead of rejecting it (``amqp_consuming._never_reject``).
- **Callbacks** run in :meth:`poll`, outside pika's dispatch: pika's callbacks only record
  what arrived, so user callbacks may publish, ack, cancel or consume freely.
- **Large bodies** are chunked (:mod:`brokerfl.transports.amqp.chunks`) and handed to the
  consumer as one :class:`Delivery` that settles every chunk. Prefetch counts *logical*
  messages: chunks of a message still being received do not count. RabbitMQ cannot change
  an existing consumer's prefetch (``basic.qos`` applies to the next ``basic.consume``), so
  when a queue consumer's AMQP prefetch is used up by chunks while it holds fewer than
  ``prefetch`` whole messages, it re-subscribes (cancel, qos, consume on the same channel;
  its unacked deliveries stay valid) with room for exactly the logical messages it may still
  take. Reassembly hands out one completed message per poll, so several completing at once
  are not all in memory before the consumer has handled the first. A stream consumer
  instead acks chunks as they arrive (an ack only returns credit on a stream) and holds
  only a message's last chunk until the message is settled.
- **Reconnect.** A lost connection is noticed by whatever call hits it; that call reconnects
  with exponential backoff (up to ``max_reconnect_s``), redeclares everything declared on
  this transport, re-creates the consumers, and carries on (a publish is retried from the
  first unconfirmed chunk: at-least-once, consumers dedupe by message id; so is a publish
  whose confirm does not come within ``confirm_timeout``, on a new connection). Deliveries of
  the lost connection are dropped from the inbox and cannot be settled any more; the broker
  redelivers them, so settling one logs a warning instead of failing.
- **Leases** (:meth:`hold_lease`) are exclusive queues, taken again first after a
  reconnect: a lease another connection took meanwhile raises :class:`LeaseLost` and no
  consumer is re-created (the role it stood for is someone else's).
- **Cluster.** ``url`` may name several nodes of a RabbitMQ cluster (a list, or commas):
  pika tries them in order, and a reconnect tries the node it lost last.

Limits worth knowing:

- pika's BlockingConnection sends heartbeats only inside pika calls: a callback that runs
  longer than about two ``heartbeat`` intervals loses the connection (its message is then
  redelivered). Keep long work out of callbacks (a worker runs it aside:
  ``Context.run_aside``; :meth:`AmqpTransport.wake` ends the poll when it is done), or
  pass ``heartbeat=0``.
- Chunks of one message must reach one consumer: give a queue that carries chunked
  messages one consumer at a time (or ``x-single-active-consumer``). Chunks split between
  consumers are dead-lettered after ``chunk_timeout``.
- On RabbitMQ 3.x a quorum queue puts a ``nack(requeue=True)`` message at the back, not
  the head; a classic queue (and the local transport) puts it back in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from operator import methodcaller
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika.exceptions as px
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from brokerfl.transports.amqp import chunks
from brokerfl.transports.amqp.connect import TlsOptions, broker_urls, cluster_parameters
from brokerfl.transports.amqp.connection import (
    RECV_BYTES,
    AmqpConnection,
    ChannelLimitError,
    _channel_error,
    _quietly,
    _recovering,
    _tune_reads,
    mask_url,
)
from brokerfl.transports.amqp.consuming import STREAM_CREDIT, Consumers
from brokerfl.transports.amqp.pika_body import GatheredBody
from brokerfl.transports.amqp.properties import to_envelope, to_properties
from brokerfl.transports.amqp.settling import Settler
from brokerfl.transports.base import (
    REPLY_TO,
    Body,
    Delivery,
    LeaseLost,
    OnDelivery,
    QueueInfo,
    QueueKind,
    StreamOffset,
    Transport,
    TransportError,
    UnroutableError,
    body_size,
)
from brokerfl.wire.message import Envelope

log = structlog.get_logger("brokerfl.amqp")

# Re-exported: benchmarks and tools import these from here.
__all__ = ["AmqpTransport", "ChannelLimitError", "RECV_BYTES", "STREAM_CREDIT", "mask_url", "_tune_reads"]


DEFAULT_HEARTBEAT_S = 30


def queue_arguments(
    kind: QueueKind,
    *,
    dead_letter_queue: str | None = None,
    max_length_bytes: int | None = None,
    max_age: str | None = None,
    single_active_consumer: bool = False,
) -> dict[str, Any]:
    """A queue's AMQP arguments, as this transport declares it and as ``brokerfl provision``
    writes it into the definitions (RabbitMQ refuses a redeclare whose arguments differ)."""
    arguments: dict[str, Any] = {}
    if single_active_consumer:
        arguments["x-single-active-consumer"] = True
    if kind in ("quorum", "stream"):
        arguments["x-queue-type"] = kind
    if kind == "stream":
        if max_length_bytes is not None:
            arguments["x-max-length-bytes"] = max_length_bytes
        if max_age is not None:
            arguments["x-max-age"] = max_age
    elif dead_letter_queue is not None:
        # nack(requeue=False) lands in the dead-letter queue through the default exchange
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = dead_letter_queue
    return arguments


class AmqpTransport(Transport):
    """A connection to RabbitMQ; used by one thread."""

    def __init__(
        self,
        url: str | list[str],
        *,
        chunk_size: int = 16 * 1024**2,
        heartbeat: int | None = None,
        connect_timeout: float = 10.0,
        max_reconnect_s: float = 60.0,
        confirm_timeout: float = 30.0,
        chunk_timeout: float = 300.0,
        max_partial_messages: int = chunks.MAX_PARTIALS,
        max_partial_bytes: int = chunks.MAX_PARTIAL_BYTES,
        max_partial_bytes_per_sender: int = chunks.MAX_PARTIAL_BYTES_PER_SENDER,
        spill_min_bytes: int | None = chunks.SPILL_MIN_BYTES,
        spill_dir: str | None = None,
        tls: TlsOptions | None = None,
        retry_start: bool = False,
    ) -> None:
        """``confirm_timeout``: a publish whose confirm does not come within this long is
        published again on a new connection (the old one is aborted; see
        :meth:`AmqpConnection.bounded`; a connection blocked by a resource alarm waits on).
        ``chunk_timeout``: a partly received chunked message that gets no chunk for this
        long is dead-lettered (its publisher died, or its chunks went to another consumer
        of the queue: one consumer per queue that carries chunked messages).
        ``max_partial_*``: per consumer, how many incomplete chunked messages and how many
        of their bytes (in all, and from one sender) are held; past them the least recently
        fed incomplete message is dead-lettered (see :class:`chunks.Assembler`).
        ``spill_min_bytes``: chunked messages at least this long that arrive interleaved
        with one already being reassembled are reassembled in an anonymous temporary file in
        ``spill_dir`` (default: the system's temporary directory), not in RAM, so a consumer
        receiving several large bodies at once holds one of them in RAM, not all (see
        :mod:`brokerfl.transports.amqp.chunks`); None: all in RAM. ``tls``: CA,
        certificate and key for ``amqps://`` URLs (default: ``BROKERFL_TLS_*``; see
        :mod:`brokerfl.transports.amqp.connect`). ``retry_start``: the first connection is retried
        like a reconnect (up to ``max_reconnect_s``) instead of failing at once. ``heartbeat``:
        the AMQP heartbeat in seconds (0: none); None: the URL's ``?heartbeat=`` if it names
        one, else :data:`DEFAULT_HEARTBEAT_S`."""
        super().__init__()
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        # ``url``: one node, or a cluster's nodes (a list, or commas): see transports/connect.py
        self.url = url if isinstance(url, str) else ",".join(url)
        self.safe_url = mask_url(self.url)
        self.chunk_size = chunk_size
        try:
            nodes, self.user = cluster_parameters(url, tls)
        except Exception as exc:
            raise TransportError(f"bad AMQP URL {self.safe_url}: {exc}") from None
        for node_url, params in zip(broker_urls(url), nodes):
            if heartbeat is not None or "heartbeat" not in parse_qs(urlsplit(node_url).query):
                params.heartbeat = DEFAULT_HEARTBEAT_S if heartbeat is None else heartbeat
            params.socket_timeout = connect_timeout
            params.stack_timeout = connect_timeout
            params.connection_attempts = 1
            params.client_properties = {"connection_name": "brokerfl"}
        # What to redeclare after a reconnect (dicts as ordered sets).
        self._exchanges: dict[str, None] = {}
        self._queues: dict[str, tuple[QueueKind, dict[str, Any]]] = {}
        self._bindings: dict[tuple[str, str, str], None] = {}
        self._leases: dict[str, None] = {}  # exclusive queues this connection holds (hold_lease)
        self._connection = AmqpConnection(
            nodes,
            self.safe_url,
            max_reconnect_s=max_reconnect_s,
            confirm_timeout=confirm_timeout,
            restore=self._restore,
        )
        self._settler = Settler(self._connection, user=self.user, dead_letter_targets=self._dead_letter_targets)
        bounds = {
            "max_partials": max_partial_messages,
            "max_bytes": max_partial_bytes,
            "max_bytes_per_sender": max_partial_bytes_per_sender,
            "spill_min_bytes": spill_min_bytes,
            "spill_dir": spill_dir,
        }
        self._consumers = Consumers(
            self._connection,
            self._settler,
            declared_kind=self._declared_kind,
            queue_info=self.queue_info,
            chunk_timeout=chunk_timeout,
            assembler_bounds=bounds,
        )
        if retry_start:
            self._connection.connect_first()
        else:
            self._connection.connect()

    @property
    def max_reconnect_s(self) -> float:
        return self._connection.max_reconnect_s

    @property
    def confirm_timeout(self) -> float:
        return self._connection.confirm_timeout

    @property
    def chunk_timeout(self) -> float:
        return self._consumers.chunk_timeout

    def _declared_kind(self, queue: str) -> QueueKind | None:
        """The kind of a queue declared on this transport; None if it was not."""
        declared = self._queues.get(queue)
        return None if declared is None else declared[0]

    # ------------------------------------------------------------ the connection's

    def channel_limit(self) -> int:
        """Channels the broker allows on this connection (channel_max, as negotiated)."""
        return self._connection.channel_limit()

    def consumer_capacity(self) -> int:
        """How many consumers (one channel each) fit beside this transport's own channels
        (admin, get, a request's)."""
        return self._connection.consumer_capacity()

    def _restore(self) -> int:
        """After a reconnect: leases, declarations, then consumers (how many there are)."""
        self._retake_leases()
        steps: list[tuple[str, Callable[[BlockingChannel], Any]]] = []  # each called with the admin channel
        for name in self._exchanges:
            steps.append(
                (f"exchange {name}", methodcaller("exchange_declare", name, exchange_type="topic", durable=True))
            )
        for name, (_, arguments) in self._queues.items():
            steps.append((f"queue {name}", methodcaller("queue_declare", name, durable=True, arguments=arguments)))
        for queue, exchange, pattern in self._bindings:
            steps.append(
                (f"binding {queue} {exchange} {pattern}", methodcaller("queue_bind", queue, exchange, pattern))
            )
        for what, step in steps:
            try:
                step(self._connection.admin_channel())
            except px.ChannelClosedByBroker as exc:
                self._connection.admin = self._connection.channel()
                if _recovering(exc.reply_text):  # a restarted broker still loading its queues
                    raise TransportError(f"redeclare {what}: {exc.reply_text}") from None
                log.error("amqp.redeclare_failed", what=what, error=exc.reply_text)  # redeclared otherwise meanwhile
        return self._consumers.restore()

    def _retake_leases(self) -> None:
        """Take this connection's leases again, before anything else is restored: one that
        another connection took while this one was lost ends this transport's consumers
        (the role's messages are that one's now) and raises :class:`LeaseLost`."""
        for name in list(self._leases):
            try:
                self._connection.admin_channel().queue_declare(name, exclusive=True, auto_delete=True)
            except px.ChannelClosedByBroker as exc:
                self._connection.admin = self._connection.channel()
                if "RESOURCE_LOCKED" not in exc.reply_text:
                    raise TransportError(f"take the lease {name!r} again: {exc.reply_text}") from None
                self._leases.clear()
                self._consumers.forget_all()
                log.warning("amqp.lease_lost", lease=name)
                raise LeaseLost(f"another connection holds the lease {name!r} now") from None

    # ------------------------------------------------------------ topology

    def declare_exchange(self, name: str) -> None:
        if name:
            self._connection.admin_op(
                f"declare exchange {name!r}", lambda ch: ch.exchange_declare(name, exchange_type="topic", durable=True)
            )
            self._exchanges[name] = None

    def _declare_queue(
        self,
        name: str,
        *,
        kind: QueueKind,
        dead_letter_queue: str | None,
        max_length_bytes: int | None,
        max_age: str | None,
        single_active_consumer: bool = False,
    ) -> None:
        arguments = queue_arguments(
            kind,
            dead_letter_queue=dead_letter_queue,
            max_length_bytes=max_length_bytes,
            max_age=max_age,
            single_active_consumer=single_active_consumer,
        )
        try:
            self._connection.admin_op(
                f"declare {kind} queue {name!r} with {arguments}",
                lambda ch: ch.queue_declare(name, durable=True, arguments=arguments),
            )
        except TransportError as exc:
            # Naming a dead-letter exchange needs write access to it (here the default
            # exchange), which a least-privilege user lacks: then the operator's policy
            # (``brokerfl provision`` writes one) dead-letters this queue's rejects instead.
            if not (dead_letter_queue is not None and "ACCESS_REFUSED" in str(exc) and "amq.default" in str(exc)):
                raise
            arguments = {k: v for k, v in arguments.items() if not k.startswith("x-dead-letter-")}
            self._connection.admin_op(
                f"declare {kind} queue {name!r} with {arguments}",
                lambda ch: ch.queue_declare(name, durable=True, arguments=arguments),
            )
        self._queues[name] = (kind, arguments)

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        self._connection.admin_op(
            f"bind {queue!r} to {exchange!r} with {pattern!r}", lambda ch: ch.queue_bind(queue, exchange, pattern)
        )
        self._bindings[(queue, exchange, pattern)] = None

    def delete_queue(self, name: str) -> None:
        self._consumers.cancel_queue(name)
        self._connection.admin_op(f"delete queue {name!r}", lambda ch: ch.queue_delete(name))
        self._queues.pop(name, None)
        self._consumers.drop_get_assembler(name)
        self._bindings = {b: None for b in self._bindings if b[0] != name}

    def delete_exchange(self, name: str) -> None:
        if name:
            self._connection.admin_op(f"delete exchange {name!r}", lambda ch: ch.exchange_delete(name))
            self._exchanges.pop(name, None)
            self._bindings = {b: None for b in self._bindings if b[1] != name}

    def hold_lease(self, name: str) -> bool:
        """The lease is an exclusive queue: RabbitMQ lets one connection declare it and
        refuses every other (``405 RESOURCE_LOCKED``) until that connection goes, when it
        deletes the queue. (An exclusive *consumer* would fence the queue itself, but
        RabbitMQ 3.10 ignores ``exclusive`` on a quorum queue's consumers.)"""
        if name in self._leases:
            return True
        try:
            self._connection.admin_op(
                f"take the lease {name!r}", lambda ch: ch.queue_declare(name, exclusive=True, auto_delete=True)
            )
        except TransportError as exc:
            if "RESOURCE_LOCKED" in str(exc):
                return False
            raise
        self._leases[name] = None
        return True

    def queue_info(self, name: str) -> QueueInfo:
        """Ready messages and consumers (a stream reports 0 ready: AMQP cannot count it);
        the kind is known only for queues declared on this transport (else "classic")."""
        try:
            ok = self._connection.admin_op(f"inspect queue {name!r}", lambda ch: ch.queue_declare(name, passive=True))
        except TransportError as exc:
            if "NOT_FOUND" in str(exc):
                raise TransportError(f"no queue {name!r}") from None
            raise
        kind = self._declared_kind(name) or "classic"
        return QueueInfo(name, kind, ok.method.message_count, ok.method.consumer_count, None)

    def declared(self) -> tuple[list[str], list[str]]:
        """(queues, exchanges) declared on this transport and not deleted."""
        return list(self._queues), list(self._exchanges)

    # ------------------------------------------------------------ publishing

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, body: Body) -> None:
        """``body``: bytes, or the buffers that make it up: pika then frames it straight from
        them, chunk by chunk for a large one (:func:`chunks.split_views`,
        :class:`~brokerfl.transports.amqp.pika_body.GatheredBody`), with no joined copy first."""
        self._connection.check_open()
        size = body_size(body)  # a TypeError for anything else: pika takes only bytes; say so before it does
        if size <= self.chunk_size:
            whole = body if isinstance(body, bytes) else GatheredBody([memoryview(part).cast("B") for part in body])
            self._connection.publish(exchange, routing_key, to_properties(envelope, user=self.user), whole)
            return
        for views, headers in chunks.split_views(body, self.chunk_size, envelope.message_id):
            # pika frames the chunk straight from the views (no chunk-sized copy first)
            self._connection.publish(
                exchange, routing_key, to_properties(envelope, headers, user=self.user), GatheredBody(views)
            )

    # ------------------------------------------------------------ consuming and settling

    def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 0, offset: StreamOffset | None = None
    ) -> str:
        return self._consumers.consume(queue, on_delivery, prefetch=prefetch, offset=offset)

    def cancel(self, consumer_tag: str) -> None:
        self._consumers.cancel(consumer_tag)

    def resubscriptions(self, consumer_tag: str) -> int:
        return self._consumers.resubscriptions(consumer_tag)

    def get(self, queue: str) -> Delivery | None:
        return self._consumers.get(queue)

    def poll(self, timeout: float = 0.0) -> int:
        return self._consumers.poll(timeout)

    def ack(self, delivery: Delivery) -> None:
        self._consumers.settle(delivery, "ack")

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        self._consumers.settle(delivery, "requeue" if requeue else "reject")

    # ------------------------------------------------------------ request/reply

    def request(
        self, exchange: str, routing_key: str, envelope: Envelope, body: bytes, *, timeout: float
    ) -> tuple[Envelope, bytes] | None:
        """Direct reply-to: on a channel of its own, consume ``amq.rabbitmq.reply-to``
        (no-ack, as RabbitMQ requires), publish with ``reply_to`` and ``expiration`` set,
        wait, close it."""
        self._connection.check_open()
        if len(body) > self.chunk_size:
            raise TransportError(
                f"a request of {len(body)} bytes is larger than a chunk ({self.chunk_size}); requests are not chunked"
            )

        def run() -> tuple[Envelope, bytes] | None:
            conn = self._connection.conn
            assert conn is not None  # with_retry connected
            replies: list[tuple[Envelope, bytes]] = []
            channel = conn.channel()
            try:
                channel.confirm_delivery()
                channel.basic_consume(
                    REPLY_TO,
                    lambda _ch, _m, properties, reply: replies.append((to_envelope(properties)[0], reply)),
                    auto_ack=True,
                )
                properties = to_properties(envelope, user=self.user)
                properties.reply_to = REPLY_TO
                properties.expiration = str(max(1, int(timeout * 1000)))  # nobody waits for it after that
                try:
                    self._connection.bounded(
                        conn,
                        self.confirm_timeout,
                        f"confirm of a request to {routing_key!r}",
                        lambda: channel.basic_publish(exchange, routing_key, body, properties, mandatory=True),
                    )
                except px.UnroutableError:
                    raise UnroutableError(f"no queue is bound to {routing_key!r} on exchange {exchange!r}") from None
                except px.ChannelClosedByBroker as exc:
                    raise _channel_error(
                        f"publish a request to {routing_key!r} on exchange {exchange!r}", exc
                    ) from None
                deadline = time.monotonic() + timeout
                while not replies and time.monotonic() < deadline:
                    conn.process_data_events(time_limit=min(0.2, max(0.0, deadline - time.monotonic())))
                return replies[0] if replies else None
            finally:
                if channel.is_open:
                    _quietly(channel.close)

        return self._connection.with_retry(run)

    def reply(self, request: Delivery, envelope: Envelope, body: bytes) -> None:
        # Not mandatory: RabbitMQ 3.x returns a mandatory publish to a reply address as
        # unroutable even when it delivered it, so whether the requester is still there
        # cannot be told; a reply to one that is gone is dropped by the broker.
        self._connection.check_open()
        if not request.reply_to:
            raise TransportError(f"message {request.envelope.message_id!r} is not a request: it has no reply address")
        self._connection.publish("", request.reply_to, to_properties(envelope, user=self.user), body, mandatory=False)

    def wake(self) -> None:
        """pika's one thread-safe call (see :meth:`Consumers.wake`)."""
        self._consumers.wake()

    def close(self) -> None:
        """Close the connection; the broker requeues whatever it left unacked."""
        if self._connection.closed:
            return
        self._consumers.close()
        self._connection.close()
