"""The AMQP transport's connection: connecting, reconnecting with backoff, retrying an
operation on a new connection, publishing with confirms, and telling a lost connection from
a refused operation.

:class:`AmqpConnection` is one part of :class:`brokerfl.transports.amqp.AmqpTransport`,
which gives it what to do after a reconnect (``restore``: redeclare everything declared on
the transport, re-create the consumers). A lost connection is noticed by whatever call hits
it; :meth:`AmqpConnection.with_retry` reconnects with exponential backoff (up to
``max_reconnect_s``), calls ``restore``, and runs the call again. With ``retry_start`` the
first connection is tried the same way (:meth:`AmqpConnection.connect_first`): a server or
client started before its broker is up waits for it; a refused login is final at once
either way.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pika
import pika.exceptions as px
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from brokerfl.transports.amqp.properties import make_header_decoding_total
from brokerfl.transports.base import LeaseLost, TransportError, UnroutableError

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


class _Nacked(TransportError):
    """The broker nacked a publish (retried for a while before it becomes a TransportError)."""


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
for _name in (
    "pika.adapters.utils.connection_workflow",
    "pika.adapters.blocking_connection",
    "pika.adapters.utils.io_services_utils",
    "pika.adapters.base_connection",
    "pika.connection",
):
    logging.getLogger(_name).addFilter(_QUIET)


@contextlib.contextmanager
def _quiet_pika() -> Iterator[None]:
    _QuietConnect.active.on = True
    try:
        yield
    finally:
        _QuietConnect.active.on = False


def mask_url(url: str) -> str:
    """``amqp://user:secret@host/`` -> ``amqp://user:***@host/``."""
    return re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)


