"""The in-process transport: a broker in memory with AMQP's semantics.

This is what ``brokerfl simulate`` runs on, so it is a product, not a mock: topic routing
with ``*`` and ``#``, FIFO per queue, prefetch, manual acks, nack with requeue, rejection
to a dead-letter queue, redelivery (flagged) of what a departed consumer left unacked, and
append-only streams read from an offset. One :class:`LocalBroker` is shared by any number
of :class:`LocalTransport` connections, from one thread or several.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import TypeVar

from brokerfl.transports.base import (
    REPLY_TO,
    Body,
    Delivery,
    OnDelivery,
    QueueInfo,
    QueueKind,
    StreamOffset,
    Transport,
    TransportError,
    UnroutableError,
    envelope_problem,
    hand_out,
    joined,
)
from brokerfl.wire.message import Envelope


def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: words split on '.', ``*`` is one word, ``#`` zero or more."""
    return _match(pattern.split("."), routing_key.split("."))


def _match(pattern: list[str], words: list[str]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_match(rest, words[i:]) for i in range(len(words) + 1))
    if not words:
        return False
    return (head == "*" or head == words[0]) and _match(rest, words[1:])


K = TypeVar("K")


class _Bindings:
    """One topic exchange's bindings, indexed so that routing a key costs O(its words), not
    O(bindings): exact patterns by the pattern, ``prefix.#`` patterns by their prefix, and
    only the rare other wildcard patterns (``*``, ``#`` inside) matched one by one."""

    def __init__(self) -> None:
        self.all: dict[tuple[str, str], None] = {}  # (pattern, queue), in binding order
        self._exact: dict[str, set[str]] = {}
        self._prefix: dict[tuple[str, ...], set[str]] = {}  # "a.b.#" -> ("a", "b"); "#" -> ()
        self._other: dict[tuple[str, str], None] = {}

    def add(self, pattern: str, queue: str) -> None:
        if (pattern, queue) in self.all:
            return
        self.all[(pattern, queue)] = None
        words = pattern.split(".")
        if "*" not in words and "#" not in words:
            self._exact.setdefault(pattern, set()).add(queue)
        elif words[-1] == "#" and "*" not in words and "#" not in words[:-1]:
            self._prefix.setdefault(tuple(words[:-1]), set()).add(queue)
        else:
            self._other[(pattern, queue)] = None

    def remove_queue(self, queue: str) -> None:
        for pattern, q in [b for b in self.all if b[1] == queue]:
            del self.all[(pattern, q)]
            self._other.pop((pattern, q), None)
            _discard(self._exact, pattern, q)
            _discard(self._prefix, tuple(pattern.split(".")[:-1]), q)

    def match(self, routing_key: str) -> set[str]:
        words = routing_key.split(".")
        names = set(self._exact.get(routing_key, ()))
        for i in range(len(words) + 1):  # "a.#" takes "a" too: # is zero or more words
            names.update(self._prefix.get(tuple(words[:i]), ()))
        names.update(q for pattern, q in self._other if topic_matches(pattern, routing_key))
        return names


@dataclass
class _Message:
    exchange: str
    routing_key: str
    envelope: Envelope
    body: bytes
    redelivered: bool = False
    appended: float = 0.0  # streams: time.monotonic() when appended, for retention by age
    reply_to: str | None = None  # a request's reply address
    expires: float | None = None  # time.monotonic() after which a queue drops it unconsumed (a request's)


@dataclass
class _Consumer:
    tag: str
    queue: str
    connection: LocalTransport
    on_delivery: OnDelivery
    prefetch: int
    unacked: int = 0
    stream_position: int = 0  # streams only: the next offset to deliver


