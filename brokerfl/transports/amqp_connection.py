"""The AMQP transport's connection: connecting, reconnecting with backoff, retrying an
operation on a new connection, and telling a lost connection from a refused operation.

:class:`ConnectionMixin` is one part of :class:`brokerfl.transports.amqp.AmqpTransport`
(the attributes it uses are set by that class's ``__init__``). A lost connection is noticed
by whatever call hits it; :meth:`ConnectionMixin._with_retry` reconnects with exponential
backoff (up to ``max_reconnect_s``), redeclares everything declared on the transport,
re-creates the consumers, and runs the call again. With ``retry_start`` the first connection
is tried the same way (:meth:`ConnectionMixin._connect_first`): a server or client started
before its broker is up waits for it; a refused login is final at once either way.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import pika
import pika.exceptions as px
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from brokerfl.transport import LeaseLost, TransportError
from brokerfl.transports.envelope import make_header_decoding_total

if TYPE_CHECKING:
    from brokerfl.transports.amqp_consuming import _Consumer

log = structlog.get_logger("brokerfl.amqp")

RECV_BYTES = 512 * 1024  # per socket read; pika's own 4 KiB costs much client CPU on large bodies
MAX_BACKOFF_S = 2.0
FIRST_BACKOFF_S = 0.1


def _next_backoff(delay: float) -> float:
    """The wait after the one of ``delay`` (reconnects and a first connection alike)."""
    return min(delay * 2, MAX_BACKOFF_S)


def _jittered(delay: float) -> float:
    return delay * random.uniform(0.8, 1.2)  # many clients (re)connect at once

# What a lost connection looks like, depending on where pika notices it.
_LOST = (px.AMQPConnectionError, px.ConnectionWrongStateError, px.StreamLostError, ConnectionError)
# Reconnecting does not help with these, when the broker said so (see _refused).
_FATAL = (px.ProbableAuthenticationError, px.ProbableAccessDeniedError, px.AuthenticationError)


def _refused(exc: BaseException) -> bool:
    """The broker refused the login or the vhost. pika reports any connection closed during
    the handshake as a "probable" refusal, a socket reset included: a broker restarting
    again while we reconnect (two restarts close together) is not bad credentials. Only a
    close from the broker itself (403 ACCESS_REFUSED, 530 NOT_ALLOWED) is."""
    if isinstance(exc, (px.ProbableAuthenticationError, px.ProbableAccessDeniedError)):
        return "ConnectionClosedByBroker" in str(exc)  # pika keeps only the cause's repr
    return isinstance(exc, _FATAL)

T = TypeVar("T")


RESERVED_CHANNELS = 3  # admin, get, a request's: what consume() may not take (publishing has its own connection)


class ChannelLimitError(TransportError):
    """The connection has no free channel (the broker's channel_max): not a lost connection."""


class _Refused(TransportError):
    """The broker refused our login or vhost: retrying will not help."""


class _Unanswered(px.AMQPConnectionError):
    """The broker did not answer a blocking call (e.g. a publisher confirm) in time; the
    connection was aborted, so the call is retried on a new one like after a lost connection."""


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


class ConnectionMixin:
    """Connect, reconnect and retry; redeclare topology and consumers after a reconnect."""

    url: str
    safe_url: str
    max_reconnect_s: float
    _nodes: list[pika.URLParameters]  # one, or a cluster's nodes
    _node: pika.URLParameters | None
    _closed: bool
    _conn: pika.BlockingConnection | None  # consumers, declarations, get, requests
    _publisher: pika.BlockingConnection | None  # the publishing channel only
    _publisher_serviced: float
    _generation: int
    _blocked: set[Any]  # connections (pika's impl) a resource alarm holds back
    _exchanges: dict[str, None]
    _queues: dict[str, tuple[str, dict[str, Any]]]
    _bindings: dict[tuple[str, str, str], None]
    _consumers: dict[str, _Consumer]
    _leases: dict[str, None]

    def _connect(self) -> None:
        # a cluster's nodes in order, the one just lost last: failing over tries the others first
        nodes = [p for p in self._nodes if p is not self._node] + [p for p in self._nodes if p is self._node]
        conn = self._open(nodes)
        self._node = next((p for p in nodes if (p.host, p.port) == (conn._impl.params.host, conn._impl.params.port)), None)
        try:
            # Publishing has a connection of its own: while pika waits for a publish's
            # confirm it reads whatever arrives on its connection, and on a shared one that
            # was deliveries, up to the consumers' prefetch (chunks of 16 MiB), taken into
            # memory before anything could spill them. On its own connection, deliveries
            # wait in the socket and the broker until the next poll.
            publisher = self._open(([self._node] if self._node else []) + [p for p in nodes if p is not self._node])
        except TransportError:
            _quietly(conn.close)
            raise
        self._conn, self._publisher = conn, publisher
        self._publisher_serviced = time.monotonic()
        self._generation += 1
        self._pub = publisher.channel()
        self._pub.confirm_delivery()
        self._admin = conn.channel()
        self._getch: BlockingChannel | None = None

    def _connect_first(self) -> None:
        """The first connection, retried like a reconnect (same backoff, up to
        ``max_reconnect_s``), each failed attempt logged with the next retry's delay; a
        refused login or vhost is final at once. TransportError when it gives up."""
        deadline = time.monotonic() + self.max_reconnect_s
        delay, attempt = FIRST_BACKOFF_S, 0
        while True:
            attempt += 1
            try:
                self._connect()
                if attempt > 1:
                    log.info("amqp.connected", url=self.safe_url, attempts=attempt)
                return
            except (TransportError, *_LOST) as exc:
                self._drop_connection()
                if isinstance(exc, _Refused):
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"cannot connect to RabbitMQ at {self.safe_url}: gave up after {attempt} attempts in {self.max_reconnect_s:g} s "
                                         f"(--max-reconnect-s): {_describe(exc)}") from None
                wait = min(remaining, _jittered(delay))
                log.warning("amqp.connect_failed", url=self.safe_url, attempt=attempt, error=_describe(exc), retry_in_s=round(wait, 2), gives_up_in_s=round(remaining, 1))
                time.sleep(wait)
                delay = _next_backoff(delay)

    def _open(self, nodes: list[pika.URLParameters]) -> pika.BlockingConnection:
        try:
            with _quiet_pika():
                conn = pika.BlockingConnection(nodes if len(nodes) > 1 else nodes[0])
        except (px.AMQPError, OSError) as exc:
            error = _Refused if _refused(exc) else TransportError
            raise error(f"cannot connect to RabbitMQ at {self.safe_url}: {_describe(exc)}") from None
        _tune_reads(conn)
        make_header_decoding_total(conn)
        # connection.blocked (a resource alarm), seen inside pika's waits (see _bounded)
        conn._impl.add_on_connection_blocked_callback(lambda impl, _frame: self._blocked.add(impl))
        conn._impl.add_on_connection_unblocked_callback(lambda impl, _frame: self._blocked.discard(impl))
        return conn

    def _connections(self) -> list[pika.BlockingConnection]:
        return [c for c in (self._conn, self._publisher) if c is not None]

    def _connected(self) -> bool:
        return self._conn is not None and self._conn.is_open and self._publisher is not None and self._publisher.is_open

    def _service_publisher(self) -> None:
        """Let the publishing connection send and answer heartbeats: pika does that only
        inside its calls, and a process that polls for a while without publishing would
        otherwise have that connection closed by the broker."""
        now = time.monotonic()
        heartbeat = self._publisher._impl.params.heartbeat or 0  # as negotiated; 0: none
        if heartbeat and now - self._publisher_serviced >= heartbeat / 4:
            self._publisher_serviced = now
            self._publisher.process_data_events(time_limit=0)

    def _reconnect(self, cause: BaseException) -> None:
        if self._closed:
            raise TransportError("connection is closed")
        log.warning("amqp.connection_lost", url=self.safe_url, cause=_describe(cause))
        self._drop_connection()
        deadline = time.monotonic() + self.max_reconnect_s
        delay = FIRST_BACKOFF_S
        while True:
            try:
                self._connect()
                self._restore()
                log.info("amqp.reconnected", url=self.safe_url, node=f"{self._node.host}:{self._node.port}" if self._node else None, consumers=len(self._consumers))
                return
            except LeaseLost:
                raise  # the connection is fine; the role is gone
            except (TransportError, px.ChannelWrongStateError, *_LOST) as exc:
                self._drop_connection()
                remaining = deadline - time.monotonic()
                if isinstance(exc, _Refused):
                    raise TransportError(f"lost the connection to RabbitMQ at {self.safe_url}, and the broker refused the new one: {_describe(exc)}") from None
                if remaining <= 0:
                    raise TransportError(f"lost the connection to RabbitMQ at {self.safe_url} and could not reconnect within {self.max_reconnect_s:g} s: {_describe(exc)}") from None
                log.info("amqp.reconnect_failed", error=_describe(exc), retry_in=round(delay, 2))
                time.sleep(min(remaining, _jittered(delay)))
                delay = _next_backoff(delay)

    def _bounded(self, conn: pika.BlockingConnection, seconds: float, what: str, op: Callable[[], T]) -> T:
        """Run ``op``, a pika call on ``conn`` that blocks until the broker answers; if no answer comes
        within ``seconds``, abort the connection and raise :class:`_Unanswered` (a lost
        connection to :meth:`_with_retry`, which reconnects and runs the call again).

        pika waits for an answer without a limit, and its heartbeats keep a connection alive
        whose broker side stopped answering one channel: e.g. a publisher confirm that a
        quorum queue losing its leader never sends. The whole process would wait forever,
        with deliveries of its other consumers unread on the socket."""
        impl = conn._impl
        timer = None

        def expire() -> None:  # runs inside pika's I/O loop, in the blocking call's wait
            nonlocal timer
            if impl in self._blocked:  # a resource alarm holds publishers back: an answer of sorts, wait on
                timer = impl._adapter_call_later(seconds, expire)
                return
            _abort(conn)
            raise _Unanswered(f"{what}: no answer from the broker within {seconds:g} s")

        timer = impl._adapter_call_later(seconds, expire)
        try:
            return op()
        finally:
            _quietly(lambda: impl._adapter_remove_timeout(timer))

    def _drop_connection(self, *, graceful: bool = False) -> None:
        """Forget both connections. Not ``graceful`` (after a loss): abort them, for the
        AMQP close of the one still open would wait on a broker that may have stopped
        answering it too; the broker requeues their unacked deliveries either way."""
        dropped = self._connections()
        self._conn = self._publisher = None
        self._blocked.clear()
        for conn in dropped:
            if not conn.is_open:
                continue
            if not graceful:
                _abort(conn)
                continue
            try:
                conn.close()
            except Exception:  # already half dead: nothing to save
                pass

    def _restore(self) -> None:
        """After a reconnect: leases, declarations, then consumers."""
        self._retake_leases()
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
        self._drop_assemblers()
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

    def _retake_leases(self) -> None:
        """Take this connection's leases again, before anything else is restored: one that
        another connection took while this one was lost ends this transport's consumers
        (the role's messages are that one's now) and raises :class:`LeaseLost`."""
        for name in list(self._leases):
            try:
                self._admin.queue_declare(name, exclusive=True, auto_delete=True)
            except px.ChannelClosedByBroker as exc:
                self._admin = self._conn.channel()
                if "RESOURCE_LOCKED" not in exc.reply_text:
                    raise TransportError(f"take the lease {name!r} again: {exc.reply_text}") from None
                self._leases.clear()
                self._received.clear()
                for consumer in list(self._consumers.values()):
                    self._forget_consumer(consumer)
                log.warning("amqp.lease_lost", lease=name)
                raise LeaseLost(f"another connection holds the lease {name!r} now") from None

    def _with_retry(self, op: Callable[[], T]) -> T:
        """Run ``op``; if the connection is lost, reconnect and run it again. A transport
        whose last reconnect failed (the broker or cluster was away longer than
        ``max_reconnect_s``) has no connection: it tries again now, as after a loss."""
        for _ in range(10):
            self._check_open()
            try:
                if self._conn is None or self._publisher is None:
                    self._reconnect(TransportError("no connection: the last reconnect failed"))
                return op()
            except px.ChannelWrongStateError as exc:  # a closed channel: is a connection gone?
                if self._connected():
                    raise TransportError(f"channel closed: {exc}") from None
                self._reconnect(exc)
            except px.NoFreeChannels:  # a subclass of AMQPConnectionError, but the connection is fine
                raise ChannelLimitError(self._channel_limit_text()) from None
            except _LOST as exc:
                self._reconnect(exc)
        raise TransportError(f"the connection to {self.safe_url} keeps failing")

    def channel_limit(self) -> int:
        """Channels the broker allows on this connection (channel_max, as negotiated)."""
        return int(self._conn._impl.params.channel_max or pika.channel.MAX_CHANNELS) if self._conn is not None else pika.channel.MAX_CHANNELS

    def _channel_limit_text(self) -> str:
        return (f"no free channel on the connection to {self.safe_url}: the broker allows {self.channel_limit()} (channel_max) "
                f"and each consumer takes one; at most {self.consumer_capacity()} consumers (logical clients) fit on one connection")

    def consumer_capacity(self) -> int:
        """How many consumers (one channel each) fit beside this transport's own channels
        (admin, get, a request's)."""
        return max(0, self.channel_limit() - RESERVED_CHANNELS)

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("connection is closed")

    def _admin_op(self, what: str, op: Callable[[BlockingChannel], T]) -> T:
        def run() -> T:
            try:
                return op(self._admin)
            except px.ChannelClosedByBroker as exc:
                self._admin = self._conn.channel()  # the broker closed it; the next call needs one
                raise _channel_error(what, exc) from None

        return self._with_retry(run)