class AmqpConnection:
    """The transport's two connections to one node of the broker (or a cluster's), kept
    alive: connect, reconnect with backoff, retry an operation on a new connection, and the
    channels that are not a consumer's: the admin channel (declarations) and the publishing
    one (its own connection, in confirm mode). ``restore`` runs after every reconnect, before
    the operation that noticed the loss is retried, and returns how many consumers it
    re-created; a :class:`LeaseLost` from it passes through (the connection is fine; the
    role is gone)."""

    def __init__(
        self,
        nodes: list[pika.URLParameters],
        safe_url: str,
        *,
        max_reconnect_s: float,
        confirm_timeout: float,
        restore: Callable[[], int],
    ) -> None:
        self.nodes = nodes  # one, or a cluster's nodes
        self.safe_url = safe_url
        self.max_reconnect_s = max_reconnect_s
        self.confirm_timeout = confirm_timeout
        self._restore = restore
        self.node: pika.URLParameters | None = None  # the node of the current connection
        self.conn: pika.BlockingConnection | None = None  # consumers, declarations, get, requests
        self.publisher: pika.BlockingConnection | None = None  # the publishing channel only
        self.pub: BlockingChannel | None = None  # the publishing channel (confirm mode)
        self.admin: BlockingChannel | None = None  # declarations
        self.generation = 0  # bumped by every connect: deliveries do not survive a reconnect
        self.closed = False
        self._publisher_serviced = 0.0
        self._blocked: set[Any] = set()  # connections (pika's impl) a resource alarm holds back

    def connect(self) -> None:
        # a cluster's nodes in order, the one just lost last: failing over tries the others first
        nodes = [p for p in self.nodes if p is not self.node] + [p for p in self.nodes if p is self.node]
        conn = self._open(nodes)
        self.node = next(
            (p for p in nodes if (p.host, p.port) == (conn._impl.params.host, conn._impl.params.port)), None
        )
        try:
            # Publishing has a connection of its own: while pika waits for a publish's
            # confirm it reads whatever arrives on its connection, and on a shared one that
            # was deliveries, up to the consumers' prefetch (chunks of 16 MiB), taken into
            # memory before anything could spill them. On its own connection, deliveries
            # wait in the socket and the broker until the next poll.
            publisher = self._open(([self.node] if self.node else []) + [p for p in nodes if p is not self.node])
        except TransportError:
            _quietly(conn.close)
            raise
        self.conn, self.publisher = conn, publisher
        self._publisher_serviced = time.monotonic()
        self.generation += 1
        self.pub = publisher.channel()
        self.pub.confirm_delivery()
        self.admin = conn.channel()

    def connect_first(self) -> None:
        """The first connection, retried like a reconnect (same backoff, up to
        ``max_reconnect_s``), each failed attempt logged with the next retry's delay; a
        refused login or vhost is final at once. TransportError when it gives up."""
        deadline = time.monotonic() + self.max_reconnect_s
        delay, attempt = FIRST_BACKOFF_S, 0
        while True:
            attempt += 1
            try:
                self.connect()
                if attempt > 1:
                    log.info("amqp.connected", url=self.safe_url, attempts=attempt)
                return
            except (TransportError, *_LOST) as exc:
                self.drop()
                if isinstance(exc, _Refused):
                    raise
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(
                        f"cannot connect to RabbitMQ at {self.safe_url}: gave up after {attempt} attempts in "
                        f"{self.max_reconnect_s:g} s "
                        f"(--max-reconnect-s): {_describe(exc)}"
                    ) from None
                wait = min(remaining, _jittered(delay))
                log.warning(
                    "amqp.connect_failed",
                    url=self.safe_url,
                    attempt=attempt,
                    error=_describe(exc),
                    retry_in_s=round(wait, 2),
                    gives_up_in_s=round(remaining, 1),
                )
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
        # connection.blocked (a resource alarm), seen inside pika's waits (see bounded)
        conn._impl.add_on_connection_blocked_callback(lambda impl, _frame: self._blocked.add(impl))
        conn._impl.add_on_connection_unblocked_callback(lambda impl, _frame: self._blocked.discard(impl))
        return conn

    def channel(self) -> BlockingChannel:
        """A new channel on the consuming connection (a lost connection, if there is none:
        :meth:`with_retry` reconnects)."""
        if self.conn is None:
            raise px.ConnectionWrongStateError("no connection")
        return self.conn.channel()

    def admin_channel(self) -> BlockingChannel:
        """The admin channel (a lost connection, if there is none: :meth:`with_retry`
        reconnects)."""
        if self.admin is None:
            raise px.ConnectionWrongStateError("no connection")
        return self.admin

    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_open and self.publisher is not None and self.publisher.is_open

    def service_publisher(self) -> None:
        """Let the publishing connection send and answer heartbeats: pika does that only
        inside its calls, and a process that polls for a while without publishing would
        otherwise have that connection closed by the broker."""
        if self.publisher is None:
            return
        now = time.monotonic()
        heartbeat = self.publisher._impl.params.heartbeat or 0  # as negotiated; 0: none
        if heartbeat and now - self._publisher_serviced >= heartbeat / 4:
            self._publisher_serviced = now
            self.publisher.process_data_events(time_limit=0)

    def reconnect(self, cause: BaseException) -> None:
        if self.closed:
            raise TransportError("connection is closed")
        log.warning("amqp.connection_lost", url=self.safe_url, cause=_describe(cause))
        self.drop()
        deadline = time.monotonic() + self.max_reconnect_s
        delay = FIRST_BACKOFF_S
        while True:
            try:
                self.connect()
                consumers = self._restore()
                log.info(
                    "amqp.reconnected",
                    url=self.safe_url,
                    node=f"{self.node.host}:{self.node.port}" if self.node else None,
                    consumers=consumers,
                )
                return
            except LeaseLost:
                raise  # the connection is fine; the role is gone
            except (TransportError, px.ChannelWrongStateError, *_LOST) as exc:
                self.drop()
                remaining = deadline - time.monotonic()
                if isinstance(exc, _Refused):
                    raise TransportError(
                        f"lost the connection to RabbitMQ at {self.safe_url}, and the broker refused the new one: "
                        f"{_describe(exc)}"
                    ) from None
                if remaining <= 0:
                    raise TransportError(
                        f"lost the connection to RabbitMQ at {self.safe_url} and could not reconnect within "
                        f"{self.max_reconnect_s:g} s: {_describe(exc)}"
                    ) from None
                log.info("amqp.reconnect_failed", error=_describe(exc), retry_in=round(delay, 2))
                time.sleep(min(remaining, _jittered(delay)))
                delay = _next_backoff(delay)

    def bounded(self, conn: pika.BlockingConnection, seconds: float, what: str, op: Callable[[], T]) -> T:
        """Run ``op``, a pika call on ``conn`` that blocks until the broker answers; if no answer comes
        within ``seconds``, abort the connection and raise :class:`_Unanswered` (a lost
        connection to :meth:`with_retry`, which reconnects and runs the call again).

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

    def drop(self, *, graceful: bool = False) -> None:
        """Forget both connections. Not ``graceful`` (after a loss): abort them, for the
        AMQP close of the one still open would wait on a broker that may have stopped
        answering it too; the broker requeues their unacked deliveries either way."""
        dropped = [c for c in (self.conn, self.publisher) if c is not None]
        self.conn = self.publisher = None
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

    def close(self) -> None:
        """Close both connections (gracefully); every later call is a TransportError."""
        self.closed = True
        self.drop(graceful=True)

    def with_retry(self, op: Callable[[], T]) -> T:
        """Run ``op``; if the connection is lost, reconnect and run it again. A transport
        whose last reconnect failed (the broker or cluster was away longer than
        ``max_reconnect_s``) has no connection: it tries again now, as after a loss."""
        for _ in range(10):
            self.check_open()
            try:
                if self.conn is None or self.publisher is None:
                    self.reconnect(TransportError("no connection: the last reconnect failed"))
                return op()
            except px.ChannelWrongStateError as exc:  # a closed channel: is a connection gone?
                if self.connected():
                    raise TransportError(f"channel closed: {exc}") from None
                self.reconnect(exc)
            except px.NoFreeChannels:  # a subclass of AMQPConnectionError, but the connection is fine
                raise ChannelLimitError(self.channel_limit_text()) from None
            except _LOST as exc:
                self.reconnect(exc)
        raise TransportError(f"the connection to {self.safe_url} keeps failing")

    def channel_limit(self) -> int:
        """Channels the broker allows on this connection (channel_max, as negotiated)."""
        return (
            int(self.conn._impl.params.channel_max or pika.channel.MAX_CHANNELS)
            if self.conn is not None
            else pika.channel.MAX_CHANNELS
        )

    def channel_limit_text(self) -> str:
        return (
            f"no free channel on the connection to {self.safe_url}: the broker allows {self.channel_limit()} "
            "(channel_max) "
            f"and each consumer takes one; at most {self.consumer_capacity()} consumers (logical clients) fit on one "
            "connection"
        )

    def consumer_capacity(self) -> int:
        """How many consumers (one channel each) fit beside this transport's own channels
        (admin, get, a request's)."""
        return max(0, self.channel_limit() - RESERVED_CHANNELS)

    def check_open(self) -> None:
        if self.closed:
            raise TransportError("connection is closed")

    def admin_op(self, what: str, op: Callable[[BlockingChannel], T]) -> T:
        """``op`` on the admin channel, retried on a new connection; a channel the broker
        closed is reopened and its refusal is a TransportError."""

        def run() -> T:
            try:
                return op(self.admin_channel())
            except px.ChannelClosedByBroker as exc:
                self.admin = self.channel()  # the broker closed it; the next call needs one
                raise _channel_error(what, exc) from None

        return self.with_retry(run)

    # ------------------------------------------------------------ publishing

    def publish(
        self, exchange: str, routing_key: str, properties: pika.BasicProperties, body: bytes, *, mandatory: bool = True
    ) -> None:
        """One AMQP message, confirmed; retried on a new connection if the old one died
        before the confirm."""

        def run() -> None:
            assert self.publisher is not None and self.pub is not None  # with_retry connected
            pub = self.pub
            try:
                self.bounded(
                    self.publisher,
                    self.confirm_timeout,
                    f"confirm of a publish to {routing_key!r}",
                    lambda: pub.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory),
                )
            except px.UnroutableError:
                raise UnroutableError(f"no queue is bound to {routing_key!r} on exchange {exchange!r}") from None
            except px.NackError:
                # Publish again on a new channel. RabbitMQ 3.10 keeps a channel's view of a
                # quorum queue's leader: a channel that first published to the queue while
                # its leader was being re-elected (right after a cluster node died) had
                # every later publish nacked for minutes, while a new channel's were
                # confirmed at once (seen in tests/test_cluster.py, and with raw pika against a
                # 3-node cluster: a channel opened on a survivor right after the kill).
                self.renew_publish_channel()
                raise _Nacked(
                    f"the broker refused (nacked) a message to {routing_key!r} on exchange {exchange!r}"
                ) from None
            except px.ChannelClosedByBroker as exc:  # 404 no exchange, 406 message too large, ...
                self.renew_publish_channel()
                raise _channel_error(
                    f"publish {len(body)} bytes to {routing_key!r} on exchange {exchange!r}", exc
                ) from None

        # A nack is the broker saying "not now": e.g. a quorum queue or stream electing a new
        # leader after a cluster node died. Publish again with backoff (at-least-once:
        # consumers dedupe by message id), up to max_reconnect_s.
        deadline, delay = time.monotonic() + self.max_reconnect_s, 0.1
        while True:
            try:
                return self.with_retry(run)
            except _Nacked as exc:
                if time.monotonic() + delay > deadline:
                    raise TransportError(f"{exc} for {self.max_reconnect_s:g} s") from None
                log.info("amqp.publish_nacked", routing_key=routing_key, retry_in=round(delay, 2))
                time.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    def renew_publish_channel(self) -> None:
        """Replace the publishing channel (closed by the broker, or one whose publishes it
        nacks) with a new one in confirm mode."""
        if self.publisher is None:
            return  # no connection: the next connect opens one
        if self.pub is not None and self.pub.is_open:
            _quietly(self.pub.close)
        self.pub = self.publisher.channel()
        self.pub.confirm_delivery()


def _tune_reads(conn: pika.BlockingConnection) -> None:
    """Read the socket ``RECV_BYTES`` at a time instead of pika's 4 KiB: pika appends each read
    to its frame buffer (a copy of what is buffered) and tries to parse a frame after each,
    so 4 KiB reads of 128 KiB frames cost ~40% of consuming throughput
    (``docs/benchmarks/transport.md``, ``raw-4k``). These are pika
    internals (1.4): if they are not there, leave pika's defaults."""
    transport = getattr(getattr(conn, "_impl", None), "_transport", None)
    if (
        transport is not None
        and isinstance(getattr(transport, "_MAX_RECV_BYTES", None), int)
        and isinstance(getattr(transport, "_MAX_CONSUME_BYTES", None), int)
    ):
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
