"""A worker: one consumer that feeds a queue's messages through a handler table.

The worker does all the I/O so handlers need none: decode, dispatch, publish what the
handler returned (confirmed), then ack. A message is acked only after everything it caused
is durable; a handler can also hold its message until a later commit. A message that
cannot be decoded, has no handler, or whose handler raises is dead-lettered with the
reason, and the worker goes on.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from queue import Empty, SimpleQueue
from typing import Any

import structlog

from brokerfl.runtime.handler_table import (
    Aside,
    Cancelled,
    Context,
    Handler,
    HandlerFailed,
    HandlerTable,
    Outbound,
    Rejected,
    Started,
    Timer,
)
from brokerfl.runtime.threads import process_lane
from brokerfl.runtime.timing import timings
from brokerfl.transports.base import (
    REPLY_TO,
    Body,
    Delivery,
    LeaseLost,
    Transport,
    TransportError,
    UnroutableError,
    body_size,
    bounded,
    joined,
)
from brokerfl.transports.topology import DEAD, REQUESTER, RunTopology, routing_key
from brokerfl.wire.codec import DEFAULT_LIMITS, DecodeError, EncodeError, Limits
from brokerfl.wire.message import Message, from_wire, to_wire_parts

_TYPE_WORD = re.compile(r"^[A-Za-z0-9_]{1,64}$")  # what may stand in a routing key
# Kinds of dead letters, counted by the worker (brokerfl.ops.monitoring exports the counts):
UNDECODABLE = "undecodable"  # an envelope or body that cannot be read
REFUSED = "refused"  # its publisher may not send it (identity), or it is a local type sent from outside
UNHANDLED = "unhandled"  # no handler for its type in this worker's table
REJECTED = "rejected"  # refused on its merits (a handler's Rejected, a reference that cannot resolve)
FAILED = "failed"  # its handler raised, or what it sent went nowhere
DEAD_LETTER_KINDS = (UNDECODABLE, REFUSED, UNHANDLED, REJECTED, FAILED)
# While work runs aside, the longest a poll waits: the transport's wake() normally ends the
# wait when the work is done; this bounds it if that wake was lost (a connection replaced).
ASIDE_POLL_S = 0.5
APP_LANE = "app"  # the process's lane for work aside: app calls, one at a time


class _AsideJob:
    """Work of :meth:`Context.run_aside` on its way through the process's lane."""

    def __init__(self, aside: Aside) -> None:
        self.key, self.work, self.outcome = aside.key, aside.work, aside.outcome
        self.cancelled = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        if self.cancelled.is_set():
            self.error = Cancelled(f"{self.key}: cancelled before it started")
            return
        try:
            self.result = self.work(self.cancelled)
        except Exception as exc:  # the handler of its outcome says what it means
            self.error = exc


