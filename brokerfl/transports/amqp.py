"""The AMQP transport: pika's BlockingConnection against RabbitMQ.

Semantics match :mod:`brokerfl.transports.local` (see :mod:`brokerfl.transport`). How:

- **Envelope.** AMQP properties and headers (:mod:`brokerfl.transports.envelope`).
- **Channels.** One confirm-mode channel publishes (``mandatory``: unroutable is an error),
  one declares (a refused redeclare closes it, so it is reopened), one serves ``get``, and
  each consumer has its own: ``cancel`` closes it, which is the only way to make RabbitMQ
  give back a consumer's unacked deliveries (``basic.cancel`` leaves them unacked).
- **Callbacks** run in :meth:`poll`, outside pika's dispatch: pika's callbacks only record
  what arrived, so user callbacks may publish, ack, cancel or consume freely.
- **Large bodies** are chunked (:mod:`brokerfl.transports.chunks`) and handed to the
  consumer as one :class:`Delivery` that settles every chunk. Prefetch counts *logical*
  messages: chunks of a message still being received do not count. RabbitMQ cannot change
  an existing consumer's prefetch (``basic.qos`` applies to the next ``basic.consume``), so
  when a queue consumer's AMQP prefetch is used up by chunks while it holds fewer than
  ``prefetch`` whole messages, it re-subscribes (cancel, qos, consume on the same channel;
  its unacked deliveries stay valid) with room for exactly the logical messages it may still
  take. A stream consumer instead acks chunks as they arrive (an ack only returns credit on
  a stream) and holds only a message's last chunk until the message is settled.
- **Reconnect.** A lost connection is noticed by whatever call hits it; that call reconnects
  with exponential backoff (up to ``max_reconnect_s``), redeclares everything declared on
  this transport, re-creates the consumers, and carries on (a publish is retried from the
  first unconfirmed chunk: at-least-once, consumers dedupe by message id). Deliveries of
  the lost connection are dropped from the inbox and cannot be settled any more; the broker
  redelivers them, so settling one logs a warning instead of failing.

Limits worth knowing:

- pika's BlockingConnection sends heartbeats only inside pika calls: a callback that runs
  longer than about two ``heartbeat`` intervals loses the connection (its message is then
  redelivered). Keep long work out of callbacks, or pass ``heartbeat=0``.
- Chunks of one message must reach one consumer: give a queue that carries chunked
  messages one consumer at a time (or ``x-single-active-consumer``). Chunks split between
  consumers are dead-lettered after ``chunk_timeout``.
- On RabbitMQ 3.x a quorum queue puts a ``nack(requeue=True)`` message at the back, not
  the head; a classic queue (and the local transport) puts it back in place.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pika
import pika.exceptions as px
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from brokerfl.message import Envelope
from brokerfl.transport import (
    REPLY_TO,
    Delivery,
    OnDelivery,
    QueueInfo,
    QueueKind,
    StreamOffset,
    Transport,
    TransportError,
    UnroutableError,
    bounded,
)
from brokerfl.transports import chunks
from brokerfl.transports.envelope import dead_letter_properties, make_header_decoding_total, to_envelope, to_properties
from brokerfl.transports.connect import TlsOptions, connection_parameters

log = structlog.get_logger("brokerfl.amqp")

STREAM_CREDIT = 16  # AMQP prefetch of a stream consumer asked for prefetch=0 (unbounded)
RECV_BYTES = 512 * 1024  # per socket read; pika's own 4 KiB costs much client CPU on large bodies
MAX_BACKOFF_S = 2.0

# What a lost connection looks like, depending on where pika notices it.
_LOST = (px.AMQPConnectionError, px.ConnectionWrongStateError, px.StreamLostError, ConnectionError)
# Reconnecting does not help with these.
_FATAL = (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)

T = TypeVar("T")


RESERVED_CHANNELS = 4  # publish, admin, get, a request's: what consume() may not take


class ChannelLimitError(TransportError):
    """The connection has no free channel (the broker's channel_max): not a lost connection."""


class _Refused(TransportError):
    """The broker refused our login or vhost: retrying will not help."""


class _QuietConnect(logging.Filter):
    """pika logs every failed connection attempt at ERROR, with a traceback; while we
    connect (and report failure ourselves, in one line) those records are dropped."""

    active = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.active, "on", False)


_QUIET = _QuietConnect()
for _name in ("pika.adapters.utils.connection_workflow", "pika.adapters.blocking_connection", "pika.adapters.utils.io_services_utils", "pika.adapters.base_connection", "pika.connection"):
    logging.getLogger(_name).addFilter(_QUIET)


