"""The AMQP transport's settling: ack, nack/requeue, reject, and dead-lettering of AMQP
deliveries that cannot make a message (a copy with the reason to the queue's dead-letter
queue, confirmed, then the ack).

:class:`SettlingMixin` is one part of :class:`brokerfl.transports.amqp.AmqpTransport`. A
logical message may be many AMQP deliveries (its chunks): settling it settles them all.
Deliveries of a lost connection cannot be settled any more (the broker redelivers them), so
settling one logs a warning instead of failing.
"""

from __future__ import annotations

import pika.exceptions as px
import structlog

from brokerfl.names import bounded
from brokerfl.transport import Delivery, TransportError, dead_letter_excerpt
from brokerfl.transports.amqp_connection import _LOST, _describe
from brokerfl.transports.amqp_consuming import _Consumer, _Handle, _Tag
from brokerfl.transports.envelope import dead_letter_properties

log = structlog.get_logger("brokerfl.amqp")


class SettlingMixin:
    """Ack, nack and dead-letter deliveries of this connection."""

    user: str | None
    _generation: int
    _dead_letter_targets: dict[str, str]

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
        if self._conn is not None:  # else the last reconnect failed: the next one restarts the consumer
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
        a message): a copy (with an excerpt of the body) to the queue's dead-letter queue,
        confirmed, then the ack. Without a known dead-letter queue, reject them (the queue's
        own dead-lettering, if any: a client queue has none, and the journal keeps a copy)."""
        pieces = [(handle, bytes(body)) for handle, body in pieces]  # a chunk received as Fragments, joined
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
                properties = dead_letter_properties(handle.properties, reason, queue, handle.routing_key, len(body), user=self.user)
                self._publish_raw("", target, properties, dead_letter_excerpt(body))
            except TransportError as exc:  # refused (the connection is fine): the queue's own dead-lettering
                log.error("amqp.dead_letter_failed", queue=queue, error=bounded(str(exc)))
                self._settle_handles([handle], "reject", c)
                continue
            self._settle_handles([handle], "ack", c)
