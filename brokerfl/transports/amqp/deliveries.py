"""What the AMQP transport holds of its consumers and their deliveries: one AMQP delivery
(:class:`Handle`), one consumer as the user knows it across re-subscribes and reconnects
(:class:`Consumer`), and one logical message handed out, made of one or more deliveries
(:class:`Tag`, a :class:`~brokerfl.transports.base.Delivery`'s ``tag``). Plain records: the
consuming and settling parts of :class:`brokerfl.transports.amqp.AmqpTransport` act on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pika
from pika.adapters.blocking_connection import BlockingChannel

from brokerfl.transports.amqp import chunks
from brokerfl.transports.base import OnDelivery, StreamOffset


@dataclass(eq=False)
class Handle:
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
class Consumer:
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
    subscriptions: int = 0  # basic.consume calls: on a new channel or the same one (resubscribe)
    cancelled: bool = False
    cancelled_by_broker: bool = False


@dataclass(eq=False)
class Tag:
    """``Delivery.tag``: the AMQP deliveries that make up one logical message."""

    handles: list[Handle]
    consumer: Consumer | None  # None: from get()
    assembler: chunks.Assembler | None  # set for chunked messages
    message_id: str | None = None
    epoch: int = 0  # the consumer's epoch at hand-out
    settled: bool = False

    def __repr__(self) -> str:
        return f"<amqp delivery {[h.delivery_tag for h in self.handles][:4]}{'...' if len(self.handles) > 4 else ''}>"