@contextlib.contextmanager
def _quiet_pika():
    _QuietConnect.active.on = True
    try:
        yield
    finally:
        _QuietConnect.active.on = False


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/`` -> ``amqp://user:***@host/``."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


# ---------------------------------------------------------------- bookkeeping


@dataclass(eq=False)
class _Handle:
    """One AMQP delivery as this connection holds it."""

    channel: BlockingChannel
    delivery_tag: int
    amqp_tag: str | None  # the broker-side consumer it came to (None: basic.get)
    generation: int  # which connection: deliveries do not survive a reconnect
    exchange: str
    routing_key: str
    properties: pika.BasicProperties
    redelivered: bool
    offset: int | None = None  # streams
    settled: bool = False


@dataclass(eq=False)
class _Consumer:
    tag: str  # what the user holds; stable across re-subscribes and reconnects
    queue: str
    on_delivery: OnDelivery
    prefetch: int  # in logical messages; 0: unbounded
    offset: StreamOffset | None
    stream: bool
    channel: BlockingChannel | None = None
    generation: int = 0
    amqp_tag: str | None = None
    amqp_prefetch: int = 0
    held: int = 0  # unsettled deliveries of the current broker-side consumer
    logical: int = 0  # whole messages handed out and not yet settled
    next_offset: int | None = None  # streams: where to resume after a reconnect
    assembler: chunks.Assembler = field(default_factory=chunks.Assembler)
    epoch: int = 0  # bumped at each (re)subscription on a new channel
    cancelled: bool = False
    cancelled_by_broker: bool = False


@dataclass(eq=False)
class _Tag:
    """``Delivery.tag``: the AMQP deliveries that make up one logical message."""

    handles: list[_Handle]
    consumer: _Consumer | None  # None: from get()
    assembler: chunks.Assembler | None  # set for chunked messages
    message_id: str | None = None
    epoch: int = 0  # the consumer's epoch at hand-out
    settled: bool = False

    def __repr__(self) -> str:
        return f"<amqp delivery {[h.delivery_tag for h in self.handles][:4]}{'...' if len(self.handles) > 4 else ''}>"


# ---------------------------------------------------------------- the transport


