"""The one small interface every transport implements (AMQP 0-9-1 semantics).

Two implementations: :mod:`brokerfl.transports.local` (in-process, the engine of
``brokerfl simulate``) and :mod:`brokerfl.transports.amqp` (pika against RabbitMQ). Both
keep the same semantics, and the tests of broker behaviour run on both:

- topic exchanges (``*`` one word, ``#`` zero or more words); the default exchange ``""``
  routes to the queue named by the routing key;
- FIFO per queue; manual acks; ``nack(requeue=True)`` puts a message back, flagged
  redelivered; unacked messages of a consumer that goes away are redelivered, flagged;
- :meth:`Transport.publish` returns only once the message is durable (publisher confirms);
  a message that no queue takes is an :class:`UnroutableError`;
- :meth:`Transport.dead_letter` moves a message to its queue's dead-letter queue with the
  reason in the ``x-brokerfl-reason`` header, then acks it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from brokerfl.message import Envelope

QueueKind = Literal["classic", "quorum", "stream"]
StreamOffset = Literal["first", "last", "next"] | int

REASON_HEADER = "x-brokerfl-reason"
ORIGIN_QUEUE_HEADER = "x-brokerfl-queue"
ORIGIN_KEY_HEADER = "x-brokerfl-routing-key"


class TransportError(RuntimeError):
    """The transport could not do what was asked (connection lost, unknown queue, ...)."""


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


@dataclass(frozen=True)
class QueueInfo:
    name: str
    kind: QueueKind
    messages_ready: int
    consumers: int
    messages_unacked: int | None = None  # None where the transport cannot tell (AMQP alone)


OnDelivery = Callable[[Delivery], None]


class Transport(abc.ABC):
    """A connection to a broker, used by one thread."""

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
    ) -> None:
        """A durable queue. ``dead_letter_queue`` receives its rejected and dead-lettered
        messages; ``max_length_bytes`` / ``max_age`` (e.g. ``"7D"``) bound a stream."""
        if dead_letter_queue is not None:
            self._dead_letter_targets[name] = dead_letter_queue
        self._declare_queue(name, kind=kind, dead_letter_queue=dead_letter_queue, max_length_bytes=max_length_bytes, max_age=max_age)

    @abc.abstractmethod
    def _declare_queue(self, name: str, *, kind: QueueKind, dead_letter_queue: str | None, max_length_bytes: int | None, max_age: str | None) -> None: ...

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
    def publish(self, exchange: str, routing_key: str, envelope: Envelope, body: bytes) -> None:
        """Publish a persistent message; returns once the broker has confirmed it."""

    @abc.abstractmethod
    def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 0, offset: StreamOffset | None = None) -> str:
        """Start a consumer; returns its tag. ``prefetch`` bounds unacked deliveries (0: no
        bound); ``offset`` is where a consumer of a stream starts."""

    @abc.abstractmethod
    def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer; its unacked deliveries go back to the queue, flagged redelivered."""

    @abc.abstractmethod
    def get(self, queue: str) -> Delivery | None:
        """Take one message without a consumer (it must then be acked or nacked)."""

    @abc.abstractmethod
    def ack(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        """Give a message back (``requeue``) or reject it to its queue's dead-letter queue."""

    def dead_letter(self, delivery: Delivery, reason: str, *, exchange: str = "", routing_key: str | None = None) -> None:
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
        headers = {
            **delivery.envelope.headers,
            REASON_HEADER: reason[:4000],
            ORIGIN_QUEUE_HEADER: delivery.queue,
            ORIGIN_KEY_HEADER: delivery.routing_key,
        }
        self.publish(exchange, routing_key, replace(delivery.envelope, headers=headers), delivery.body)
        self.ack(delivery)

    @abc.abstractmethod
    def poll(self, timeout: float = 0.0) -> int:
        """Run consumer callbacks for deliveries that arrive within ``timeout`` seconds;
        returns how many ran (0 on timeout)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; unacked deliveries are redelivered to other consumers."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