@dataclass
class _Queue:
    name: str
    kind: QueueKind
    dead_letter_queue: str | None
    max_length_bytes: int | None
    max_age_s: float | None = None
    single_active_consumer: bool = False  # only consumers[0] (the oldest) receives
    ready: deque[_Message] = field(default_factory=deque)
    log: list[_Message] = field(default_factory=list)  # streams: append-only
    log_start: int = 0  # streams: offset of log[0], after retention dropped older entries
    log_bytes: int = 0  # streams: bytes of the bodies in log
    unacked: dict[int, tuple[_Message, _Consumer]] = field(default_factory=dict)
    consumers: list[_Consumer] = field(default_factory=list)
    next_consumer: int = 0

    def stream_bytes(self) -> int:
        return self.log_bytes


class InlineWorkClock:
    """The federation's time on one :class:`LocalBroker`: real time less the time spent in
    work aside run inline (an app's training or evaluation).

    On RabbitMQ each client trains in its own process, all at once; ``simulate`` runs them
    one after another on one thread. Were those trainings to take the federation's time,
    a round's deadline would pass while the clients before the last one train, and the
    last would find its task already overdue. So the timers and deadlines of the workers
    on this broker do not see inline work: a client judges its own training against the
    task's deadline by the training's own duration (handlers/workflows/client.py), as if
    it had started when the task went out, as it would have in parallel."""

    def __init__(self) -> None:
        self.excluded_s = 0.0
        self._depth = 0

    def monotonic(self) -> float:
        return time.monotonic() - self.excluded_s

    def time(self) -> float:
        return time.time() - self.excluded_s

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Time spent in the block is not the federation's (work run inline)."""
        self._depth += 1
        started = time.monotonic()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:  # nested blocks: counted once, by the outermost
                self.excluded_s += time.monotonic() - started