class AmqpTransport(Transport):
    """A connection to RabbitMQ; used by one thread."""

    def __init__(
        self,
        url: str,
        *,
        chunk_size: int = 16 * 1024**2,
        heartbeat: int = 30,
        connect_timeout: float = 10.0,
        max_reconnect_s: float = 60.0,
        chunk_timeout: float = 300.0,
        max_partial_messages: int = chunks.MAX_PARTIALS,
        max_partial_bytes: int = chunks.MAX_PARTIAL_BYTES,
        max_partial_bytes_per_sender: int = chunks.MAX_PARTIAL_BYTES_PER_SENDER,
        tls: TlsOptions | None = None,
    ) -> None:
        """``chunk_timeout``: a partly received chunked message that gets no chunk for this
        long is dead-lettered (its publisher died, or its chunks went to another consumer
        of the queue: one consumer per queue that carries chunked messages).
        ``max_partial_*``: per consumer, how many incomplete chunked messages and how many
        of their bytes (in all, and from one sender) are held; past them the least recently
        fed incomplete message is dead-lettered (see :class:`chunks.Assembler`). ``tls``: CA,
        certificate and key for ``amqps://`` URLs (default: ``BROKERFL_TLS_*``; see
        :mod:`brokerfl.transports.connect`)."""
        super().__init__()
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.url = url
        self.safe_url = mask_url(url)
        self.chunk_size = chunk_size
        self.max_reconnect_s = max_reconnect_s
        self.chunk_timeout = chunk_timeout
        self._assembler_bounds = {"max_partials": max_partial_messages, "max_bytes": max_partial_bytes, "max_bytes_per_sender": max_partial_bytes_per_sender}
        try:
            self._params, self.user = connection_parameters(url, tls)
        except Exception as exc:
            raise TransportError(f"bad AMQP URL {self.safe_url}: {exc}") from None
        self._params.heartbeat = heartbeat
        self._params.socket_timeout = connect_timeout
        self._params.stack_timeout = connect_timeout
        self._params.connection_attempts = 1
        self._params.client_properties = {"connection_name": "brokerfl"}
        # What to redeclare after a reconnect (dicts as ordered sets).
        self._exchanges: dict[str, None] = {}
        self._queues: dict[str, tuple[QueueKind, dict[str, Any]]] = {}
        self._bindings: dict[tuple[str, str, str], None] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._received: deque[tuple[_Consumer, _Handle, bytes]] = deque()  # recorded by pika's callbacks
        self._inbox: deque[tuple[_Consumer, Delivery]] = deque()
        self._get_assemblers: dict[str, chunks.Assembler] = {}
        # complete chunked messages handed to consumers, not yet settled: (consumer, id) -> tag
        self._in_hand: dict[tuple[str, str], _Tag] = {}
        self._generation = 0
        self._closed = False
        self._conn: pika.BlockingConnection | None = None
        self._connect()

    # ------------------------------------------------------------ connection

    def _connect(self) -> None:
        try:
            with _quiet_pika():
                conn = pika.BlockingConnection(self._params)
        except (px.AMQPError, OSError) as exc:
            error = _Refused if isinstance(exc, _FATAL) else TransportError
            raise error(f"cannot connect to RabbitMQ at {self.safe_url}: {_describe(exc)}") from None
        _tune_reads(conn)
        make_header_decoding_total(conn)
        self._conn = conn
        self._generation += 1
        self._pub = conn.channel()
        self._pub.confirm_delivery()
        self._admin = conn.channel()
        self._getch: BlockingChannel | None = None

    def _reconnect(self, cause: BaseException) -> None:
        if self._closed:
            raise TransportError("connection is closed")
        log.warning("amqp.connection_lost", url=self.safe_url, cause=_describe(cause))
        self._drop_connection()
        deadline = time.monotonic() + self.max_reconnect_s
        delay = 0.1
        while True:
            try:
                self._connect()
                self._restore()
                log.info("amqp.reconnected", url=self.safe_url, consumers=len(self._consumers))
                return
            except (TransportError, px.ChannelWrongStateError, *_LOST) as exc:
                self._drop_connection()
                remaining = deadline - time.monotonic()
                if isinstance(exc, _Refused) or remaining <= 0:
                    raise TransportError(f"lost the connection to RabbitMQ at {self.safe_url} and could not reconnect within {self.max_reconnect_s:g} s: {_describe(exc)}") from None
                log.info("amqp.reconnect_failed", error=_describe(exc), retry_in=round(delay, 2))
                time.sleep(min(remaining, delay * random.uniform(0.8, 1.2)))  # jitter: many clients reconnect at once
                delay = min(delay * 2, MAX_BACKOFF_S)

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except Exception:  # already half dead: nothing to save
                pass

    def _restore(self) -> None:
        """After a reconnect: declarations, then consumers."""
        steps: list[tuple[str, Callable[[BlockingChannel], Any]]] = []
        for name in self._exchanges:
            steps.append((f"exchange {name}", lambda ch, n=name: ch.exchange_declare(n, exchange_type="topic", durable=True)))
        for name, (_, arguments) in self._queues.items():
            steps.append((f"queue {name}", lambda ch, n=name, a=arguments: ch.queue_declare(n, durable=True, arguments=a)))
        for queue, exchange, pattern in self._bindings:
            steps.append((f"binding {queue} {exchange} {pattern}", lambda ch, b=(queue, exchange, pattern): ch.queue_bind(*b)))
        for what, step in steps:
            try:
                step(self._admin)
            except px.ChannelClosedByBroker as exc:
                self._admin = self._conn.channel()
                if _recovering(exc.reply_text):  # a restarted broker still loading its queues
                    raise TransportError(f"redeclare {what}: {exc.reply_text}") from None
                log.error("amqp.redeclare_failed", what=what, error=exc.reply_text)  # redeclared otherwise meanwhile
        self._get_assemblers.clear()
        self._received.clear()
        # Unrun deliveries of queues come back from the broker; a stream's do not, keep them.
        self._inbox = deque(e for e in self._inbox if e[0].stream)
        for consumer in list(self._consumers.values()):
            try:
                self._start_consumer(consumer)
            except TransportError as exc:
                if _recovering(str(exc)):
                    raise
                log.error("amqp.reconsume_failed", queue=consumer.queue, error=str(exc))
                self._forget_consumer(consumer)

    def _with_retry(self, op: Callable[[], T]) -> T:
        """Run ``op``; if the connection is lost, reconnect and run it again."""
        for _ in range(10):
            self._check_open()
            try:
                return op()
            except px.ChannelWrongStateError as exc:  # a closed channel: is the connection gone?
                if self._conn is not None and self._conn.is_open:
                    raise TransportError(f"channel closed: {exc}") from None
                self._reconnect(exc)
            except px.NoFreeChannels:  # a subclass of AMQPConnectionError, but the connection is fine
                raise ChannelLimitError(self._channel_limit_text()) from None
            except _LOST as exc:
                self._reconnect(exc)
        raise TransportError(f"the connection to {self.safe_url} keeps failing")

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("connection is closed")

    def channel_limit(self) -> int:
        """Channels the broker allows on this connection (channel_max, as negotiated)."""
        return int(self._conn._impl.params.channel_max or pika.channel.MAX_CHANNELS) if self._conn is not None else pika.channel.MAX_CHANNELS

    def _channel_limit_text(self) -> str:
        return (f"no free channel on the connection to {self.safe_url}: the broker allows {self.channel_limit()} (channel_max) "
                f"and each consumer takes one; at most {self.consumer_capacity()} consumers (logical clients) fit on one connection")

    def consumer_capacity(self) -> int:
        """How many consumers (one channel each) fit beside this transport's own channels
        (publish, admin, get, a request's)."""
        return max(0, self.channel_limit() - RESERVED_CHANNELS)

    def _admin_op(self, what: str, op: Callable[[BlockingChannel], T]) -> T:
        def run() -> T:
            try:
                return op(self._admin)
            except px.ChannelClosedByBroker as exc:
                self._admin = self._conn.channel()  # the broker closed it; the next call needs one
                raise _channel_error(what, exc) from None

        return self._with_retry(run)

    # ------------------------------------------------------------ topology

    def declare_exchange(self, name: str) -> None:
        if name:
            self._admin_op(f"declare exchange {name!r}", lambda ch: ch.exchange_declare(name, exchange_type="topic", durable=True))
            self._exchanges[name] = None

    def _declare_queue(self, name, *, kind, dead_letter_queue, max_length_bytes, max_age, single_active_consumer=False) -> None:
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
        self._get_assemblers.pop(name, None)
        self._bindings = {b: None for b in self._bindings if b[0] != name}

    def delete_exchange(self, name: str) -> None:
        if name:
            self._admin_op(f"delete exchange {name!r}", lambda ch: ch.exchange_delete(name))
            self._exchanges.pop(name, None)
            self._bindings = {b: None for b in self._bindings if b[1] != name}

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

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, body: bytes) -> None:
        self._check_open()
        if not isinstance(body, bytes):  # pika takes only bytes; say so before it does
            raise TypeError(f"body must be bytes, got {type(body).__name__}")
        if len(body) <= self.chunk_size:
            self._publish_raw(exchange, routing_key, to_properties(envelope, user=self.user), body)
            return
        for part, headers in chunks.split(body, self.chunk_size, envelope.message_id):
            self._publish_raw(exchange, routing_key, to_properties(envelope, headers, user=self.user), part)

    def _publish_raw(self, exchange: str, routing_key: str, properties: pika.BasicProperties, body: bytes, *, mandatory: bool = True) -> None:
        """One AMQP message, confirmed; retried on a new connection if the old one died
        before the confirm."""

        def run() -> None:
            try:
                self._pub.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
            except px.UnroutableError:
                raise UnroutableError(f"no queue is bound to {routing_key!r} on exchange {exchange!r}") from None
            except px.NackError:
                raise TransportError(f"the broker refused (nacked) a message to {routing_key!r} on exchange {exchange!r}") from None
            except px.ChannelClosedByBroker as exc:  # 404 no exchange, 406 message too large, ...
                self._pub = self._conn.channel()
                self._pub.confirm_delivery()
                raise _channel_error(f"publish {len(body)} bytes to {routing_key!r} on exchange {exchange!r}", exc) from None

        self._with_retry(run)

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
                    channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)
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

    # ------------------------------------------------------------ consuming

    def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 0, offset: StreamOffset | None = None) -> str:
        self._check_open()
        kind = self._queues.get(queue, (None, {}))[0]
        if offset is not None and kind not in (None, "stream"):
            raise TransportError(f"queue {queue!r} is not a stream; offset does not apply")
        stream = kind == "stream" or offset is not None
        if len(self._consumers) >= self.consumer_capacity():  # refused before any channel runs out
            raise ChannelLimitError(self._channel_limit_text())
        consumer = _Consumer(f"amqp-{uuid.uuid4().hex[:12]}", queue, on_delivery, max(0, prefetch), offset, stream)
        self._with_retry(lambda: self._start_consumer(consumer))
        self._consumers[consumer.tag] = consumer
        return consumer.tag

    def _start_consumer(self, c: _Consumer) -> None:
        """(Re)subscribe ``c`` on a channel of its own."""
        if c.stream and c.next_offset is not None:
            # resume after what was seen, or at the start of a message still being assembled
            starts = [p.handle.offset for part in c.assembler.partials.values() for p in part.ordered() if p.handle.offset is not None]
            c.offset = min([c.next_offset, *starts])
        if c.channel is not None and c.channel.is_open:
            _quietly(c.channel.close)
        c.channel = self._conn.channel()
        c.generation = self._generation
        c.epoch += 1
        c.held = c.logical = 0
        c.assembler = self._new_assembler()
        self._in_hand = {k: t for k, t in self._in_hand.items() if k[0] != c.tag}
        c.amqp_prefetch = c.prefetch if (c.prefetch or not c.stream) else STREAM_CREDIT
        try:
            self._subscribe(c)
        except px.ChannelClosedByBroker as exc:
            if not c.stream and "stream" in exc.reply_text.lower():  # a stream not declared here
                c.stream = True
                return self._start_consumer(c)
            raise _channel_error(f"consume from {c.queue!r}", exc) from None
        c.channel.add_on_cancel_callback(lambda _frame, c=c: setattr(c, "cancelled_by_broker", True))

    def _subscribe(self, c: _Consumer) -> None:
        c.channel.basic_qos(prefetch_count=c.amqp_prefetch)
        arguments = {"x-stream-offset": c.offset} if c.stream and c.offset is not None else None
        c.amqp_tag = c.channel.basic_consume(c.queue, lambda ch, method, props, body, c=c: self._record(c, ch, method, props, body), arguments=arguments)
        c.held = 0

    def _record(self, c: _Consumer, channel: BlockingChannel, method: Any, properties: pika.BasicProperties, body: bytes) -> None:
        """pika's callback: note the delivery, nothing else (we are inside pika's dispatch)."""
        offset = (properties.headers or {}).get("x-stream-offset") if isinstance(properties.headers, dict) else None
        if not (isinstance(offset, int) and not isinstance(offset, bool) and (c.stream or self._queues.get(c.queue, (None,))[0] is None)):
            offset = None  # a publisher's header on a queue's message, not the broker's stream offset
        handle = _Handle(channel, method.delivery_tag, method.consumer_tag, self._generation, _text(method.exchange), _text(method.routing_key), properties, method.redelivered, offset)
        if method.consumer_tag == c.amqp_tag:
            c.held += 1
        self._received.append((c, handle, body))

    def cancel(self, consumer_tag: str) -> None:
        c = self._consumers.get(consumer_tag)
        if c is None:
            return
        self._forget_consumer(c)
        # Closing the channel is what makes RabbitMQ requeue its unacked deliveries.
        if c.channel is not None and c.channel.is_open and self._conn is not None and self._conn.is_open:
            try:
                c.channel.close()
            except _LOST as exc:  # the broker requeues everything of a dead connection anyway
                self._reconnect(exc)

    def _forget_consumer(self, c: _Consumer) -> None:
        c.cancelled = True
        self._consumers.pop(c.tag, None)
        self._inbox = deque(e for e in self._inbox if e[0] is not c)
        self._in_hand = {k: t for k, t in self._in_hand.items() if k[0] != c.tag}

    def poll(self, timeout: float = 0.0) -> int:
        self._check_open()
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._pump(max(0.0, deadline - time.monotonic()))
            if self._inbox or time.monotonic() >= deadline:
                break
        batch = list(self._inbox)
        self._inbox.clear()
        ran = 0
        for i, (consumer, delivery) in enumerate(batch):
            if consumer.cancelled or (not consumer.stream and delivery.tag.epoch != consumer.epoch):
                continue  # cancelled, or its channel was lost meanwhile: the broker has it back
            try:
                consumer.on_delivery(delivery)
            except BaseException:
                self._inbox.extendleft(reversed(batch[i + 1 :]))  # not lost: still ours, unacked
                raise
            ran += 1
        return ran

    def _pump(self, time_limit: float) -> None:
        """Let pika read and dispatch for up to ``time_limit`` s, then turn what arrived into
        deliveries."""

        def run() -> None:
            self._conn.process_data_events(time_limit=time_limit)
            self._assemble()
            self._housekeeping()

        self._with_retry(run)

    def _assemble(self) -> None:
        while self._received:
            c, handle, body = self._received.popleft()
            if c.cancelled or handle.generation != self._generation or handle.channel is not c.channel:
                continue  # its channel is gone and the broker took it back
            if handle.offset is not None and not c.stream:
                c.stream = True  # a stream declared elsewhere, consumed without an offset
            if c.stream and handle.offset is not None:
                c.next_offset = max(c.next_offset or 0, handle.offset + 1)
            try:
                info = chunks.parse(handle.properties.headers if isinstance(handle.properties.headers, dict) else {})
            except chunks.BadChunk as exc:
                self._dead_letter_raw(c.queue, [(handle, body)], str(exc), c)
                continue
            if info is None:
                self._hand_out(c, [handle], body, None)
                continue
            if c.stream and info.index > 0 and not c.assembler.knows(info.message_id):
                self._settle_handles([handle], "ack", c)  # the message began before our offset
                continue
            outcome = c.assembler.add(info, body, handle, _sender(handle.properties))
            self._dead_letter_evicted(c.queue, c.assembler, c)
            if isinstance(outcome, chunks.Held):
                if c.stream:
                    self._settle_handles([handle], "ack", c)  # returns credit; a stream keeps it
            elif isinstance(outcome, chunks.Complete):
                self._hand_out(c, outcome.handles, outcome.body, outcome.message_id)
            elif isinstance(outcome, chunks.Extra):  # a publisher's retry, message not yet settled
                tag = self._in_hand.get((c.tag, outcome.message_id))
                if tag is None or tag.settled or c.stream:
                    self._settle_handles([handle], "ack", c)
                else:
                    tag.handles.append(handle)  # settled together with its message
            elif isinstance(outcome, chunks.Stale):
                log.info("amqp.duplicate_chunk_dropped", queue=c.queue, message_id=outcome.message_id)
                self._settle_handles([handle], "ack", c)
            elif isinstance(outcome, chunks.Corrupt):
                self._dead_letter_raw(c.queue, list(zip(outcome.handles, outcome.bodies)), outcome.reason, c)

    def _new_assembler(self) -> chunks.Assembler:
        return chunks.Assembler(**self._assembler_bounds)

    def _dead_letter_evicted(self, queue: str, assembler: chunks.Assembler, c: _Consumer | None) -> None:
        for partial, reason in assembler.take_evicted():
            self._dead_letter_raw(queue, [(p.handle, p.body) for p in partial.ordered()], reason, c)

    def _hand_out(self, c: _Consumer, handles: list[_Handle], body: bytes, message_id: str | None, *, problem: str = "") -> None:
        last = handles[-1] if message_id is None else max(handles, key=lambda h: h.delivery_tag)
        tag = _Tag(handles, c, c.assembler if message_id else None, message_id, c.epoch)
        if c.stream:
            # A stream's ack only returns credit: keep one delivery per whole message (so
            # prefetch counts whole messages) and return the rest now.
            early = [h for h in handles if h is not last] if c.prefetch else list(handles)
            self._settle_handles(early, "ack", c)
        c.logical += 1
        if message_id is not None:
            self._in_hand[(c.tag, message_id)] = tag
        envelope, unreadable = to_envelope(last.properties)
        problem = problem or unreadable
        delivery = Delivery(
            queue=c.queue,
            exchange=last.exchange,
            routing_key=last.routing_key,
            envelope=envelope,
            body=body,
            redelivered=any(h.redelivered for h in handles),
            tag=tag,
            consumer_tag=c.tag,
            problem=problem,
            reply_to=last.properties.reply_to,
        )
        self._inbox.append((c, delivery))

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for c in list(self._consumers.values()):
            if c.cancelled_by_broker:  # its queue was deleted
                log.warning("amqp.consumer_cancelled_by_broker", queue=c.queue)
                self._forget_consumer(c)
                continue
            if c.channel is None or not c.channel.is_open:  # e.g. consumer_timeout closed it
                log.warning("amqp.consumer_channel_closed", queue=c.queue)
                try:
                    self._start_consumer(c)
                except TransportError as exc:
                    log.error("amqp.reconsume_failed", queue=c.queue, error=str(exc))
                    if not _recovering(str(exc)):  # else: try again at the next poll
                        self._forget_consumer(c)
                continue
            if c.assembler.partials and self.chunk_timeout > 0:
                for partial in c.assembler.expire(now - self.chunk_timeout):
                    reason = f"chunked message {partial.message_id}: only {len(partial.pieces)} of {partial.count} chunks arrived within {self.chunk_timeout:g} s"
                    self._dead_letter_raw(c.queue, [(p.handle, p.body) for p in partial.ordered()], reason, c)
            self._maybe_resubscribe(c)

    def _maybe_resubscribe(self, c: _Consumer | None) -> None:
        """Give a queue consumer room again when chunks, not whole messages, used up its
        AMQP prefetch (see the module docstring)."""
        if c is None or c.cancelled or c.stream or c.prefetch == 0 or c.generation != self._generation:
            return
        if c.held < c.amqp_prefetch or c.logical >= c.prefetch:
            return
        # The broker stopped sending (held == its prefetch), so nothing is in flight: the
        # old consumer's deliveries stay on the channel, ours to settle.
        c.channel.basic_cancel(c.amqp_tag)
        c.amqp_prefetch = c.prefetch - c.logical
        self._subscribe(c)

    # ------------------------------------------------------------ get

    def get(self, queue: str) -> Delivery | None:
        """Take one message without a consumer. A chunked message is reassembled by taking
        further messages; chunks of other messages taken meanwhile are kept for the next
        ``get`` (and given back when a ``get`` finds nothing, or at close)."""
        self._check_open()
        if self._queues.get(queue, ("classic",))[0] == "stream":
            raise TransportError(f"queue {queue!r} is a stream; consume it from an offset")
        if queue not in self._queues:
            self.queue_info(queue)  # a 404 must not close the get channel (and its deliveries)
        assembler = self._get_assemblers.setdefault(queue, self._new_assembler())
        while True:
            got = self._with_retry(lambda: self._basic_get(queue))
            if assembler is not self._get_assemblers.get(queue):  # reconnected: start over
                assembler = self._get_assemblers.setdefault(queue, self._new_assembler())
            method, properties, body = got
            if method is None:
                for partial in assembler.release():
                    self._settle_handles([p.handle for p in partial.ordered()], "requeue", None)
                return None
            handle = _Handle(self._getch, method.delivery_tag, None, self._generation, _text(method.exchange), _text(method.routing_key), properties, method.redelivered)
            try:
                info = chunks.parse(properties.headers if isinstance(properties.headers, dict) else {})
            except chunks.BadChunk as exc:
                self._dead_letter_raw(queue, [(handle, body)], str(exc), None)
                continue
            if info is None:
                return self._get_delivery(queue, [handle], body, None, None)
            outcome = assembler.add(info, body, handle, _sender(properties))
            self._dead_letter_evicted(queue, assembler, None)
            if isinstance(outcome, chunks.Complete):
                return self._get_delivery(queue, outcome.handles, outcome.body, outcome.message_id, assembler)
            if isinstance(outcome, chunks.Corrupt):
                self._dead_letter_raw(queue, list(zip(outcome.handles, outcome.bodies)), outcome.reason, None)
            elif isinstance(outcome, (chunks.Stale, chunks.Extra)):
                # Extra: a copy of a message handed out by an earlier get; drop the copy
                self._settle_handles([handle], "ack", None)

    def _basic_get(self, queue: str) -> tuple[Any, Any, Any]:
        if self._getch is None or not self._getch.is_open:
            self._getch = self._conn.channel()
        try:
            return self._getch.basic_get(queue, auto_ack=False)
        except px.ChannelClosedByBroker as exc:  # e.g. the queue was deleted by someone else
            self._getch = None
            raise _channel_error(f"get from {queue!r}", exc) from None

    def _get_delivery(self, queue: str, handles: list[_Handle], body: bytes, message_id: str | None, assembler: chunks.Assembler | None) -> Delivery:
        last = handles[-1]
        tag = _Tag(handles, None, assembler, message_id)
        envelope, problem = to_envelope(last.properties)
        return Delivery(queue, last.exchange, last.routing_key, envelope, body, any(h.redelivered for h in handles), tag, problem=problem, reply_to=last.properties.reply_to)

    # ------------------------------------------------------------ settling

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, "ack")

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        self._settle(delivery, "requeue" if requeue else "reject")

    def _settle(self, delivery: Delivery, how: str) -> None:
        tag = delivery.tag
        if not isinstance(tag, _Tag):
            raise TransportError(f"not a delivery of this transport: {tag!r}")
        if tag.settled:
            raise TransportError(f"delivery {delivery.envelope.message_id!r} on queue {delivery.queue!r} was already settled")
        tag.settled = True
        c = tag.consumer
        if c is not None and c.epoch == tag.epoch and not c.cancelled:
            c.logical -= 1
        if tag.message_id is not None:
            if c is not None:
                self._in_hand.pop((c.tag, tag.message_id), None)
            if tag.assembler is not None:
                tag.assembler.settled(tag.message_id, requeued=how == "requeue")
        if c is not None and c.stream:
            how = "ack"  # a stream keeps everything: ack or nack, it only returns credit
        self._settle_handles(tag.handles, how, c)
        self._with_retry(lambda: self._maybe_resubscribe(c))

    def _live(self, h: _Handle) -> bool:
        return h.generation == self._generation and h.channel.is_open

    def _settle_handles(self, handles: list[_Handle], how: str, c: _Consumer | None) -> None:
        live = []
        for h in handles:
            if h.settled:
                continue
            h.settled = True
            if not self._live(h):
                if not (c is not None and c.stream):
                    log.warning("amqp.settle_dropped", reason="its connection or channel is gone; the broker redelivers it", delivery_tag=h.delivery_tag)
                continue
            live.append(h)
        try:
            for h in live:
                if how == "ack":
                    h.channel.basic_ack(h.delivery_tag)
                else:
                    h.channel.basic_nack(h.delivery_tag, requeue=how == "requeue")
                if c is not None and h.amqp_tag == c.amqp_tag and h.channel is c.channel:
                    c.held -= 1
        except (*_LOST, px.ChannelWrongStateError) as exc:
            log.warning("amqp.settle_dropped", reason="connection lost; the broker redelivers it", error=_describe(exc))
            if self._conn is None or not self._conn.is_open:
                self._reconnect(exc)

    def _dead_letter_raw(self, queue: str, pieces: list[tuple[_Handle, bytes]], reason: str, c: _Consumer | None) -> None:
        """Dead-letter AMQP deliveries one by one with ``reason`` (chunks that cannot make
        a message): a copy to the queue's dead-letter queue, confirmed, then the ack. Without
        a known dead-letter queue, reject them (the queue's own dead-lettering, if any)."""
        if c is not None and c.stream:
            # A stream keeps everything and nothing can be dead-lettered from it: its reader
            # gets each piece as a delivery with the problem, to skip and count.
            for handle, body in pieces:
                if handle.generation == self._generation:
                    self._hand_out(c, [handle], body, None, problem=reason)
            return
        target = self._dead_letter_targets.get(queue)
        log.error("amqp.dead_letter", queue=queue, reason=bounded(reason, 300), target=target, messages=len(pieces))
        for handle, body in pieces:
            if handle.settled or not self._live(handle):
                continue  # its connection or channel is gone: the broker redelivers it
            if target is None or (c is not None and c.stream):
                self._settle_handles([handle], "ack" if c is not None and c.stream else "reject", c)
                continue
            try:
                self._publish_raw("", target, dead_letter_properties(handle.properties, reason, queue, handle.routing_key, user=self.user), body)
            except TransportError as exc:  # refused (the connection is fine): the queue's own dead-lettering
                log.error("amqp.dead_letter_failed", queue=queue, error=bounded(str(exc)))
                self._settle_handles([handle], "reject", c)
                continue
            self._settle_handles([handle], "ack", c)

    def close(self) -> None:
        """Close the connection; the broker requeues whatever it left unacked."""
        if self._closed:
            return
        self._closed = True
        for c in list(self._consumers.values()):
            c.cancelled = True
        self._consumers.clear()
        self._inbox.clear()
        self._drop_connection()


