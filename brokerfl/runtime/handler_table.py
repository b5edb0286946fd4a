"""Handler tables: message type -> the function that decides what happens next.

A handler is ``handler(message, ctx) -> messages to send`` (an iterable of
:class:`Outbound`, or None). It does no I/O of its own: the worker publishes what it
returns, with confirms, and only then acks the message it handled. Adding a message type
is adding one handler to a handler set::

    handlers = HandlerSet("server rounds", needs=(ServerState,))

    @handlers.on(ParameterUpdate)
    def fold_update(update, ctx: Context[ServerState]): ...

A handler set is a value its module exports; nothing registers on another module's set.
A run's table is composed from the sets its config names (:func:`compose`, called by
:mod:`brokerfl.assembly.roles`): one message type handled by two sets is an error
(:class:`DuplicateHandler`) unless the later set says it ``overrides`` it, and a set whose
every handler should run behind the same step is made with :meth:`HandlerSet.wrapped`.
So what a run handles depends on its config alone, never on what was imported before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from brokerfl.transports.topology import CLIENTS, REQUESTER, SERVER, client_dest
from brokerfl.wire.message import Message

Handler = Callable[[Any, "Context[Any]"], "Iterable[Outbound] | None"]
StateT = TypeVar("StateT")


class Rejected(ValueError):
    """Raised by a handler to dead-letter its message with this reason (an expected
    refusal, logged without a traceback; any other exception is logged with one). The
    timers it set before raising are kept."""


@dataclass(frozen=True)
class Outbound:
    """A message and who receives it: ``server``, ``clients``, ``client.<id>``, or
    ``requester`` (the sender of the request being handled, see :func:`to_requester`)."""

    dest: str
    message: Message


def to_server(message: Message) -> Outbound:
    return Outbound(SERVER, message)


def to_clients(message: Message) -> Outbound:
    return Outbound(CLIENTS, message)


def to_client(client_id: str, message: Message) -> Outbound:
    return Outbound(client_dest(client_id), message)


def to_requester(message: Message) -> Outbound:
    """The reply to the request being handled (direct reply-to: not routed, not journaled)."""
    return Outbound(REQUESTER, message)


@dataclass(kw_only=True)
class Started(Message):
    """Dispatched once, locally, when a worker starts (never sent over a transport)."""

    LOCAL = True

    redelivered_backlog: int = 0


@dataclass(kw_only=True)
class HandlerFailed(Message):
    """Dispatched locally when the handler of a worker's own message (a timer, work aside's
    outcome, :class:`Started`) raised. A delivered message that fails is dead-lettered with
    the reason; a local one has nowhere to go, and a timer whose handler fails would leave
    whatever it was due to do (close a round, end the drain) undone for good, so a table
    that cannot go on without it handles this (the server finishes the run as failed)."""

    LOCAL = True

    failed_type: str
    error: str


@dataclass
class Timer:
    key: str
    due: float  # time.monotonic() seconds
    message: Message


class Cancelled(Exception):
    """The outcome of work aside that was cancelled before it started (it never ran)."""


Work = Callable[[threading.Event], Any]
"""Work run aside (:meth:`Context.run_aside`): given the event that says it is no longer
wanted (cooperative: set by :meth:`Context.cancel_aside`), returns its result."""

Outcome = Callable[[Any, "BaseException | None"], Message]
"""Turns work's result (or the exception it raised) into the LOCAL message dispatched to
the table once it is done."""


@dataclass
class Aside:
    key: str
    work: Work
    outcome: Outcome
    own_thread: bool = False  # a driver (Context.drive): never inline, never on the shared lane


Post = Callable[["Message"], None]
"""Given to a driver (:meth:`Context.drive`): dispatches a LOCAL message to the worker's
table on the worker's thread; callable from any thread."""

Driver = Callable[[Post, threading.Event], Any]
"""Long-lived work beside a worker's loop (:meth:`Context.drive`), given ``post`` and the
event that says it is no longer wanted; returns its result."""