class LocalBroker:
    """Exchanges, queues and bindings in memory; thread-safe."""

    def __init__(self) -> None:
        self.clock = InlineWorkClock()
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.exchanges: dict[str, _Bindings] = {"": _Bindings()}
        self.queues: dict[str, _Queue] = {}
        # queues that may have something to hand out (dispatch looks at these, not at all)
        self.pending: dict[str, None] = {}
        self.leases: dict[str, LocalTransport] = {}  # lease name -> the connection that holds it
        self._tags = itertools.count(1)

    def next_tag(self) -> int:
        return next(self._tags)

    def route(self, exchange: str, routing_key: str) -> list[_Queue]:
        if exchange == "":
            queue = self.queues.get(routing_key)
            return [queue] if queue else []
        if exchange not in self.exchanges:
            raise TransportError(f"no exchange {exchange!r}")
        names = self.exchanges[exchange].match(routing_key)
        return [self.queues[n] for n in sorted(names) if n in self.queues]

    def enqueue(self, queue: _Queue, message: _Message) -> None:
        if queue.kind == "stream":
            message.appended = time.monotonic()
            queue.log.append(message)
            queue.log_bytes += len(message.body)
            too_old = message.appended - queue.max_age_s if queue.max_age_s is not None else None
            cut = 0
            while len(queue.log) - cut > 1 and (
                (queue.max_length_bytes is not None and queue.log_bytes > queue.max_length_bytes)
                or (too_old is not None and queue.log[cut].appended < too_old)
            ):
                queue.log_bytes -= len(queue.log[cut].body)
                cut += 1
            if cut:
                del queue.log[:cut]
                queue.log_start += cut
        else:
            queue.ready.append(message)
        self.pending[queue.name] = None

    def dispatch(self) -> None:
        """Hand ready messages to consumers with room under their prefetch, round robin.

        Only queues marked pending are looked at: a message arrived, a consumer came or got
        room (a settle), or messages were requeued. A queue whose consumers have no room
        leaves the set until one settles, so with N client queues a poll costs O(queues
        that changed), not O(N)."""
        for name in list(self.pending):
            queue = self.queues.get(name)
            if queue is None or not self._dispatch_queue(queue):
                self.pending.pop(name, None)

    def _dispatch_queue(self, queue: _Queue) -> bool:
        """Hand out what can be handed out; True if the queue must be looked at again at
        the next dispatch even if nothing changes (a request at its head expires)."""
        if queue.kind == "stream":
            for consumer in queue.consumers:
                consumer.stream_position = max(consumer.stream_position, queue.log_start)
                while consumer.stream_position < queue.log_start + len(queue.log) and _has_room(consumer):
                    message = queue.log[consumer.stream_position - queue.log_start]
                    # as RabbitMQ does, a stream delivery says its offset in a header
                    if isinstance(message.envelope.headers, dict):
                        message = replace(
                            message,
                            envelope=replace(
                                message.envelope,
                                headers={**message.envelope.headers, "x-stream-offset": consumer.stream_position},
                            ),
                        )
                    consumer.stream_position += 1
                    self._hand_over(queue, consumer, message)
            return False
        _drop_expired(queue)
        while queue.ready and queue.consumers:
            picked = self._pick(queue)
            if picked is None:
                break
            self._hand_over(queue, picked, queue.ready.popleft())
            _drop_expired(queue)
        return bool(queue.ready) and queue.ready[0].expires is not None

    def _pick(self, queue: _Queue) -> _Consumer | None:
        if queue.single_active_consumer:
            active = queue.consumers[0]
            return active if _has_room(active) else None
        n = len(queue.consumers)
        for i in range(n):
            consumer = queue.consumers[(queue.next_consumer + i) % n]
            if _has_room(consumer):
                queue.next_consumer = (queue.next_consumer + i + 1) % n
                return consumer
        return None

    def _hand_over(self, queue: _Queue, consumer: _Consumer, message: _Message) -> None:
        tag = self.next_tag()
        queue.unacked[tag] = (message, consumer)
        consumer.unacked += 1
        consumer.connection._inbox.append(
            Delivery(
                queue=queue.name,
                exchange=message.exchange,
                routing_key=message.routing_key,
                envelope=message.envelope,
                body=message.body,
                redelivered=message.redelivered,
                tag=tag,
                consumer_tag=consumer.tag,
                problem=envelope_problem(message.envelope),  # as the AMQP transport checks what it receives
                reply_to=message.reply_to,
            )
        )

    def settle(self, delivery: Delivery) -> _Message:
        queue = self.queues.get(delivery.queue)
        entry = queue.unacked.pop(delivery.tag, None) if queue else None
        if queue is None or entry is None:
            raise TransportError(f"unknown delivery tag {delivery.tag} on queue {delivery.queue!r} (already settled?)")
        message, consumer = entry
        consumer.unacked -= 1
        self.pending[queue.name] = None  # its consumer has room again
        return message

    def requeue(self, queue: _Queue, messages: list[_Message]) -> None:
        """Put messages back at the head of the queue in their original order."""
        if queue.kind == "stream":
            return  # a stream keeps everything; nothing to put back
        for message in reversed(messages):
            queue.ready.appendleft(replace(message, redelivered=True))
        self.pending[queue.name] = None


def _drop_expired(queue: _Queue) -> None:
    """Expired messages at the head go (RabbitMQ too expires messages as they reach the head)."""
    now = time.monotonic()
    while queue.ready and queue.ready[0].expires is not None and queue.ready[0].expires <= now:
        queue.ready.popleft()


def _discard(index: dict[K, set[str]], key: K, queue: str) -> None:
    """Take ``queue`` out of a bindings index's entry ``key`` (and the entry, once empty)."""
    if key in index:
        index[key].discard(queue)
        if not index[key]:
            del index[key]


def _has_room(consumer: _Consumer) -> bool:
    return consumer.prefetch == 0 or consumer.unacked < consumer.prefetch


