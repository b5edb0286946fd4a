"""The one small interface every transport implements (AMQP 0-9-1 semantics).

Two implementations: :mod:`brokerfl.transports.local` (in-process, the engine of
``brokerfl simulate``) and :mod:`brokerfl.transports.amqp` (pika against RabbitMQ). Both
keep the same semantics, and the tests of broker behaviour run on both:

- topic exchanges (``*`` one word, ``#`` zero or more words); the default exchange ``""``
  routes to the queue named by the routing key;
- FIFO per queue; manual acks; ``nack(requeue=True)`` puts a message back, flagged
  redelivered; unacked messages of a consumer that goes away are redelivered, flagged;
- :meth:`Transport.publish` returns only once the message is durable (publisher confirms);
  a message that no queue takes is an :class:`UnroutableError`. Its body is ``bytes``, or
  the buffers that make it up, in order (a :data:`Body`, e.g.
  :func:`brokerfl.wire.codec.encode_parts`): the AMQP transport then copies them once, straight
  into the chunks it sends, instead of joining them first and copying each chunk again;
- :meth:`Transport.dead_letter` moves a message to its queue's dead-letter queue with the
  reason in the ``x-brokerfl-reason`` header, then acks it;
- :meth:`Transport.request` / :meth:`Transport.reply`: request/reply (RabbitMQ's direct
  reply-to). A request carries a private reply address that lives only while its requester
  waits; replies are not durable, and a reply to a requester that is gone is dropped;
- :meth:`Transport.hold_lease`: a named lease that one connection holds at a time (an
  exclusive queue), released when that connection goes. A role that must have one actor
  (the run's server) is held by whoever holds its lease.
"""

from __future__ import annotations

import abc
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Literal

from brokerfl.wire.message import Envelope
from brokerfl.wire.names import MAX_ID_CHARS, bounded

Body = bytes | list[Any]
"""A body to publish: bytes, or a list of the buffers that make it up, in order (bytes and
1-d uint8 arrays, as :func:`brokerfl.wire.codec.encode_parts` returns them; valid while the
payload's arrays are). A list is joined only where bytes are needed."""


def _parts(body: Body) -> list[Any]:
    """The buffers of a body; a TypeError for anything but bytes or a list of buffers."""
    if isinstance(body, bytes):
        return [body]
    if not isinstance(body, list):
        raise TypeError(f"body must be bytes or a list of buffers, got {type(body).__name__}")
    return body


def body_size(body: Body) -> int:
    """Bytes in a body (bytes, or a list of buffers)."""
    return sum(memoryview(part).nbytes for part in _parts(body))


def joined(body: Body) -> bytes:
    """A body as one bytes object (a list of buffers costs one copy)."""
    return body if isinstance(body, bytes) else b"".join(_parts(body))


QueueKind = Literal["classic", "quorum", "stream"]
StreamOffset = Literal["first", "last", "next"] | int

REASON_HEADER = "x-brokerfl-reason"
ORIGIN_QUEUE_HEADER = "x-brokerfl-queue"
ORIGIN_KEY_HEADER = "x-brokerfl-routing-key"
DROPPED_HEADERS_HEADER = "x-brokerfl-dropped-headers"  # a dead letter's headers that were not safe to copy

# Bounds on what an envelope from the wire may hold (see envelope_problem).
MAX_TYPE_CHARS = 64
MAX_HEADER_KEY_CHARS = 128
MAX_HEADER_TEXT_CHARS = 256  # a string header copied into a dead letter is cut to this
MAX_REASON_CHARS = 1000
MAX_TIMESTAMP = 253402300799.0  # 9999-12-31: what AMQP's timestamp and datetime both hold
_INT64 = (-(2**63), 2**63 - 1)
REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's direct reply-to pseudo-queue (and the local transport's prefix)
ORIGIN_USER_HEADER = "x-brokerfl-user"  # a dead letter's original publisher (the copy is the dead-letterer's)
# A dead letter keeps the first DEAD_LETTER_EXCERPT_BYTES of the original's body, and its
# length in this header: the reason and a look at the start are what a reader of dead letters
# needs, and a whole 100 MiB body copied into the dead-letter queue and the journal is what a
# hostile publisher would send to fill the broker's memory.
DEAD_LETTER_EXCERPT_BYTES = 4096
ORIGINAL_LENGTH_HEADER = "x-brokerfl-original-length"


class TransportError(RuntimeError):
    """The transport could not do what was asked (connection lost, unknown queue, ...)."""


class LeaseLost(TransportError):
    """A lease this transport held was taken by another connection while this one was
    lost: the role it stood for is someone else's now. Raised by the operation that
    reconnected; no consumer of this transport was started again."""