def _tune_reads(conn: pika.BlockingConnection) -> None:
    """Read the socket ``RECV_BYTES`` at a time instead of pika's 4 KiB: pika appends each read
    to its frame buffer (a copy of what is buffered) and tries to parse a frame after each,
    so 4 KiB reads of 128 KiB frames cost ~40% of consuming throughput. These are pika
    internals (1.4): if they are not there, leave pika's defaults."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    if isinstance(getattr(transport, "_MAX_RECV_BYTES", None), int) and isinstance(getattr(transport, "_MAX_CONSUME_BYTES", None), int):
        transport._MAX_RECV_BYTES = RECV_BYTES
        transport._MAX_CONSUME_BYTES = max(transport._MAX_CONSUME_BYTES, 4 * RECV_BYTES)


def _channel_error(what: str, exc: px.ChannelClosedByBroker) -> TransportError:
    text = exc.reply_text
    if exc.reply_code == 406 and "larger than" in text:
        text += " (the broker's max_message_size; lower chunk_size)"
    return TransportError(f"cannot {what}: {exc.reply_code} {text}")


def _recovering(text: str) -> bool:
    """Does this broker error mean "not yet" (a queue still recovering after a restart)?"""
    return any(s in text for s in ("down or inaccessible", "not available", "timeout"))


def _describe(exc: BaseException) -> str:
    """One line for a pika exception (they nest their causes in args)."""
    text = str(exc)
    if not text or text == type(exc).__name__:
        context = exc.__context__ or exc.__cause__
        text = f"{type(exc).__name__}" + (f" ({_describe(context)})" if context is not None else "")
    text = re.sub(r"\s+", " ", text)
    return text if len(text) < 400 else text[:400] + "..."


def _sender(properties: pika.BasicProperties) -> str:
    return properties.app_id if isinstance(properties.app_id, str) else ""


def _text(value: Any) -> str:
    """pika hands over a short string that is not UTF-8 as bytes."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass

