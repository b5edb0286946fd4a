"""The AMQP transport's settling of AMQP deliveries: ack, nack/requeue, reject, and
dead-lettering of deliveries that cannot make a message (a copy with the reason to the
queue's dead-letter queue, confirmed, then the ack).

:class:`Settler` is one part of :class:`brokerfl.transports.amqp.AmqpTransport`; a logical
message (many AMQP deliveries: its chunks) is settled by the consuming part
(:meth:`brokerfl.transports.amqp.consuming.Consumers.settle`), which settles them all here.
Deliveries of a lost connection cannot be settled any more (the broker redelivers them), so
settling one logs a warning instead of failing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import pika.exceptions as px
import structlog

from brokerfl.transports.amqp.connection import _LOST, AmqpConnection, _describe
from brokerfl.transports.amqp.deliveries import Consumer, Handle
from brokerfl.transports.amqp.properties import dead_letter_properties
from brokerfl.transports.base import TransportError, dead_letter_excerpt
from brokerfl.wire.names import bounded

log = structlog.get_logger("brokerfl.amqp")

How = Literal["ack", "requeue", "reject"]


class Settler:
    """Ack, nack and dead-letter AMQP deliveries of ``connection``. ``dead_letter_targets``:
    each queue's dead-letter queue, as declared on the transport (read when needed);
    ``user``: the connection's login, which a dead-letter copy is published as."""

    def __init__(self, connection: AmqpConnection, *, user: str, dead_letter_targets: Mapping[str, str]) -> None:
        self._connection = connection
        self._user = user
        self._dead_letter_targets = dead_letter_targets

    def live(self, h: Handle) -> bool:
        return h.generation == self._connection.generation and h.channel.is_open

    def settle(self, handles: list[Handle], how: How, c: Consumer | None) -> None:
        live = []
        for h in handles:
            if h.settled:
                continue
            h.settled = True
            if not self.live(h):
                if not (c is not None and c.stream):
                    log.warning(
                        "amqp.settle_dropped",
                        reason="its connection or channel is gone; the broker redelivers it",
                        delivery_tag=h.delivery_tag,
                    )
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
            if self._connection.conn is None or not self._connection.conn.is_open:
                self._connection.reconnect(exc)

    def dead_letter(self, queue: str, pieces: list[tuple[Handle, bytes]], reason: str, c: Consumer | None) -> None:
        """Dead-letter AMQP deliveries of a queue one by one with ``reason`` (chunks that
        cannot make a message): a copy (with an excerpt of the body) to the queue's
        dead-letter queue, confirmed, then the ack. Without a known dead-letter queue, reject
        them (the queue's own dead-lettering, if any: a client queue has none, and the
        journal keeps a copy). Not for a stream's: nothing can be dead-lettered from a stream
        (its consumer hands them out with the problem)."""
        target = self._dead_letter_targets.get(queue)
        log.error("amqp.dead_letter", queue=queue, reason=bounded(reason, 300), target=target, messages=len(pieces))
        for handle, body in pieces:
            if handle.settled or not self.live(handle):
                continue  # its connection or channel is gone: the broker redelivers it
            if target is None or (c is not None and c.stream):
                self.settle([handle], "ack" if c is not None and c.stream else "reject", c)
                continue
            try:
                properties = dead_letter_properties(
                    handle.properties, reason, queue, handle.routing_key, len(body), user=self._user
                )
                self._connection.publish("", target, properties, dead_letter_excerpt(body))
            except TransportError as exc:  # refused (the connection is fine): the queue's own dead-lettering
                log.error("amqp.dead_letter_failed", queue=queue, error=bounded(str(exc)))
                self.settle([handle], "reject", c)
                continue
            self.settle([handle], "ack", c)
