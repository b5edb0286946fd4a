"""The AMQP transport's consuming side: consumers, reassembly of chunked messages, and
hand-out of whole messages as :class:`Delivery` objects; ``get`` without a consumer; the
settling of the logical messages handed out.

:class:`Consumers` is one part of :class:`brokerfl.transports.amqp.AmqpTransport`.
pika's callbacks only record what arrived (:meth:`Consumers._record`); :meth:`Consumers.poll`
turns that into deliveries (reassembling chunks) and runs user callbacks outside pika's
dispatch, so they may publish, ack, cancel or consume freely. Prefetch counts *logical*
messages: see :meth:`Consumers._maybe_resubscribe` and the docstring of
:mod:`brokerfl.transports.amqp`.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions as px
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from brokerfl.transports.amqp import chunks
from brokerfl.transports.amqp.connection import (
    _LOST,
    AmqpConnection,
    ChannelLimitError,
    _channel_error,
    _quietly,
    _recovering,
)
from brokerfl.transports.amqp.deliveries import Consumer, Handle, Tag
from brokerfl.transports.amqp.pika_body import Fragments, keep_fragments
from brokerfl.transports.amqp.properties import to_envelope
from brokerfl.transports.amqp.settling import How, Settler
from brokerfl.transports.base import (
    Delivery,
    OnDelivery,
    QueueInfo,
    StreamOffset,
    TransportError,
    hand_out,
)

log = structlog.get_logger("brokerfl.amqp")

STREAM_CREDIT = 16  # AMQP prefetch of a stream consumer asked for prefetch=0 (unbounded)


class Consumers:
    """Consumers, reassembly and hand-out; ``get``; settling of what was handed out.

    ``declared_kind``: the kind of a queue declared on the transport (None: not declared
    here); ``queue_info``: the transport's (a TransportError for a queue that is not there).
    ``assembler_bounds``: the keyword arguments of every :class:`chunks.Assembler`."""

    def __init__(
        self,
        connection: AmqpConnection,
        settler: Settler,
        *,
        declared_kind: Callable[[str], str | None],
        queue_info: Callable[[str], QueueInfo],
        chunk_timeout: float,
        assembler_bounds: dict[str, Any],
    ) -> None:
        self._connection = connection
        self._settler = settler
        self._declared_kind = declared_kind
        self._queue_info = queue_info
        self.chunk_timeout = chunk_timeout
        self._assembler_bounds = assembler_bounds
        self.consumers: dict[str, Consumer] = {}
        self.received: deque[tuple[Consumer, Handle, bytes | Fragments]] = deque()  # recorded by pika's callbacks
        self._inbox: deque[tuple[Consumer, Delivery]] = deque()
        self._get_assemblers: dict[str, chunks.Assembler] = {}
        self._getch: BlockingChannel | None = None
        # complete chunked messages handed to consumers, not yet settled: (consumer, id) -> tag
        self._in_hand: dict[tuple[str, str], Tag] = {}
        self._woken = False  # set on the I/O thread by the callback wake() asks for

    def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 0, offset: StreamOffset | None = None
    ) -> str:
        self._connection.check_open()
        kind = self._declared_kind(queue)
        if offset is not None and kind not in (None, "stream"):
            raise TransportError(f"queue {queue!r} is not a stream; offset does not apply")
        stream = kind == "stream" or offset is not None
        if len(self.consumers) >= self._connection.consumer_capacity():  # refused before any channel runs out
            raise ChannelLimitError(self._connection.channel_limit_text())
        consumer = Consumer(f"amqp-{uuid.uuid4().hex[:12]}", queue, on_delivery, max(0, prefetch), offset, stream)
        self._connection.with_retry(lambda: self._start_consumer(consumer))
        self.consumers[consumer.tag] = consumer
        return consumer.tag

    def _start_consumer(self, c: Consumer) -> None:
        """(Re)subscribe ``c`` on a channel of its own."""
        if c.stream and c.next_offset is not None:
            # resume after what was seen, or at the start of a message still being assembled
            starts = [
                p.handle.offset
                for part in c.assembler.partials.values()
                for p in part.ordered()
                if p.handle.offset is not None
            ]
            c.offset = min([c.next_offset, *starts])
        if c.channel is not None and c.channel.is_open:
            _quietly(c.channel.close)
        c.channel = channel = self._connection.channel()
        keep_fragments(channel, chunks.CHUNK_HEADER)  # a large chunk's frames are placed, not joined first
        c.generation = self._connection.generation
        c.epoch += 1
        c.held = c.logical = 0
        c.assembler.close()  # its partial messages come again from the broker
        c.assembler = self._new_assembler()
        self._in_hand = {k: t for k, t in self._in_hand.items() if k[0] != c.tag}
        c.amqp_prefetch = c.prefetch if (c.prefetch or not c.stream) else STREAM_CREDIT
        try:
            self._subscribe(c, channel)
        except px.ChannelClosedByBroker as exc:
            if not c.stream and "stream" in exc.reply_text.lower():  # a stream not declared here
                c.stream = True
                return self._start_consumer(c)
            raise _channel_error(f"consume from {c.queue!r}", exc) from None
        channel.add_on_cancel_callback(lambda _frame, c=c: setattr(c, "cancelled_by_broker", True))

    def _subscribe(self, c: Consumer, channel: BlockingChannel) -> None:
        channel.basic_qos(prefetch_count=c.amqp_prefetch)
        arguments = {"x-stream-offset": c.offset} if c.stream and c.offset is not None else None
        c.amqp_tag = amqp_tag = channel.basic_consume(
            c.queue, lambda ch, method, props, body, c=c: self._record(c, ch, method, props, body), arguments=arguments
        )
        c.subscriptions += 1
        c.held = 0
        if c.stream:
            _never_reject(channel, amqp_tag)

    def _record(
        self,
        c: Consumer,
        channel: BlockingChannel,
        method: Any,
        properties: pika.BasicProperties,
        body: bytes | Fragments,
    ) -> None:
        """pika's callback: note the delivery, nothing else (we are inside pika's dispatch)."""
        offset = (properties.headers or {}).get("x-stream-offset") if isinstance(properties.headers, dict) else None
        if not (
            isinstance(offset, int)
            and not isinstance(offset, bool)
            and (c.stream or self._declared_kind(c.queue) is None)
        ):
            offset = None  # a publisher's header on a queue's message, not the broker's stream offset
        handle = Handle(
            channel,
            method.delivery_tag,
            method.consumer_tag,
            self._connection.generation,
            _text(method.exchange),
            _text(method.routing_key),
            properties,
            method.redelivered,
            offset,
        )
        if method.consumer_tag == c.amqp_tag:
            c.held += 1
        self.received.append((c, handle, body))

    def resubscriptions(self, consumer_tag: str) -> int:
        c = self.consumers.get(consumer_tag)
        return 0 if c is None else max(0, c.subscriptions - 1)

    def cancel(self, consumer_tag: str) -> None:
        c = self.consumers.get(consumer_tag)
        if c is None:
            return
        self._forget_consumer(c)
        # Closing the channel is what makes RabbitMQ requeue its unacked deliveries.
        conn = self._connection.conn
        if c.channel is not None and c.channel.is_open and conn is not None and conn.is_open:
            try:
                c.channel.close()
            except _LOST as exc:  # the broker requeues everything of a dead connection anyway
                self._connection.reconnect(exc)

    def cancel_queue(self, queue: str) -> None:
        """Cancel the consumers of ``queue`` (before it is deleted)."""
        for consumer in [c for c in self.consumers.values() if c.queue == queue]:
            self.cancel(consumer.tag)

    def drop_get_assembler(self, queue: str) -> None:
        """Forget ``get``'s partial messages of ``queue`` (it was deleted)."""
        dropped = self._get_assemblers.pop(queue, None)
        if dropped is not None:
            dropped.close()

    def _forget_consumer(self, c: Consumer) -> None:
        c.cancelled = True
        c.assembler.close()
        self.consumers.pop(c.tag, None)
        self._inbox = deque(e for e in self._inbox if e[0] is not c)
        self._in_hand = {k: t for k, t in self._in_hand.items() if k[0] != c.tag}

    def restore(self) -> int:
        """After a reconnect (and the declarations): every consumer subscribed anew; how
        many there are now (one that cannot be is forgotten, unless its queue is still
        recovering: then the reconnect fails and is tried again)."""
        self.drop_assemblers()
        self.received.clear()
        self._getch = None
        # Unrun deliveries of queues come back from the broker; a stream's do not, keep them.
        self._inbox = deque(e for e in self._inbox if e[0].stream)
        for consumer in list(self.consumers.values()):
            try:
                self._start_consumer(consumer)
            except TransportError as exc:
                if _recovering(str(exc)):
                    raise
                log.error("amqp.reconsume_failed", queue=consumer.queue, error=str(exc))
                self._forget_consumer(consumer)
        return len(self.consumers)

    def forget_all(self) -> None:
        """End every consumer without a word to the broker (a lease was lost: the role's
        messages are another connection's now)."""
        self.received.clear()
        for consumer in list(self.consumers.values()):
            self._forget_consumer(consumer)

    def close(self) -> None:
        for c in list(self.consumers.values()):
            c.cancelled = True
            c.assembler.close()
        self.consumers.clear()
        self.drop_assemblers()
        self._inbox.clear()

    def wake(self) -> None:
        """pika's one thread-safe call: the callback runs in the I/O loop, inside the poll's
        wait (which it ends). A connection closed or being replaced takes no callback:
        then the caller's poll bound ends the wait."""
        conn = self._connection.conn
        if conn is None:
            return
        try:
            conn.add_callback_threadsafe(self._on_wake)
        except Exception:
            pass

    def _on_wake(self) -> None:
        self._woken = True

    def poll(self, timeout: float = 0.0) -> int:
        self._connection.check_open()
        deadline = time.monotonic() + max(0.0, timeout)
        self._woken = False  # a wake asked for before this poll ends it (its callback runs in the pump)
        while True:
            self._pump(max(0.0, deadline - time.monotonic()))
            if self._inbox or self._woken or time.monotonic() >= deadline:
                break
        batch = list(self._inbox)
        self._inbox.clear()

        def deliver(entry: tuple[Consumer, Delivery]) -> bool:
            consumer, delivery = entry
            if consumer.cancelled or (not consumer.stream and delivery.tag.epoch != consumer.epoch):
                return False  # cancelled, or its channel was lost meanwhile: the broker has it back
            consumer.on_delivery(delivery)
            return True

        return hand_out(batch, self._inbox, deliver)

    def _pump(self, time_limit: float) -> None:
        """Let pika read and dispatch for up to ``time_limit`` s, then turn what arrived into
        deliveries."""

        def run() -> None:
            assert self._connection.conn is not None  # with_retry connected
            # chunks left waiting by the last _assemble: see to them without waiting for more
            self._connection.conn.process_data_events(time_limit=0 if self.received else time_limit)
            self._connection.service_publisher()
            self._assemble()
            self._housekeeping()

        self._connection.with_retry(run)

    def _assemble(self) -> None:
        while self.received:
            c, handle, body = self.received.popleft()
            if c.cancelled or handle.generation != self._connection.generation or handle.channel is not c.channel:
                continue  # its channel is gone and the broker took it back
            if handle.offset is not None and not c.stream:
                c.stream = True  # a stream declared elsewhere, consumed without an offset
                if c.amqp_tag is not None:
                    _never_reject(handle.channel, c.amqp_tag)
            if c.stream and handle.offset is not None:
                c.next_offset = max(c.next_offset or 0, handle.offset + 1)
            try:
                info = chunks.parse(handle.properties.headers if isinstance(handle.properties.headers, dict) else {})
            except chunks.BadChunk as exc:
                self._dead_letter(c.queue, [(handle, body)], str(exc), c)
                continue
            if info is None:
                self._hand_out(c, [handle], bytes(body), None)
                continue
            if c.stream and info.index > 0 and not c.assembler.knows(info.message_id):
                self._settler.settle([handle], "ack", c)  # the message began before our offset
                continue
            outcome = c.assembler.add(info, body, handle, _sender(handle.properties))
            self._dead_letter_evicted(c.queue, c.assembler, c)
            if isinstance(outcome, chunks.Held):
                if c.stream:
                    self._settler.settle([handle], "ack", c)  # returns credit; a stream keeps it
            elif isinstance(outcome, chunks.Complete):
                self._hand_out(c, outcome.handles, outcome.body, outcome.message_id)
                # One reassembled message per poll: the chunks still waiting may complete
                # others (the last chunks of several spilled updates, each read back whole),
                # which would then all be in memory before the consumer had handled one.
                break
            elif isinstance(outcome, chunks.Extra):  # a publisher's retry, message not yet settled
                tag = self._in_hand.get((c.tag, outcome.message_id))
                if tag is None or tag.settled or c.stream:
                    self._settler.settle([handle], "ack", c)
                else:
                    tag.handles.append(handle)  # settled together with its message
            elif isinstance(outcome, chunks.Stale):
                log.info("amqp.duplicate_chunk_dropped", queue=c.queue, message_id=outcome.message_id)
                self._settler.settle([handle], "ack", c)
            elif isinstance(outcome, chunks.Corrupt):
                self._dead_letter(c.queue, list(zip(outcome.handles, outcome.bodies)), outcome.reason, c)

    def _new_assembler(self) -> chunks.Assembler:
        return chunks.Assembler(**self._assembler_bounds)

    def drop_assemblers(self) -> None:
        """Close the spill files of ``get``'s assemblers and forget them."""
        for assembler in self._get_assemblers.values():
            assembler.close()
        self._get_assemblers.clear()

    def _dead_letter_evicted(self, queue: str, assembler: chunks.Assembler, c: Consumer | None) -> None:
        for partial, reason in assembler.take_evicted():
            self._dead_letter(queue, partial.take(), reason, c)

    def _dead_letter(self, queue: str, pieces: list[tuple[Handle, Any]], reason: str, c: Consumer | None) -> None:
        """Deliveries that cannot make a message: dead-lettered (:meth:`Settler.dead_letter`),
        or from a stream, which keeps everything and from which nothing can be
        dead-lettered, handed to its reader one by one with the problem, to skip and count."""
        joined = [(handle, bytes(body)) for handle, body in pieces]  # a chunk received as Fragments, joined
        if c is not None and c.stream:
            for handle, body in joined:
                if handle.generation == self._connection.generation:
                    self._hand_out(c, [handle], body, None, problem=reason)
            return
        self._settler.dead_letter(queue, joined, reason, c)

    def _hand_out(
        self, c: Consumer, handles: list[Handle], body: bytes, message_id: str | None, *, problem: str = ""
    ) -> None:
        last = handles[-1] if message_id is None else max(handles, key=lambda h: h.delivery_tag)
        tag = Tag(handles, c, c.assembler if message_id else None, message_id, c.epoch)
        if c.stream:
            # A stream's ack only returns credit: keep one delivery per whole message (so
            # prefetch counts whole messages) and return the rest now.
            early = [h for h in handles if h is not last] if c.prefetch else list(handles)
            self._settler.settle(early, "ack", c)
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
        for c in list(self.consumers.values()):
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
                    reason = (
                        f"chunked message {partial.message_id}: only {len(partial.pieces)} of {partial.count} chunks "
                        f"arrived within {self.chunk_timeout:g} s"
                    )
                    self._dead_letter(c.queue, partial.take(), reason, c)
            self._maybe_resubscribe(c)

    def _maybe_resubscribe(self, c: Consumer | None) -> None:
        """Give a queue consumer room again when chunks, not whole messages, used up its
        AMQP prefetch (see the module docstring)."""
        if (
            c is None
            or c.cancelled
            or c.stream
            or c.prefetch == 0
            or c.generation != self._connection.generation
            or c.channel is None
        ):
            return
        if c.held < c.amqp_prefetch or c.logical >= c.prefetch:
            return
        # The broker stopped sending (held == its prefetch), so nothing is in flight: the
        # old consumer's deliveries stay on the channel, ours to settle.
        c.channel.basic_cancel(c.amqp_tag)
        c.amqp_prefetch = c.prefetch - c.logical
        self._subscribe(c, c.channel)

    # ------------------------------------------------------------ settling what was handed out

    def settle(self, delivery: Delivery, how: How) -> None:
        """Ack (``"ack"``), requeue or reject a delivery handed out by this transport: every
        AMQP delivery of its message."""
        tag = delivery.tag
        if not isinstance(tag, Tag):
            raise TransportError(f"not a delivery of this transport: {tag!r}")
        if tag.settled:
            raise TransportError(
                f"delivery {delivery.envelope.message_id!r} on queue {delivery.queue!r} was already settled"
            )
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
        self._settler.settle(tag.handles, how, c)
        if self._connection.conn is not None:  # else the last reconnect failed: the next one restarts the consumer
            self._connection.with_retry(lambda: self._maybe_resubscribe(c))

    # ------------------------------------------------------------ get

    def get(self, queue: str) -> Delivery | None:
        """Take one message without a consumer. A chunked message is reassembled by taking
        further messages; chunks of other messages taken meanwhile are kept for the next
        ``get`` (and given back when a ``get`` finds nothing, or at close)."""
        self._connection.check_open()
        kind = self._declared_kind(queue)
        if kind == "stream":
            raise TransportError(f"queue {queue!r} is a stream; consume it from an offset")
        if kind is None:
            self._queue_info(queue)  # a 404 must not close the get channel (and its deliveries)
        assembler = self._get_assemblers.setdefault(queue, self._new_assembler())
        while True:
            got = self._connection.with_retry(lambda: self._basic_get(queue))
            if assembler is not self._get_assemblers.get(queue):  # reconnected: start over
                assembler = self._get_assemblers.setdefault(queue, self._new_assembler())
            channel, method, properties, body = got
            if method is None:
                for partial in assembler.release():
                    self._settler.settle([p.handle for p in partial.ordered()], "requeue", None)
                return None
            handle = Handle(
                channel,
                method.delivery_tag,
                None,
                self._connection.generation,
                _text(method.exchange),
                _text(method.routing_key),
                properties,
                method.redelivered,
            )
            try:
                info = chunks.parse(properties.headers if isinstance(properties.headers, dict) else {})
            except chunks.BadChunk as exc:
                self._dead_letter(queue, [(handle, body)], str(exc), None)
                continue
            if info is None:
                return self._get_delivery(queue, [handle], body, None, None)
            outcome = assembler.add(info, body, handle, _sender(properties))
            self._dead_letter_evicted(queue, assembler, None)
            if isinstance(outcome, chunks.Complete):
                return self._get_delivery(queue, outcome.handles, outcome.body, outcome.message_id, assembler)
            if isinstance(outcome, chunks.Corrupt):
                self._dead_letter(queue, list(zip(outcome.handles, outcome.bodies)), outcome.reason, None)
            elif isinstance(outcome, (chunks.Stale, chunks.Extra)):
                # Extra: a copy of a message handed out by an earlier get; drop the copy
                self._settler.settle([handle], "ack", None)

    def _basic_get(self, queue: str) -> tuple[BlockingChannel, Any, Any, Any]:
        """One basic.get on the get channel (opened if need be): (that channel, method,
        properties, body); method None when the queue is empty."""
        if self._getch is None or not self._getch.is_open:
            self._getch = self._connection.channel()
        channel = self._getch
        try:
            return (channel, *channel.basic_get(queue, auto_ack=False))
        except px.ChannelClosedByBroker as exc:  # e.g. the queue was deleted by someone else
            self._getch = None
            raise _channel_error(f"get from {queue!r}", exc) from None

    def _get_delivery(
        self, queue: str, handles: list[Handle], body: bytes, message_id: str | None, assembler: chunks.Assembler | None
    ) -> Delivery:
        last = handles[-1]
        tag = Tag(handles, None, assembler, message_id)
        envelope, problem = to_envelope(last.properties)
        return Delivery(
            queue,
            last.exchange,
            last.routing_key,
            envelope,
            body,
            any(h.redelivered for h in handles),
            tag,
            problem=problem,
            reply_to=last.properties.reply_to,
        )


def _never_reject(channel: BlockingChannel, amqp_tag: str) -> None:
    """Make pika drop, never reject, the deliveries of stream consumer ``amqp_tag`` that
    it holds when the consumer is cancelled.

    pika cancels a channel's consumers whenever the channel or its connection closes (our
    ``cancel``, a reconnect, ``close``), and for a consumer with manual acks it rejects
    (requeue) each delivery it received and had not dispatched yet, and each one arriving
    before cancel-ok. A stream takes acks only: RabbitMQ answers such a reject by closing
    the whole connection (540 NOT_IMPLEMENTED), with every other consumer on it and their
    unacked deliveries. A stream needs nothing back (it keeps every message; the credit of
    an undispatched delivery goes with its channel), so pika is told to treat this
    consumer as it treats an auto-ack one on the way out: deliveries are dropped. Acks
    are still ours to send (pika does not look at these flags when acking). Two pika
    internals, present in 1.3 and 1.4 (renamed ones fail the consume loudly;
    ``tests/test_stream_reader.py`` checks the connection survives on RabbitMQ)."""
    channel._impl._consumers_with_noack.add(amqp_tag)
    info = channel._consumer_infos.get(amqp_tag)
    if info is not None:
        info.auto_ack = True


def _sender(properties: pika.BasicProperties) -> str:
    return properties.app_id if isinstance(properties.app_id, str) else ""


def _text(value: Any) -> str:
    """pika hands over a short string that is not UTF-8 as bytes."""
    return value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