@dataclass
class Context(Generic[StateT]):
    """What a handler may know and ask for besides its message.

    ``state`` is the role's own object (strategy, model store, data, ...). The requests
    (hold, commit, stop, timers) are carried out by the worker after the handler returns.
    A handler that raises :class:`Rejected` still gets its timers (a refusal is a decision);
    one that raises anything else gets none of its requests.
    """

    role: str
    run: str
    state: StateT
    log: Any
    redelivered: bool = False
    holding: bool = False
    hold_key: str = ""
    committing: bool = False
    commit_keys: list[str | None] = field(default_factory=list)  # None: every held message
    stopping: bool = False
    timer_requests: list[Timer | str] = field(default_factory=list)  # in order: a Timer sets, a key cancels
    aside_requests: list[Aside | str] = field(default_factory=list)  # in order: an Aside starts, a key cancels
    also_send: list[Outbound] = field(default_factory=list)
    clock: Callable[[], float] = field(default=None)  # type: ignore[assignment]
    # time.time() as the worker's transport keeps it: what a message's deadline is compared with
    wall: Callable[[], float] = time.time
    when_sent: list[Callable[[], None]] = field(default_factory=list)
    when_not_sent: list[Callable[[BaseException], None]] = field(default_factory=list)
    post: Post = field(default=None)  # type: ignore[assignment]  # the worker's (Worker.post): for drivers

    def hold(self, key: str = "") -> None:
        """Keep this message unacked until a later handler calls :meth:`commit` (e.g. an
        update stays unacked until the model version it went into is stored). ``key``
        names it for a commit of only some held messages."""
        self.holding = True
        self.hold_key = key

    def commit(self, key: str | None = None) -> None:
        """Ack every held message (or only those held under ``key``), once this handler's
        outgoing messages are confirmed."""
        self.committing = True
        self.commit_keys.append(key)

    def send(self, *outbound: Outbound) -> None:
        """Publish these too (before the handler's returned messages), for helpers deep in a
        handler that have something to say; same guarantees as returned messages."""
        self.also_send.extend(outbound)

    def once_sent(self, effect: Callable[[], None]) -> None:
        """Apply ``effect`` (a change to state) only once this handler's messages are
        published and confirmed. If publishing fails, the message is requeued and handled
        again, so state that says "done" (e.g. a task answered) must not run ahead of what
        was actually sent."""
        self.when_sent.append(effect)

    def unless_sent(self, effect: Callable[[BaseException], None]) -> None:
        """Apply ``effect(error)`` if this handler's messages could not be published (or
        encoded). A delivered message goes back to its queue and comes again; a local one
        posted by a driver has no queue, so the driver waiting for its sending must hear."""
        self.when_not_sent.append(effect)

    def stop(self) -> None:
        """Stop the worker after this message."""
        self.stopping = True

    def set_timer(self, key: str, delay_s: float, message: Message) -> None:
        """Dispatch ``message`` to this worker's own table after ``delay_s`` (replacing any
        timer of the same key). Timers are local: a restarted process sets them again. Their
        message types should say ``LOCAL = True``, so that none can arrive from outside."""
        self.timer_requests.append(Timer(key, self.clock() + delay_s, message))

    def cancel_timer(self, key: str) -> None:
        self.timer_requests.append(key)

    def run_aside(self, key: str, work: Work, outcome: Outcome) -> None:
        """Run ``work`` beside the worker's I/O loop (e.g. an app's local training, minutes
        long: the loop goes on sending heartbeats, taking messages and acking), then
        dispatch ``outcome(result, error)``, a LOCAL message, to this table on the worker's
        thread. Started once this handler's messages are confirmed. Work of one process
        runs one piece at a time, in order (an app's code need not be thread-safe); a
        worker on the in-process transport runs it at once, inline (deterministic)."""
        self.aside_requests.append(Aside(key, work, outcome))

    def drive(self, key: str, driver: Driver, outcome: Outcome) -> None:
        """Run ``driver(post, cancelled)`` on a thread of its own for as long as it runs,
        then dispatch ``outcome(result, error)`` like work aside's. A driver is imperative
        code that talks with the federation as it goes (a Flower ServerApp's main, which
        loops over exchanges with its nodes): it asks the table for what it needs sent by
        ``post``-ing LOCAL messages, which handlers turn into messages the worker
        publishes, and waits for what handlers hand it. Never run inline (it waits for what
        the loop delivers); :meth:`cancel_aside` and the worker's stop set ``cancelled``."""
        self.aside_requests.append(Aside(key, lambda cancelled: driver(self.post, cancelled), outcome, True))

    def cancel_aside(self, key: str) -> None:
        """Say that the work under ``key`` is no longer wanted: its event is set (work that
        has not started does not run: its outcome is a :class:`Cancelled`). Its outcome
        is still dispatched: the handler decides what a cancelled result is worth."""
        self.aside_requests.append(key)


