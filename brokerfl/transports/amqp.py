"""The AMQP transport: pika's BlockingConnection against RabbitMQ.

Semantics match :mod:`brokerfl.transports.local` (see :mod:`brokerfl.transport`).
:class:`AmqpTransport` (this module: construction, topology, publishing, request/reply)
is assembled from parts, one concept each: :mod:`~brokerfl.transports.amqp_connection`
(connect, reconnect, retry, error classification), :mod:`~brokerfl.transports.amqp_consuming`
(consumers, reassembly, hand-out, ``get``) and :mod:`~brokerfl.transports.amqp_settling`
(ack, nack, dead-lettering). How it works:

- **Envelope.** AMQP properties and headers (:mod:`brokerfl.transports.envelope`).
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
- **Large bodies** are chunked (:mod:`brokerfl.transports.chunks`) and handed to the
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
from collections import deque
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions as px
import structlog

from brokerfl.message import Envelope
from brokerfl.transport import REPLY_TO, Body, Delivery, QueueInfo, QueueKind, Transport, TransportError, UnroutableError, body_size
from brokerfl.transports import chunks
from brokerfl.transports.amqp_connection import MAX_BACKOFF_S, RECV_BYTES, ChannelLimitError, ConnectionMixin, _channel_error, _quietly, _tune_reads, mask_url
from brokerfl.transports.amqp_consuming import STREAM_CREDIT, ConsumingMixin, _Consumer, _Handle, _Tag
from brokerfl.transports.amqp_settling import SettlingMixin
from brokerfl.transports.connect import TlsOptions, broker_urls, cluster_parameters
from brokerfl.transports.envelope import to_envelope, to_properties
from brokerfl.transports.pika_body import GatheredBody

log = structlog.get_logger("brokerfl.amqp")

# Re-exported: benchmarks and tools import these from here.
__all__ = ["AmqpTransport", "ChannelLimitError", "RECV_BYTES", "STREAM_CREDIT", "mask_url", "_tune_reads"]


DEFAULT_HEARTBEAT_S = 30


class _Nacked(TransportError):
    """The broker nacked a publish (retried for a while before it becomes a TransportError)."""



def queue_arguments(
    kind: QueueKind, *, dead_letter_queue: str | None = None, max_length_bytes: int | None = None, max_age: str | None = None, single_active_consumer: bool = False
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


class AmqpTransport(ConnectionMixin, ConsumingMixin, SettlingMixin, Transport):
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
        :meth:`ConnectionMixin._bounded`; a connection blocked by a resource alarm waits on).
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
        :mod:`brokerfl.transports.chunks`); None: all in RAM. ``tls``: CA,
        certificate and key for ``amqps://`` URLs (default: ``BROKERFL_TLS_*``; see
        :mod:`brokerfl.transports.connect`). ``retry_start``: the first connection is retried
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
        self.max_reconnect_s = max_reconnect_s
        self.confirm_timeout = confirm_timeout
        self.chunk_timeout = chunk_timeout
        self._assembler_bounds = {"max_partials": max_partial_messages, "max_bytes": max_partial_bytes, "max_bytes_per_sender": max_partial_bytes_per_sender, "spill_min_bytes": spill_min_bytes, "spill_dir": spill_dir}
        try:
            self._nodes, self.user = cluster_parameters(url, tls)
        except Exception as exc:
            raise TransportError(f"bad AMQP URL {self.safe_url}: {exc}") from None
        for node_url, params in zip(broker_urls(url), self._nodes):
            if heartbeat is not None or "heartbeat" not in parse_qs(urlsplit(node_url).query):
                params.heartbeat = DEFAULT_HEARTBEAT_S if heartbeat is None else heartbeat
            params.socket_timeout = connect_timeout
            params.stack_timeout = connect_timeout
            params.connection_attempts = 1
            params.client_properties = {"connection_name": "brokerfl"}
        self._node: pika.URLParameters | None = None  # the node of the current connection
        # What to redeclare after a reconnect (dicts as ordered sets).
        self._exchanges: dict[str, None] = {}
        self._queues: dict[str, tuple[QueueKind, dict[str, Any]]] = {}
        self._bindings: dict[tuple[str, str, str], None] = {}
        self._leases: dict[str, None] = {}  # exclusive queues this connection holds (hold_lease)
        self._consumers: dict[str, _Consumer] = {}
        self._received: deque[tuple[_Consumer, _Handle, bytes]] = deque()  # recorded by pika's callbacks
        self._inbox: deque[tuple[_Consumer, Delivery]] = deque()
        self._get_assemblers: dict[str, chunks.Assembler] = {}
        # complete chunked messages handed to consumers, not yet settled: (consumer, id) -> tag
        self._in_hand: dict[tuple[str, str], _Tag] = {}
        self._generation = 0
        self._closed = False
        self._conn: pika.BlockingConnection | None = None
        self._publisher: pika.BlockingConnection | None = None
        self._blocked: set[Any] = set()
        self._woken = False  # set on the I/O thread by the callback wake() asks for
        if retry_start:
            self._connect_first()
        else:
            self._connect()

    # ------------------------------------------------------------ topology

    def declare_exchange(self, name: str) -> None:
        if name:
            self._admin_op(f"declare exchange {name!r}", lambda ch: ch.exchange_declare(name, exchange_type="topic", durable=True))
            self._exchanges[name] = None

    def _declare_queue(self, name, *, kind, dead_letter_queue, max_length_bytes, max_age, single_active_consumer=False) -> None:
        arguments = queue_arguments(kind, dead_letter_queue=dead_letter_queue, max_length_bytes=max_length_bytes, max_age=max_age, single_active_consumer=single_active_consumer)
        try:
            self._admin_op(f"declare {kind} queue {name!r} with {arguments}", lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))
        except TransportError as exc:
            # Naming a dead-letter exchange needs write access to it (here the default
            # exchange), which a least-privilege user lacks: then the operator's policy
            # (``brokerfl provision`` writes one) dead-letters this queue's rejects instead.
            if not (dead_letter_queue is not None and "ACCESS_REFUSED" in str(exc) and "amq.default" in str(exc)):
                raise
            arguments = {k: v for k, v in arguments.items() if not k.startswith("x-dead-letter-")}
            self._admin_op(f"declare {kind} queue {name!r} with {arguments}", lambda ch: ch.queue_declare(name, durable=True, arguments=arguments))
        self._queues[name] = (kind, arguments)

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        self._admin_op(f"bind {queue!r} to {exchange!r} with {pattern!r}", lambda ch: ch.queue_bind(queue, exchange, pattern))
        self._bindings[(queue, exchange, pattern)] = None

    def delete_queue(self, name: str) -> None:
        for consumer in [c for c in self._consumers.values() if c.queue == name]:
            self.cancel(consumer.tag)
        self._admin_op(f"delete queue {name!r}", lambda ch: ch.queue_delete(name))
        self._queues.pop(name, None)
        dropped = self._get_assemblers.pop(name, None)
        if dropped is not None:
            dropped.close()
        self._bindings = {b: None for b in self._bindings if b[0] != name}

    def delete_exchange(self, name: str) -> None:
        if name:
            self._admin_op(f"delete exchange {name!r}", lambda ch: ch.exchange_delete(name))
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
            self._admin_op(f"take the lease {name!r}", lambda ch: ch.queue_declare(name, exclusive=True, auto_delete=True))
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
            ok = self._admin_op(f"inspect queue {name!r}", lambda ch: ch.queue_declare(name, passive=True))
        except TransportError as exc:
            if "NOT_FOUND" in str(exc):
                raise TransportError(f"no queue {name!r}") from None
            raise
        kind = self._queues.get(name, ("classic", {}))[0]
        return QueueInfo(name, kind, ok.method.message_count, ok.method.consumer_count, None)

    def declared(self) -> tuple[list[str], list[str]]:
        """(queues, exchanges) declared on this transport and not deleted."""
        return list(self._queues), list(self._exchanges)

    # ------------------------------------------------------------ publishing

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, body: Body) -> None:
        """``body``: bytes, or the buffers that make it up: pika then frames it straight from
        them, chunk by chunk for a large one (:func:`chunks.split_views`,
        :class:`~brokerfl.transports.pika_body.GatheredBody`), with no joined copy first."""
        self._check_open()
        size = body_size(body)  # a TypeError for anything else: pika takes only bytes; say so before it does
        if size <= self.chunk_size:
            whole = body if isinstance(body, bytes) else GatheredBody([memoryview(part).cast("B") for part in body])
            self._publish_raw(exchange, routing_key, to_properties(envelope, user=self.user), whole)
            return
        for views, headers in chunks.split_views(body, self.chunk_size, envelope.message_id):
            # pika frames the chunk straight from the views (no chunk-sized copy first)
            self._publish_raw(exchange, routing_key, to_properties(envelope, headers, user=self.user), GatheredBody(views))

    def _publish_raw(self, exchange: str, routing_key: str, properties: pika.BasicProperties, body: bytes, *, mandatory: bool = True) -> None:
        """One AMQP message, confirmed; retried on a new connection if the old one died
        before the confirm."""

        def run() -> None:
            try:
                self._bounded(self._publisher, self.confirm_timeout, f"confirm of a publish to {routing_key!r}", lambda: self._pub.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory))
            except px.UnroutableError:
                raise UnroutableError(f"no queue is bound to {routing_key!r} on exchange {exchange!r}") from None
            except px.NackError:
                # Publish again on a new channel. RabbitMQ 3.10 keeps a channel's view of a
                # quorum queue's leader: a channel that first published to the queue while
                # its leader was being re-elected (right after a cluster node died) had
                # every later publish nacked for minutes, while a new channel's were
                # confirmed at once (seen in tests/test_cluster.py, and with raw pika against a
                # 3-node cluster: a channel opened on a survivor right after the kill).
                self._renew_publish_channel()
                raise _Nacked(f"the broker refused (nacked) a message to {routing_key!r} on exchange {exchange!r}") from None
            except px.ChannelClosedByBroker as exc:  # 404 no exchange, 406 message too large, ...
                self._renew_publish_channel()
                raise _channel_error(f"publish {len(body)} bytes to {routing_key!r} on exchange {exchange!r}", exc) from None

        # A nack is the broker saying "not now": e.g. a quorum queue or stream electing a new
        # leader after a cluster node died. Publish again with backoff (at-least-once:
        # consumers dedupe by message id), up to max_reconnect_s.
        deadline, delay = time.monotonic() + self.max_reconnect_s, 0.1
        while True:
            try:
                return self._with_retry(run)
            except _Nacked as exc:
                if time.monotonic() + delay > deadline:
                    raise TransportError(f"{exc} for {self.max_reconnect_s:g} s") from None
                log.info("amqp.publish_nacked", routing_key=routing_key, retry_in=round(delay, 2))
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    def _renew_publish_channel(self) -> None:
        """Replace the publishing channel (closed by the broker, or one whose publishes it
        nacks) with a new one in confirm mode."""
        if self._pub.is_open:
            _quietly(self._pub.close)
        self._pub = self._publisher.channel()
        self._pub.confirm_delivery()

    # ------------------------------------------------------------ request/reply

    def request(self, exchange: str, routing_key: str, envelope: Envelope, body: bytes, *, timeout: float) -> tuple[Envelope, bytes] | None:
        """Direct reply-to: on a channel of its own, consume ``amq.rabbitmq.reply-to``
        (no-ack, as RabbitMQ requires), publish with ``reply_to`` and ``expiration`` set,
        wait, close it."""
        self._check_open()
        if len(body) > self.chunk_size:
            raise TransportError(f"a request of {len(body)} bytes is larger than a chunk ({self.chunk_size}); requests are not chunked")

        def run() -> tuple[Envelope, bytes] | None:
            replies: list[tuple[Envelope, bytes]] = []
            channel = self._conn.channel()
            try:
                channel.confirm_delivery()
                channel.basic_consume(REPLY_TO, lambda _ch, _m, properties, reply: replies.append((to_envelope(properties)[0], reply)), auto_ack=True)
                properties = to_properties(envelope, user=self.user)
                properties.reply_to = REPLY_TO
                properties.expiration = str(max(1, int(timeout * 1000)))  # nobody waits for it after that
                try:
                    self._bounded(self._conn, self.confirm_timeout, f"confirm of a request to {routing_key!r}", lambda: channel.basic_publish(exchange, routing_key, body, properties, mandatory=True))
                except px.UnroutableError:
                    raise UnroutableError(f"no queue is bound to {routing_key!r} on exchange {exchange!r}") from None
                except px.ChannelClosedByBroker as exc:
                    raise _channel_error(f"publish a request to {routing_key!r} on exchange {exchange!r}", exc) from None
                deadline = time.monotonic() + timeout
                while not replies and time.monotonic() < deadline:
                    self._conn.process_data_events(time_limit=min(0.2, max(0.0, deadline - time.monotonic())))
                return replies[0] if replies else None
            finally:
                if channel.is_open:
                    _quietly(channel.close)

        return self._with_retry(run)

    def reply(self, request: Delivery, envelope: Envelope, body: bytes) -> None:
        # Not mandatory: RabbitMQ 3.x returns a mandatory publish to a reply address as
        # unroutable even when it delivered it, so whether the requester is still there
        # cannot be told; a reply to one that is gone is dropped by the broker.
        self._check_open()
        if not request.reply_to:
            raise TransportError(f"message {request.envelope.message_id!r} is not a request: it has no reply address")
        self._publish_raw("", request.reply_to, to_properties(envelope, user=self.user), body, mandatory=False)
    def wake(self) -> None:
        """pika's one thread-safe call: the callback runs in the I/O loop, inside the poll's
        wait (which it ends). A connection closed or being replaced takes no callback:
        then the caller's poll bound ends the wait."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.add_callback_threadsafe(self._on_wake)
        except Exception:
            pass

    def _on_wake(self) -> None:
        self._woken = True

    def close(self) -> None:
        """Close the connection; the broker requeues whatever it left unacked."""
        if self._closed:
            return
        self._closed = True
        for c in list(self._consumers.values()):
            c.cancelled = True
            c.assembler.close()
        self._consumers.clear()
        self._drop_assemblers()
        self._inbox.clear()
        self._drop_connection(graceful=True)