class UnroutableError(TransportError):
    """A published message matched no queue."""


@dataclass(frozen=True)
class Delivery:
    """One message handed to a consumer; ack, nack or dead-letter it exactly once."""

    queue: str
    exchange: str
    routing_key: str
    envelope: Envelope
    body: bytes
    redelivered: bool
    tag: Any  # transport-specific delivery tag
    consumer_tag: str = ""
    problem: str = ""  # why the transport could not read it (its consumer dead-letters it with this reason)
    reply_to: str | None = None  # a request's private reply address (see Transport.request)


@dataclass(frozen=True)
class QueueInfo:
    name: str
    kind: QueueKind
    messages_ready: int
    consumers: int
    messages_unacked: int | None = None  # None where the transport cannot tell (AMQP alone)


OnDelivery = Callable[[Delivery], None]


class Transport(abc.ABC):
    """A connection to a broker, used by one thread. ``user`` is its broker login: every
    message it publishes carries it as ``user_id`` (a message whose envelope names another
    user is refused, as RabbitMQ does)."""

    user: str = ""
    # Whether a worker on this transport runs work aside (Context.run_aside) inline: the
    # in-process transport does (deterministic; simulate runs every role on one thread).
    work_inline: bool = False

    def inline_work(self) -> AbstractContextManager[None]:
        """Around work aside that a worker runs inline (only where :attr:`work_inline`): the
        in-process transport keeps that time out of the federation's clock."""
        return nullcontext()

    def clocks(self) -> tuple[Callable[[], float], Callable[[], float]]:
        """``(monotonic, wall)``: the clocks its workers' timers and deadlines run on (a
        :class:`~brokerfl.runtime.handler_table.Context`'s ``clock`` and ``wall``)."""
        return time.monotonic, time.time

    def __init__(self) -> None:
        self._dead_letter_targets: dict[str, str] = {}

    # ------------------------------------------------------------ topology (idempotent)

    @abc.abstractmethod
    def declare_exchange(self, name: str) -> None:
        """A durable topic exchange."""

    def declare_queue(
        self,
        name: str,
        *,
        kind: QueueKind = "classic",
        dead_letter_queue: str | None = None,
        max_length_bytes: int | None = None,
        max_age: str | None = None,
        single_active_consumer: bool = False,
    ) -> None:
        """A durable queue. ``dead_letter_queue`` receives its rejected and dead-lettered
        messages; ``max_length_bytes`` / ``max_age`` (e.g. ``"7D"``) bound a stream.
        ``single_active_consumer`` (RabbitMQ's ``x-single-active-consumer``): only the
        oldest of its consumers receives messages; when it goes, the next one takes over
        (and gets what the first left unacked)."""
        if dead_letter_queue is not None:
            self._dead_letter_targets[name] = dead_letter_queue
        extra = (
            {"single_active_consumer": True} if single_active_consumer else {}
        )  # only transports that know it are asked
        self._declare_queue(
            name,
            kind=kind,
            dead_letter_queue=dead_letter_queue,
            max_length_bytes=max_length_bytes,
            max_age=max_age,
            **extra,
        )

    @abc.abstractmethod
    def _declare_queue(
        self,
        name: str,
        *,
        kind: QueueKind,
        dead_letter_queue: str | None,
        max_length_bytes: int | None,
        max_age: str | None,
    ) -> None: ...

    @abc.abstractmethod
    def bind(self, queue: str, exchange: str, pattern: str) -> None: ...

    @abc.abstractmethod
    def delete_queue(self, name: str) -> None: ...

    @abc.abstractmethod
    def delete_exchange(self, name: str) -> None: ...

    @abc.abstractmethod
    def queue_info(self, name: str) -> QueueInfo:
        """Depth and consumers of a queue; TransportError if it does not exist."""

    # ------------------------------------------------------------ messages

    @abc.abstractmethod
    def publish(self, exchange: str, routing_key: str, envelope: Envelope, body: Body) -> None:
        """Publish a persistent message; returns once the broker has confirmed it. ``body``:
        bytes, or a list of the buffers that make it up (see :data:`Body`)."""

    @abc.abstractmethod
    def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 0, offset: StreamOffset | None = None
    ) -> str:
        """Start a consumer; returns its tag. ``prefetch`` bounds unacked deliveries (0: no
        bound); ``offset`` is where a consumer of a stream starts."""

    @abc.abstractmethod
    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer; its unacked deliveries go back to the queue, flagged redelivered."""

    def resubscriptions(self, consumer_tag: str) -> int:
        """How many times the broker-side consumer behind ``consumer_tag`` was subscribed
        anew since :meth:`consume` (after a lost connection or channel, or to change its
        prefetch). Each time, the broker took back what the old one held unacked, and on a
        single-active-consumer queue the new one lines up behind the others: a consumer
        that was the active one may not be any more. The local transport never loses a
        subscription (0)."""
        return 0

    @abc.abstractmethod
    def get(self, queue: str) -> Delivery | None:
        """Take one message without a consumer (it must then be acked or nacked)."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        """Give a message back (``requeue``) or reject it to its queue's dead-letter queue."""

    def dead_letter(
        self, delivery: Delivery, reason: str, *, exchange: str = "", routing_key: str | None = None
    ) -> None:
        """Publish a copy of a message with ``reason`` in its headers, then ack it. The copy
        goes to ``exchange``/``routing_key`` if given (brokerfl's workers route dead letters
        through the run's exchange, so the journal keeps them too), else to the dead-letter
        queue its queue was declared with on this connection.

        The copy is confirmed before the ack, so a crash in between leaves the message in
        both places, never in neither.
        """
        if routing_key is None:
            exchange, routing_key = "", self._dead_letter_targets.get(delivery.queue)
            if routing_key is None:
                raise TransportError(f"queue {delivery.queue!r} has no dead-letter queue; cannot dead-letter: {reason}")
        headers = dead_letter_headers(
            delivery.envelope.headers, reason, delivery.queue, delivery.routing_key, len(delivery.body)
        )
        headers[ORIGIN_USER_HEADER] = bounded(delivery.envelope.user_id, MAX_ID_CHARS)  # who published the original
        envelope = delivery.envelope
        if envelope_problem(envelope):  # its headers are safe now; the rest must be too
            envelope = safe_envelope(envelope)
        # the copy is ours (RabbitMQ would refuse another user's user_id); the header keeps who sent it
        self.publish(
            exchange, routing_key, replace(envelope, headers=headers, user_id=""), dead_letter_excerpt(delivery.body)
        )
        self.ack(delivery)

    @abc.abstractmethod
    def request(
        self, exchange: str, routing_key: str, envelope: Envelope, body: bytes, *, timeout: float
    ) -> tuple[Envelope, bytes] | None:
        """Publish a request (confirmed; unroutable is an error) that carries a private reply
        address, and wait up to ``timeout`` s for the first reply to it: (envelope, body),
        or None if none came. The request expires with the wait: a queue drops it if no
        consumer took it by then (a stream keeps its copy). The consumer of the request
        answers with :meth:`reply`."""

    @abc.abstractmethod
    def reply(self, request: Delivery, envelope: Envelope, body: bytes) -> None:
        """Send a reply to ``request``'s reply address. A reply to a requester that is gone
        is dropped without an error (RabbitMQ cannot tell the sender: it returns even a
        delivered reply as unroutable). TransportError if the request carries no address."""

    def hold_lease(self, name: str) -> bool:
        """Take the lease ``name`` if no other connection holds it: True if this one holds
        it now (or did already), False if another does. A lease is held until this
        connection closes or is lost (the broker then releases it at once, or when it
        misses the connection's heartbeats). After a reconnect the transport takes its
        leases again before it restarts any consumer; if another connection holds one by
        then, that operation raises :class:`LeaseLost` and no consumer is restarted."""
        raise TransportError(f"{type(self).__name__} has no leases")

    @abc.abstractmethod
    def poll(self, timeout: float = 0.0) -> int:
        """Run consumer callbacks for deliveries that arrive within ``timeout`` seconds;
        returns how many ran (0 on timeout)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; unacked deliveries are redelivered to other consumers."""

    def wake(self) -> None:  # noqa: B027 - optional: a transport that never blocks has nothing to wake
        """Make a :meth:`poll` under way return soon (or the next one, if none is): the one
        method another thread may call (work aside is done: its outcome waits)."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- untrusted envelopes


def envelope_problem(envelope: Any) -> str:
    """Why an envelope from the wire cannot be trusted as one ("" if it can): every field of
    the right type and within bounds, the timestamp a real time. Both transports check what
    they deliver with this, so a consumer sees the same refusals on either."""
    if not isinstance(envelope.type, str) or len(envelope.type) > MAX_TYPE_CHARS:
        return f"message type {bounded(envelope.type, 80)} is not a message type name"
    for name in ("message_id", "sender", "user_id"):
        value = getattr(envelope, name)
        if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
            return f"{name} {bounded(value, 80)} is not a string of at most {MAX_ID_CHARS} characters"
    ts = envelope.timestamp
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not (math.isfinite(ts) and 0 <= ts <= MAX_TIMESTAMP):
        return f"timestamp {bounded(ts, 80)} is out of range"
    if not isinstance(envelope.headers, Mapping):
        return f"headers of type {type(envelope.headers).__name__}"
    for key in envelope.headers:
        if not isinstance(key, str) or len(key) > MAX_HEADER_KEY_CHARS:
            return f"header name {bounded(key, 80)} is not a string of at most {MAX_HEADER_KEY_CHARS} characters"
    return ""


def safe_envelope(envelope: Any) -> Any:
    """A copy of an untrusted envelope that can be published (as a dead letter): fields that
    fail :func:`envelope_problem` are blanked (the reason header says what was wrong)."""

    def text(value: Any, limit: int) -> str:
        return value if isinstance(value, str) and len(value) <= limit else ""

    ts = envelope.timestamp
    good_ts = (
        not isinstance(ts, bool) and isinstance(ts, (int, float)) and math.isfinite(ts) and 0 <= ts <= MAX_TIMESTAMP
    )
    headers = envelope.headers if isinstance(envelope.headers, Mapping) else {}
    return Envelope(
        text(envelope.type, MAX_TYPE_CHARS),
        text(envelope.message_id, MAX_ID_CHARS),
        text(envelope.sender, MAX_ID_CHARS),
        float(ts) if good_ts else 0.0,
        safe_headers(headers)[0],
        user_id=text(envelope.user_id, MAX_ID_CHARS),
    )


def safe_headers(headers: Mapping[Any, Any]) -> tuple[dict[str, Any], int]:
    """The headers that may be copied into a dead letter, and how many were left out.

    Decision: a dead letter carries only headers of types every hop handles: string keys,
    and strings (cut to ``MAX_HEADER_TEXT_CHARS``), 64-bit ints, bools, finite floats and
    None as values. A decimal or timestamp header, say, makes RabbitMQ 3.10 close the
    channel that routes it to a stream (the journal), and a 2^63 timestamp is past what
    pika can decode: copying them would turn one hostile message into a stuck consumer.
    """
    kept: dict[str, Any] = {}
    dropped = 0
    for key, value in headers.items():
        if not isinstance(key, str) or len(key) > MAX_HEADER_KEY_CHARS:
            dropped += 1
        elif isinstance(value, str):
            kept[key] = value if len(value) <= MAX_HEADER_TEXT_CHARS else value[:MAX_HEADER_TEXT_CHARS]
        elif value is None or isinstance(value, bool):
            kept[key] = value
        elif isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
            kept[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            kept[key] = value
        else:
            dropped += 1
    return kept, dropped


def dead_letter_headers(
    headers: Mapping[Any, Any], reason: str, queue: str, routing_key: Any, length: int
) -> dict[str, Any]:
    """A dead letter's headers: the original's safe ones, the reason, where it came from and
    the length of its body (of which the dead letter keeps an excerpt)."""
    kept, dropped = safe_headers(headers)
    ours = (
        REASON_HEADER,
        ORIGIN_QUEUE_HEADER,
        ORIGIN_KEY_HEADER,
        DROPPED_HEADERS_HEADER,
        ORIGINAL_LENGTH_HEADER,
        ORIGIN_USER_HEADER,
    )
    kept = {k: v for k, v in kept.items() if k not in ours}
    kept[REASON_HEADER] = bounded(reason, MAX_REASON_CHARS)
    kept[ORIGIN_QUEUE_HEADER] = queue
    kept[ORIGIN_KEY_HEADER] = bounded(routing_key, MAX_HEADER_TEXT_CHARS)
    kept[ORIGINAL_LENGTH_HEADER] = length
    if dropped:
        kept[DROPPED_HEADERS_HEADER] = dropped
    return kept


def dead_letter_excerpt(body: bytes) -> bytes:
    """What a dead letter keeps of its original's body: the first
    :data:`DEAD_LETTER_EXCERPT_BYTES` (all of a small one, which then still decodes)."""
    return bytes(body[:DEAD_LETTER_EXCERPT_BYTES])


def hand_out(batch: Sequence[Any], inbox: deque[Any], deliver: Callable[[Any], bool]) -> int:
    """Run ``deliver`` on each entry of a batch taken from a transport's inbox (it returns
    whether it handed the entry to a consumer); the number handed. If a consumer's callback
    raises, the entries not reached go back to the front of the inbox: still ours, unacked,
    not lost. Both transports' ``poll`` end here."""
    ran = 0
    for i, entry in enumerate(batch):
        try:
            ran += bool(deliver(entry))
        except BaseException:
            inbox.extendleft(reversed(batch[i + 1 :]))
            raise
    return ran