class LocalTransport(Transport):
    """One connection to a :class:`LocalBroker`, logged in as ``user`` (stamped on what it
    publishes as ``user_id``, like RabbitMQ's validated user_id). Its workers run work
    aside inline (:attr:`Transport.work_inline`)."""

    work_inline = True

    def clocks(self) -> tuple[Callable[[], float], Callable[[], float]]:
        return self.broker.clock.monotonic, self.broker.clock.time

    def inline_work(self) -> AbstractContextManager[None]:
        """Around work aside run inline: its time is not the federation's (:class:`InlineWorkClock`)."""
        return self.broker.clock.excluded()

    def __init__(self, broker: LocalBroker | None = None, *, user: str = "guest") -> None:
        super().__init__()
        self.broker = broker or LocalBroker()
        self.user = user
        self._inbox: deque[Delivery] = deque()
        self._consumers: dict[str, _Consumer] = {}
        self._get_tags: dict[str, set[int]] = {}  # basic.get deliveries not yet settled, by queue
        self._closed = False
        self._woken = False  # set by wake() (another thread), under the broker's lock

    # ------------------------------------------------------------ topology

    def declare_exchange(self, name: str) -> None:
        with self.broker.lock:
            self.broker.exchanges.setdefault(name, _Bindings())

    def _declare_queue(
        self,
        name: str,
        *,
        kind: QueueKind,
        dead_letter_queue: str | None,
        max_length_bytes: int | None,
        max_age: str | None,
        single_active_consumer: bool = False,
    ) -> None:
        with self.broker.lock:
            existing = self.broker.queues.get(name)
            if existing is not None:
                if existing.kind != kind:  # RabbitMQ refuses a redeclare with other arguments
                    raise TransportError(f"queue {name!r} exists as a {existing.kind} queue, not {kind}")
                if existing.single_active_consumer != single_active_consumer:
                    raise TransportError(
                        f"queue {name!r} exists with x-single-active-consumer={existing.single_active_consumer}"
                    )
                return
            self.broker.queues[name] = _Queue(
                name, kind, dead_letter_queue, max_length_bytes, _age_seconds(max_age), single_active_consumer
            )

    def bind(self, queue: str, exchange: str, pattern: str) -> None:
        with self.broker.lock:
            if exchange not in self.broker.exchanges:
                raise TransportError(f"no exchange {exchange!r}")
            if queue not in self.broker.queues:
                raise TransportError(f"no queue {queue!r}")
            self.broker.exchanges[exchange].add(pattern, queue)

    def delete_queue(self, name: str) -> None:
        with self.broker.lock:
            self.broker.queues.pop(name, None)
            self.broker.pending.pop(name, None)
            for bindings in self.broker.exchanges.values():
                bindings.remove_queue(name)

    def delete_exchange(self, name: str) -> None:
        with self.broker.lock:
            if name:
                self.broker.exchanges.pop(name, None)

    def queue_info(self, name: str) -> QueueInfo:
        with self.broker.lock:
            queue = self._queue(name)
            ready = len(queue.log) if queue.kind == "stream" else len(queue.ready)
            return QueueInfo(name, queue.kind, ready, len(queue.consumers), len(queue.unacked))

    def _queue(self, name: str) -> _Queue:
        queue = self.broker.queues.get(name)
        if queue is None:
            raise TransportError(f"no queue {name!r}")
        return queue

    # ------------------------------------------------------------ messages

    def publish(self, exchange: str, routing_key: str, envelope: Envelope, body: Body) -> None:
        self._publish(exchange, routing_key, envelope, joined(body))

    def _publish(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope,
        body: bytes,
        reply_to: str | None = None,
        expires: float | None = None,
    ) -> None:
        self._check_open()
        if not isinstance(body, bytes):  # the AMQP transport (pika) takes only bytes; keep that rule here
            raise TypeError(f"body must be bytes, got {type(body).__name__}")
        if envelope.user_id and envelope.user_id != self.user:  # RabbitMQ: 406 PRECONDITION_FAILED
            raise TransportError(
                f"user_id property set to {envelope.user_id!r} but authenticated user was {self.user!r}"
            )
        envelope = replace(envelope, user_id=self.user)
        with self.broker.changed:
            queues = self.broker.route(exchange, routing_key)
            if not queues:
                raise UnroutableError(f"no queue is bound to {routing_key!r} on exchange {exchange!r}")
            for queue in queues:
                # a stream keeps everything (RabbitMQ's streams ignore message TTL too)
                self.broker.enqueue(
                    queue,
                    _Message(
                        exchange,
                        routing_key,
                        envelope,
                        body,
                        reply_to=reply_to,
                        expires=None if queue.kind == "stream" else expires,
                    ),
                )
            self.broker.changed.notify_all()

    def request(
        self, exchange: str, routing_key: str, envelope: Envelope, body: bytes, *, timeout: float
    ) -> tuple[Envelope, bytes] | None:
        # A private queue, as RabbitMQ's direct reply-to is private to the requesting channel:
        # it exists only while this call waits.
        address = f"{REPLY_TO}.{uuid.uuid4().hex}"
        with self.broker.lock:
            self.broker.queues[address] = inbox = _Queue(address, "classic", None, None)
        try:
            deadline = time.monotonic() + timeout
            self._publish(exchange, routing_key, envelope, body, address, deadline)
            with self.broker.changed:
                while not inbox.ready:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    self.broker.changed.wait(remaining)
                reply = inbox.ready.popleft()
                return reply.envelope, reply.body
        finally:
            with self.broker.lock:
                self.broker.queues.pop(address, None)

    def reply(self, request: Delivery, envelope: Envelope, body: bytes) -> None:
        self._check_open()
        if not request.reply_to:
            raise TransportError(f"message {request.envelope.message_id!r} is not a request: it has no reply address")
        with self.broker.changed:
            inbox = self.broker.queues.get(request.reply_to)
            if inbox is None:
                return  # its requester is gone: dropped, as RabbitMQ drops it
            self.broker.enqueue(inbox, _Message("", request.reply_to, envelope, body))
            self.broker.changed.notify_all()

    def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int = 0, offset: StreamOffset | None = None
    ) -> str:
        self._check_open()
        with self.broker.changed:
            q = self._queue(queue)
            tag = f"local-{self.broker.next_tag()}"
            consumer = _Consumer(tag, queue, self, on_delivery, prefetch)
            if q.kind == "stream":
                consumer.stream_position = _stream_start(q, "next" if offset is None else offset)
            elif offset is not None:
                raise TransportError(f"queue {queue!r} is not a stream; offset does not apply")
            q.consumers.append(consumer)
            self._consumers[tag] = consumer
            self.broker.pending[queue] = None
            self.broker.changed.notify_all()
            return tag

    def cancel(self, consumer_tag: str) -> None:
        with self.broker.changed:
            consumer = self._consumers.pop(consumer_tag, None)
            if consumer is None:
                return
            queue = self.broker.queues.get(consumer.queue)
            if queue is None:
                return
            queue.consumers.remove(consumer)
            # Deliveries still in the inbox were never seen by the application: they and
            # the seen-but-unacked ones all go back, in queue order (tags grow with time).
            self._inbox = deque(d for d in self._inbox if d.consumer_tag != consumer_tag)
            mine = sorted(t for t, (_, c) in queue.unacked.items() if c is consumer)
            messages = [queue.unacked.pop(t)[0] for t in mine]
            self.broker.requeue(queue, messages)
            self.broker.changed.notify_all()

    def get(self, queue: str) -> Delivery | None:
        self._check_open()
        with self.broker.lock:
            q = self._queue(queue)
            if q.kind == "stream":
                raise TransportError(f"queue {queue!r} is a stream; consume it from an offset")
            _drop_expired(q)
            if not q.ready:
                return None
            message = q.ready.popleft()
            tag = self.broker.next_tag()
            # a basic.get delivery belongs to no consumer; a throwaway one keeps the books
            owner = _Consumer(f"get-{tag}", queue, self, lambda d: None, 0)
            q.unacked[tag] = (message, owner)
            owner.unacked += 1
            self._get_tags.setdefault(queue, set()).add(tag)
            return Delivery(
                queue,
                message.exchange,
                message.routing_key,
                message.envelope,
                message.body,
                message.redelivered,
                tag,
                problem=envelope_problem(message.envelope),
                reply_to=message.reply_to,
            )

    def ack(self, delivery: Delivery) -> None:
        with self.broker.changed:
            self._settle(delivery)
            self.broker.changed.notify_all()

    def nack(self, delivery: Delivery, *, requeue: bool = True) -> None:
        with self.broker.changed:
            message = self._settle(delivery)
            queue = self.broker.queues[delivery.queue]
            if requeue:
                self.broker.requeue(queue, [message])
            elif queue.dead_letter_queue and queue.dead_letter_queue in self.broker.queues:
                headers = {
                    **message.envelope.headers,
                    "x-first-death-reason": "rejected",
                    "x-first-death-queue": queue.name,
                }
                self.broker.enqueue(
                    self.broker.queues[queue.dead_letter_queue],
                    replace(message, envelope=replace(message.envelope, headers=headers)),
                )
            self.broker.changed.notify_all()

    def _settle(self, delivery: Delivery) -> _Message:
        message = self.broker.settle(delivery)
        self._get_tags.get(delivery.queue, set()).discard(delivery.tag)
        return message

    def poll(self, timeout: float = 0.0) -> int:
        self._check_open()
        deadline = time.monotonic() + timeout
        with self.broker.changed:
            while True:
                self.broker.dispatch()
                if self._inbox:
                    batch = list(self._inbox)
                    self._inbox.clear()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._woken:
                    self._woken = False
                    return 0
                self.broker.changed.wait(remaining)

        # Callbacks run outside the lock: they publish, ack and may block.
        def deliver(delivery: Delivery) -> bool:
            consumer = self._consumers.get(delivery.consumer_tag)
            if consumer is None or self._closed:  # cancelled meanwhile: it was requeued then
                return False
            consumer.on_delivery(delivery)
            return True

        return hand_out(batch, self._inbox, deliver)

    def hold_lease(self, name: str) -> bool:
        self._check_open()
        with self.broker.lock:
            holder = self.broker.leases.setdefault(name, self)
            return holder is self

    def wake(self) -> None:
        with self.broker.changed:
            self._woken = True
            self.broker.changed.notify_all()

    def close(self) -> None:
        if self._closed:
            return
        for tag in list(self._consumers):
            self.cancel(tag)
        with self.broker.changed:
            for name in [n for n, holder in self.broker.leases.items() if holder is self]:
                del self.broker.leases[name]  # as RabbitMQ deletes a closed connection's exclusive queues
            for queue_name, tags in self._get_tags.items():
                queue = self.broker.queues.get(queue_name)
                if queue is None:
                    continue
                messages = [queue.unacked.pop(t)[0] for t in sorted(tags) if t in queue.unacked]
                self.broker.requeue(queue, messages)
            self.broker.changed.notify_all()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("connection is closed")


_AGE_UNITS = {"Y": 365 * 86400, "M": 30 * 86400, "D": 86400, "h": 3600, "m": 60, "s": 1}


def _age_seconds(max_age: str | None) -> float | None:
    """RabbitMQ's x-max-age ("7D", "12h", ...) in seconds."""
    if max_age is None:
        return None
    number, unit = max_age[:-1], max_age[-1:]
    if not number.isdigit() or unit not in _AGE_UNITS:
        raise TransportError(f"bad max age {max_age!r}: use a number and one of {''.join(_AGE_UNITS)}, e.g. 7D")
    return int(number) * _AGE_UNITS[unit]


def _stream_start(queue: _Queue, offset: StreamOffset) -> int:
    end = queue.log_start + len(queue.log)
    if offset == "first":
        return queue.log_start
    if offset == "last":
        return max(queue.log_start, end - 1)
    if offset == "next":
        return end
    if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0:
        return offset
    raise TransportError(f"bad stream offset {offset!r}")