class _Registering:
    """``on``, the decorator form of a ``register(message_type, handler)``."""

    def on(self, *message_types: type[Message]) -> Callable[[Handler], Handler]:
        """Decorator: register the function as the handler of these message types."""

        def register(handler: Handler) -> Handler:
            for message_type in message_types:
                self.register(message_type, handler)
            return handler

        return register

    def register(self, message_type: type[Message], handler: Handler) -> None:
        raise NotImplementedError


def _message_type(message_type: type[Message]) -> type[Message]:
    if not (isinstance(message_type, type) and issubclass(message_type, Message)):
        raise TypeError(f"{message_type!r} is not a Message type")
    return message_type


class HandlerTable(_Registering):
    """Message type name -> handler, for one role of one run (:func:`compose` builds it)."""

    def __init__(self, role: str) -> None:
        self.role = role
        self._handlers: dict[str, Handler] = {}
        self.sets: tuple[HandlerSet, ...] = ()  # what it was composed of

    def register(self, message_type: type[Message], handler: Handler) -> None:
        self._handlers[_message_type(message_type).TYPE] = handler

    def handler_for(self, type_name: str) -> Handler | None:
        return self._handlers.get(type_name)

    def types(self) -> list[str]:
        return sorted(self._handlers)

    def copy(self, role: str | None = None) -> HandlerTable:
        """A new table with the same handlers, to extend without touching this one."""
        table = HandlerTable(role or self.role)
        table._handlers = dict(self._handlers)
        return table


class DuplicateHandler(ValueError):
    """Two handler sets of one table handle the same message type, and the later one does
    not say that it overrides the earlier one."""