class Worker:
    def __init__(
        self,
        transport: Transport,
        topology: RunTopology,
        queue: str | None,
        table: HandlerTable,
        state: Any,
        *,
        name: str,
        prefetch: int = 0,
        limits: Limits = DEFAULT_LIMITS,
        log: Any = None,
        clock: Callable[[], float] | None = None,
        admit: Callable[[Message, str], str | None] | None = None,
        resolve: Callable[[Message], None] | None = None,
        exchange: str | None = None,
    ) -> None:
        """``admit(message, user_id)``: None if the message's publisher may send it, else the
        reason it is dead-lettered before any handler sees it (:mod:`brokerfl.runtime.identity`).
        ``resolve(message)`` completes an admitted message before its handler runs (a task's
        model fetched by reference, :mod:`brokerfl.storage.model_refs`): a ValueError dead-letters
        the message with its reason, a TransportError gives it back to its queue.
        ``exchange``: where what its handlers send is published (default: the run's; a
        process's log goes to the run's logs exchange, :mod:`brokerfl.runtime.remote_log`)."""
        self.transport = transport
        self.topology = topology
        self.exchange = exchange or topology.exchange
        self.queue = queue
        self.table = table
        self.state = state
        self.name = name
        self.prefetch = prefetch
        self.limits = limits
        monotonic, self.wall = transport.clocks()  # the in-process transport's leave out work run inline
        self.clock = clock or monotonic
        self.admit = admit
        self.resolve = resolve
        self.log = log or structlog.get_logger("brokerfl").bind(run=topology.run, role=name)
        self.held: list[Delivery] = []
        self.held_keys: list[str] = []  # beside ``held``: the key each was held under
        # Work aside (Context.run_aside): inline, at once, on the in-process transport
        # (deterministic, and simulate's speed); else on the process's lane.
        self.work_inline: bool = bool(getattr(transport, "work_inline", False))
        self._aside: list[_AsideJob] = []  # on the lane, outcome not dispatched yet
        self._aside_done: SimpleQueue[_AsideJob] = SimpleQueue()  # put by the lane's thread
        self._posted: SimpleQueue[Message] = SimpleQueue()  # LOCAL messages put by drivers (Context.drive)
        self.timers: dict[str, Timer] = {}
        self.stopped = False
        self.handled = 0
        self.dead_lettered = 0
        self.dead_letter_kinds: dict[str, int] = {}  # by kind of reason (for monitoring)
        self.bytes_in = self.bytes_out = 0  # message bodies received and published
        self._consumer_tag: str | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start consuming, after dispatching :class:`Started` to the table (if handled)."""
        self.dispatch_local(Started(run=self.topology.run, sender=self.name))
        if not self.stopped and self.queue is not None:  # None: a worker of timers only (e.g. a process's heartbeat)
            self._consumer_tag = self.transport.consume(self.queue, self._on_delivery, prefetch=self.prefetch)

    def step(self, timeout: float = 0.0) -> int:
        """Handle what arrives within ``timeout`` (shortened to the next timer), then fire
        due timers; returns how many messages and timers were handled."""
        if self.stopped:
            return 0
        due = self.next_timer_in()
        if due is not None:
            timeout = min(timeout, max(due, 0.0))
        handled = self.transport.poll(timeout) if self._consumer_tag else 0
        return handled + self.fire_due_timers()

    def run(self, *, poll_s: float = 0.5) -> None:
        while not self.stopped:
            self.step(poll_s)

    @property
    def resubscribed(self) -> bool:
        """Its consumer was subscribed anew since :meth:`start` (see
        :meth:`brokerfl.transports.base.Transport.resubscriptions`): what it held unacked went
        back to the queue."""
        return self._consumer_tag is not None and self.transport.resubscriptions(self._consumer_tag) > 0

    def stop(self) -> None:
        """Stop consuming; held messages stay unacked and go back to the queue."""
        self.stopped = True
        if self._consumer_tag is not None:
            self.transport.cancel(self._consumer_tag)
            self._consumer_tag = None
        self.held.clear()
        self.held_keys.clear()
        for job in self._aside:  # nobody takes their outcomes now; work not started never runs
            job.cancelled.set()
        self._aside.clear()

    # ------------------------------------------------------------ timers

    def next_timer_in(self) -> float | None:
        """Seconds to the next timer (None: none), 0 when work aside is done and its outcome
        waits, at most :data:`ASIDE_POLL_S` while work runs aside."""
        if not self._posted.empty():
            return 0.0
        if self._aside:
            if not self._aside_done.empty():
                return 0.0
            due = min([t.due for t in self.timers.values()], default=self.clock() + ASIDE_POLL_S) - self.clock()
            return min(due, ASIDE_POLL_S)
        if not self.timers:
            return None
        return min(t.due for t in self.timers.values()) - self.clock()

    def fire_due_timers(self) -> int:
        """Dispatch what drivers posted and the outcomes of work aside that is done, then the
        timers that are due."""
        fired = self._dispatch_posted() + self._dispatch_aside_outcomes()
        now = self.clock()
        for key, timer in sorted(self.timers.items(), key=lambda kv: kv[1].due):
            if self.stopped:
                break
            if timer.due <= now and self.timers.get(key) is timer:
                del self.timers[key]
                self.dispatch_local(timer.message)
                fired += 1
        return fired

    # ------------------------------------------------------------ dispatch

    def dispatch_local(self, message: Message) -> None:
        """Run a handler for a message that did not come through the transport."""
        handler = self.table.handler_for(message.TYPE)
        if handler is not None:
            self._handle(handler, message, None)

    def post(self, message: Message) -> None:
        """Dispatch a LOCAL ``message`` to the table on the worker's thread, soon; callable
        from any thread (a driver's, see :meth:`Context.drive`)."""
        if not message.LOCAL:
            raise TypeError(f"only LOCAL messages are posted to a worker, not {message.TYPE!r}")
        self._posted.put(message)
        self.transport.wake()

    def _dispatch_posted(self) -> int:
        dispatched = 0
        while not self.stopped:
            try:
                message = self._posted.get_nowait()
            except Empty:
                break
            self.dispatch_local(message)
            dispatched += 1
        return dispatched

    def _on_delivery(self, delivery: Delivery) -> None:
        log = self.log.bind(
            message_id=bounded(delivery.envelope.message_id, 64), type=bounded(delivery.envelope.type, 64)
        )
        self.bytes_in += len(delivery.body)
        if delivery.problem:  # the transport could not read its envelope
            self._dead_letter(delivery, f"unreadable message: {delivery.problem}", log, kind=UNDECODABLE)
            return
        try:
            with timings.phase("decode"):
                message = from_wire(delivery.envelope, delivery.body, self.limits)
        except DecodeError as exc:
            self._dead_letter(
                delivery,
                f"undecodable {bounded(delivery.envelope.type, 64)!r} message: {bounded(str(exc), 500)}",
                log,
                kind=UNDECODABLE,
            )
            return
        if message.LOCAL:  # e.g. a forged round deadline or start: only this process makes those
            self._dead_letter(
                delivery,
                f"message type {message.TYPE!r} is local to a worker and cannot come over the transport",
                log,
                kind=REFUSED,
            )
            return
        if self.admit is not None and (refused := self.admit(message, delivery.envelope.user_id)) is not None:
            self._dead_letter(delivery, f"refused: {refused}", log, kind=REFUSED)
            return
        handler = self.table.handler_for(message.TYPE)
        if handler is None:
            self._dead_letter(
                delivery,
                f"no handler for message type {message.TYPE!r} in the {self.table.role} table",
                log,
                kind=UNHANDLED,
            )
            return
        if self.resolve is not None:
            try:
                with timings.phase("resolve"):
                    self.resolve(message)
            except TransportError as exc:  # the broker's fault, not the message's: it comes back
                log.error("completing the message failed: it is requeued", error=bounded(str(exc), 500))
                self.transport.nack(delivery, requeue=True)
                return
            except ValueError as exc:
                self._dead_letter(
                    delivery,
                    f"rejected {bounded(delivery.envelope.type, 64)!r} message: {bounded(str(exc), 500)}",
                    log,
                    kind=REJECTED,
                )
                return
        self._handle(handler, message, delivery)

    def _handle(self, handler: Handler, message: Message, delivery: Delivery | None) -> None:
        log = self.log.bind(message_id=message.message_id, type=message.TYPE, round=message.round)
        ctx = Context(
            role=self.name,
            run=self.topology.run,
            state=self.state,
            log=log,
            redelivered=bool(delivery and delivery.redelivered),
            clock=self.clock,
            wall=self.wall,
            post=self.post,
        )
        name = getattr(handler, "__qualname__", repr(handler))
        try:
            with timings.phase(f"handle.{message.TYPE}"):
                outbound = list(handler(message, ctx) or ())
            # Encoding is the handler's output failing, so its fault too; publishing is not.
            wire = self.encode([*ctx.also_send, *outbound])
            outbound.clear()  # `wire` holds what is sent (the bodies' buffers): drop the rest of the messages
            ctx.also_send.clear()
        except Exception as exc:
            _not_sent(ctx, exc)
            if isinstance(exc, Rejected):
                reason, kind = f"rejected by {name}: {exc}", REJECTED
                # A refusal is the handler's own verdict, not a crash: what it decided before
                # raising stands, timers included (e.g. the round closes now that the refused
                # update's sender counts as having answered).
                self._apply_timers(ctx)
            else:
                log.exception("handler failed", handler=name)
                reason, kind = f"handler {name} raised {type(exc).__name__}: {exc}", FAILED
            if delivery is not None:
                self._dead_letter(delivery, reason, log, kind=kind)
            elif not isinstance(message, HandlerFailed):  # not once more for its own failure
                self.dispatch_local(
                    HandlerFailed(
                        failed_type=message.TYPE,
                        error=bounded(reason, 1000),
                        round=message.round,
                        model_version=message.model_version,
                    )
                )
            return
        try:
            self.publish_wire(wire, request=delivery)
        except LeaseLost:
            raise  # the role this worker acted in is another process's now: stop acting
        except UnroutableError as exc:  # what it sent goes nowhere: as good as a handler error
            _not_sent(ctx, exc)
            if delivery is not None:
                self._dead_letter(delivery, f"handler {name}: {exc}", log, kind=FAILED)
            else:  # a local message has no queue to go back to: its handler's messages are lost, say so
                log.error("what the handler sent goes nowhere: not sent", handler=name, error=bounded(str(exc), 500))
            return
        except TransportError as exc:
            # Decision: a failure to publish (a connection lost beyond the transport's own
            # reconnects, a channel the broker closed) is not the message's fault, so it is
            # never dead-lettered. The handler's effects on state stand (they cannot be undone)
            # and its timers are set, but the message is given back (requeued) instead of
            # acked or held, and held messages are not committed: the broker redelivers it and
            # the handler recognises a copy it already took in (folded ids, stored versions).
            log.error("publishing failed: the message is requeued", handler=name, error=bounded(str(exc), 500))
            _not_sent(ctx, exc)
            self._apply_timers(ctx)
            if delivery is not None:
                self.transport.nack(delivery, requeue=True)
            if ctx.stopping:
                self.stop()
            return
        self.handled += 1
        for effect in ctx.when_sent:
            effect()
        self._apply_timers(ctx)
        if delivery is not None:
            if ctx.holding:
                # Only what acks it: the body (and the arrays decoded over it) would
                # otherwise stay alive until the commit, one whole update per held message.
                self.held.append(replace(delivery, body=b""))
                self.held_keys.append(ctx.hold_key)
            else:
                with timings.phase("ack"):
                    self.transport.ack(delivery)
        if ctx.committing:
            self._commit(ctx.commit_keys)
        if ctx.stopping:
            self.stop()
        elif ctx.aside_requests:
            self._apply_aside(ctx.aside_requests)

    def _commit(self, keys: list[str | None]) -> None:
        """Ack the held messages (those held under ``keys``, or all if one is None)."""
        every = None in keys
        kept: list[tuple[Delivery, str]] = []
        with timings.phase("ack"):
            for held, key in zip(self.held, self.held_keys):
                if every or key in keys:
                    self.transport.ack(held)
                else:
                    kept.append((held, key))
        self.held = [held for held, _ in kept]
        self.held_keys = [key for _, key in kept]

    # ------------------------------------------------------------ work aside

    def _apply_aside(self, requests: list[Aside | str]) -> None:
        for request in requests:
            if isinstance(request, str):
                for job in self._aside:
                    if job.key == request:
                        job.cancelled.set()
                continue
            job = _AsideJob(request)
            if request.own_thread:  # a driver: waits for the loop, so never inline nor on the shared lane
                self._aside.append(job)
                threading.Thread(target=self._run_aside, args=(job,), name=f"driver-{request.key}", daemon=True).start()
            elif self.work_inline:
                with self.transport.inline_work():
                    job.run()
                self._dispatch_outcome(job)
            else:
                self._aside.append(job)
                process_lane(APP_LANE).submit(functools.partial(self._run_aside, job))

    def _run_aside(self, job: _AsideJob) -> None:
        """On the lane's thread: the work, then wake the I/O loop to dispatch its outcome."""
        job.run()
        self._aside_done.put(job)
        self.transport.wake()

    def _dispatch_aside_outcomes(self) -> int:
        dispatched = 0
        while not self.stopped:
            try:
                job = self._aside_done.get_nowait()
            except Empty:
                break
            if job in self._aside:  # else the worker stopped meanwhile
                self._aside.remove(job)
                self._dispatch_outcome(job)
                dispatched += 1
        return dispatched

    def _dispatch_outcome(self, job: _AsideJob) -> None:
        try:
            message = job.outcome(job.result, job.error)
        except Exception:
            self.log.exception("the outcome of work aside could not be made", key=job.key)
            return
        finally:
            job.result = job.error = None  # e.g. a trained model: the message has it now, and only until handled
        self.dispatch_local(message)

    def _apply_timers(self, ctx: Context) -> None:
        for request in ctx.timer_requests:
            if isinstance(request, Timer):
                self.timers[request.key] = request
            else:
                self.timers.pop(request, None)

    def publish(self, outbound: Iterable[Outbound], *, request: Delivery | None = None) -> None:
        """Publish messages (each confirmed before the next), stamped with this sender and run;
        a reply to ``requester`` goes to ``request``'s reply address (dropped if it has none:
        nobody waits for it)."""
        self.publish_wire(self.encode(outbound), request=request)

    def encode(self, outbound: Iterable[Outbound]) -> list[tuple[str, str, Any, Body]]:
        """(destination, routing key, envelope, body) of each message, stamped with this
        sender and run. Every message is encoded (and checked) before any is published; a
        body is the buffers that make it up, joined only by the transport that needs it
        (the AMQP one copies a large body once, straight into its chunks)."""
        wire: list[tuple[str, str, Any, Body]] = []
        for item in outbound:
            message = item.message
            if not message.sender:
                message.sender = self.name
            if not message.run:
                message.run = self.topology.run
            try:
                with timings.phase("encode"):
                    envelope, body = to_wire_parts(message, self.limits)
            except EncodeError as exc:
                raise EncodeError(f"cannot send {message.TYPE} to {item.dest}: {exc}") from None
            wire.append((item.dest, routing_key(item.dest, message.TYPE), envelope, body))
        return wire

    def publish_wire(self, wire: list[tuple[str, str, Any, Body]], *, request: Delivery | None = None) -> None:
        for dest, key, envelope, body in wire:
            self.bytes_out += body_size(body)
            if dest == REQUESTER:
                # Only to a private reply address: a reply_to naming any other queue would make
                # this worker publish into it (e.g. a client's queue) on a stranger's say-so.
                if request is not None and isinstance(request.reply_to, str) and request.reply_to.startswith(REPLY_TO):
                    self.transport.reply(request, envelope, joined(body))
                else:
                    self.log.info("reply dropped: the message is not a request")
                continue
            with timings.phase("publish"):
                self.transport.publish(self.exchange, key, envelope, body)

    def _dead_letter(self, delivery: Delivery, reason: str, log: Any, *, kind: str) -> None:
        """Through the run's exchange: the dead queue and the journal both take the copy;
        ``kind`` (one of :data:`DEAD_LETTER_KINDS`) is counted in ``dead_letter_kinds``.
        If the broker refuses the copy, the message is rejected instead (its queue's own
        dead-lettering, without our reason header): either way the consumer goes on."""
        reason = bounded(reason, 1000)
        log.warning("dead-lettered", reason=reason, kind=kind)
        self.dead_lettered += 1
        message_type = delivery.envelope.type
        type_word = message_type if isinstance(message_type, str) and _TYPE_WORD.match(message_type) else "invalid"
        self.dead_letter_kinds[kind] = self.dead_letter_kinds.get(kind, 0) + 1
        try:
            self.transport.dead_letter(
                delivery, reason, exchange=self.topology.exchange, routing_key=routing_key(DEAD, type_word)
            )
        except TransportError as exc:
            log.error("dead letter refused: rejecting the message instead", error=bounded(str(exc), 500))
            self.transport.nack(delivery, requeue=False)


def _not_sent(ctx: Context, error: BaseException) -> None:
    for effect in ctx.when_not_sent:
        effect(error)


def run_workers(
    transport: Transport, workers: list[Worker], *, poll_s: float = 0.5, background: Sequence[Worker] = ()
) -> None:
    """Run several workers that share one connection until every one has stopped;
    ``background`` workers (e.g. the process's heartbeat) run alongside but do not keep
    the loop going."""
    while not all(w.stopped for w in workers):
        running = [w for w in [*workers, *background] if not w.stopped]
        timers = [t for w in running if (t := w.next_timer_in()) is not None]
        transport.poll(max(0.0, min([poll_s, *timers])))
        for worker in running:
            if not worker.stopped:
                worker.fire_due_timers()