def _tune_reads(conn: pika.BlockingConnection) -> None:
    """Read the socket ``RECV_BYTES`` at a time instead of pika's 4 KiB: pika appends each read
    to its frame buffer (a copy of what is buffered) and tries to parse a frame after each,
    so 4 KiB reads of 128 KiB frames cost ~40% of consuming throughput. These are pika
    internals (1.4): if they are not there, leave pika's defaults."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    if isinstance(getattr(transport, "_MAX_RECV_BYTES", None), int) and isinstance(getattr(transport, "_MAX_CONSUME_BYTES", None), int):
        transport._MAX_RECV_BYTES = RECV_BYTES
        transport._MAX_CONSUME_BYTES = max(transport._MAX_CONSUME_BYTES, 4 * RECV_BYTES)


def _abort(conn: pika.BlockingConnection) -> None:
    """Close the socket without the AMQP close handshake (which a broker that stopped
    answering would not complete either); pika reports the connection lost on its next call.

    pika's abort only stops reading and writing: it leaves closing the socket to its I/O
    loop, which nothing runs again on a connection we drop. The broker would keep such a
    connection, with its consumers and the deliveries they hold, until heartbeats time it
    out (never, on a connection without heartbeats). So the socket is shut down here."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    if transport is not None:
        sock = getattr(transport, "_sock", None)
        _quietly(transport.abort)
        if isinstance(sock, socket.socket):
            _quietly(lambda: sock.shutdown(socket.SHUT_RDWR))


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


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        pass