class HandlerSet:
    """Handlers that belong together (a workflow, the operator's commands, an example), as
    a value: its module builds it and exports it, and :func:`compose` puts it in the
    tables of the runs whose config names it.

    ``handlers``: message type -> handler, types no earlier set of the table handles.
    ``overrides``: message type -> handler that replaces an earlier set's (an error if no
    earlier set handles the type: an override states what it replaces). ``needs``: the
    state types its handlers are written for (checked by :meth:`check_state` when a run is
    built). ``prepare(state)``: what including the set changes on the run's state (e.g. a
    hook run after the last round), called once by :func:`brokerfl.assembly.roles` per run.
    """

    def __init__(
        self,
        name: str,
        handlers: dict[type[Message], Handler] | None = None,
        *,
        overrides: dict[type[Message], Handler] | None = None,
        needs: tuple[type, ...] = (),
        prepare: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.handlers: dict[type[Message], Handler] = {}
        self.overrides: dict[type[Message], Handler] = {}
        self.needs = needs
        self.prepare = prepare
        for message_type, handler in (handlers or {}).items():
            self._add(self.handlers, message_type, handler)
        for message_type, handler in (overrides or {}).items():
            self._add(self.overrides, message_type, handler)

    def __repr__(self) -> str:
        return f"HandlerSet({self.name!r})"

    def on(self, *message_types: type[Message]) -> Callable[[Handler], Handler]:
        """Decorator, while the module builds its set: the function handles these types."""

        def add(handler: Handler) -> Handler:
            for message_type in message_types:
                self._add(self.handlers, message_type, handler)
            return handler

        return add

    def overriding(self, *message_types: type[Message]) -> Callable[[Handler], Handler]:
        """Decorator: the function replaces an earlier set's handler of these types."""

        def add(handler: Handler) -> Handler:
            for message_type in message_types:
                self._add(self.overrides, message_type, handler)
            return handler

        return add

    def _add(self, into: dict[type[Message], Handler], message_type: type[Message], handler: Handler) -> None:
        if not (isinstance(message_type, type) and issubclass(message_type, Message)):
            raise TypeError(f"{message_type!r} is not a Message type")
        if message_type in self.handlers or message_type in self.overrides:
            raise DuplicateHandler(f"handler set {self.name!r} handles {message_type.TYPE!r} twice")
        into[message_type] = handler

    def types(self) -> list[str]:
        return sorted(t.TYPE for t in [*self.handlers, *self.overrides])

    def wrapped(self, wrapper: Callable[[Handler], Handler], *, name: str | None = None) -> HandlerSet:
        """A new set with every handler of this one behind ``wrapper`` (e.g. the swarm's
        "take the aggregator role first"); this set is unchanged."""
        return HandlerSet(
            name or f"{self.name} ({getattr(wrapper, '__name__', 'wrapped')})",
            {t: _wrap(wrapper, h) for t, h in self.handlers.items()},
            overrides={t: _wrap(wrapper, h) for t, h in self.overrides.items()},
            needs=self.needs,
            prepare=self.prepare,
        )

    def check_state(self, state: Any) -> None:
        """TypeError unless ``state`` is every type this set needs."""
        for need in self.needs:
            if not isinstance(state, need):
                raise TypeError(
                    f"handler set {self.name!r} needs a state of type {need.__name__}, this run's is "
                    f"{type(state).__name__}"
                )


def _wrap(wrapper: Callable[[Handler], Handler], handler: Handler) -> Handler:
    wrapped = wrapper(handler)
    if hasattr(handler, "__qualname__"):
        try:
            wrapped.__qualname__ = handler.__qualname__  # what the worker's logs name
        except (AttributeError, TypeError):
            pass
    return wrapped


def compose(role: str, *sets: HandlerSet) -> HandlerTable:
    """The table of one run's role from these sets, in order (see :class:`HandlerSet` for
    the rules: a type handled twice is a :class:`DuplicateHandler` unless overridden)."""
    table = HandlerTable(role)
    owner: dict[str, str] = {}  # message type name -> the set whose handler the table holds
    for handler_set in sets:
        for message_type, handler in handler_set.handlers.items():
            if message_type.TYPE in owner:
                raise DuplicateHandler(
                    f"message type {message_type.TYPE!r} is handled by handler set {owner[message_type.TYPE]!r} and by "
                    f"{handler_set.name!r}: "
                    f"list it under {handler_set.name!r}'s overrides if it is meant to replace the other"
                )
            table.register(message_type, handler)
            owner[message_type.TYPE] = handler_set.name
        for message_type, handler in handler_set.overrides.items():
            if message_type.TYPE not in owner:
                raise DuplicateHandler(
                    f"handler set {handler_set.name!r} overrides {message_type.TYPE!r}, which no set before it in the "
                    f"{role} table handles"
                )
            table.register(message_type, handler)
            owner[message_type.TYPE] = handler_set.name
    table.sets = tuple(sets)
    return table


class LegacyTable(_Registering):
    """Deprecated: the module-level ``table`` that handler modules used to register on at
    import (``@client.table.on(Gradients)``). Registering here changes no run: it records
    which module registered what, and :mod:`brokerfl.assembly.roles` makes a handler set of a
    module's registrations for the runs whose ``extra_handlers`` name that module (with a
    DeprecationWarning). A module should export a :class:`HandlerSet` instead."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.registered: list[tuple[type[Message], Handler]] = []

    def register(self, message_type: type[Message], handler: Handler) -> None:
        self.registered.append((_message_type(message_type), handler))

    def set_of(self, module: str, handled: Iterable[str]) -> HandlerSet | None:
        """The handlers ``module`` registered here, as a set (None: it registered none).
        One it registered for a type already ``handled`` (by the run's other sets) replaces
        theirs, as a registration on the old process-wide table did."""
        mine = {t: h for t, h in self.registered if getattr(h, "__module__", None) == module}
        if not mine:
            return None
        handled = set(handled)
        return HandlerSet(
            f"{module} (old style, {self.role})",
            {t: h for t, h in mine.items() if t.TYPE not in handled},
            overrides={t: h for t, h in mine.items() if t.TYPE in handled},
        )
