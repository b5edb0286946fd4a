"""Operating a running federation: the operator's messages, the admin state they change,
where that state is kept, and how a CLI asks the server.

- ``StatusRequest`` -> ``StatusReply``: the run as the *server* believes it. Sent by direct
  reply-to straight to the server's queue (the default exchange, so the journal is not
  filled by ``status --watch``).
- ``AdminCommand`` subclasses (abort, pause, resume, remove a client, set min clients, set
  rounds, shut clients down) go through the run's exchange, so the journal records each
  one with its sender; the server answers with an ``AdminReply`` to the requester and to
  the journal (``audit.admin_reply``). Requests expire with their requester's wait: a
  command that no server took in time is dropped from the queue unapplied (never applied
  to a later server by surprise); one taken at the last moment is applied although its
  requester gave up (``status`` tells).
- The admin state (paused, removed clients, min clients, rounds) is the broker's, like the
  rest of a run: every change is published (confirmed, before the command is acked) as an
  ``AdminStateRecord`` to the run's durable ``admin`` queue; a server starting reads the
  newest record from there (``restore_admin_state``). The handlers live in
  ``handlers/workflows/admin.py``.
"""

from __future__ import annotations

import getpass
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from brokerfl.config import RunConfig
from brokerfl.transports.base import Transport, TransportError, UnroutableError
from brokerfl.transports.topology import SERVER, RunTopology, routing_key
from brokerfl.wire.message import Message, from_wire, to_wire

# ---------------------------------------------------------------- messages


@dataclass(kw_only=True)
class StatusRequest(Message):
    """Ask the server for its view of the run (answered with a StatusReply)."""


@dataclass(kw_only=True)
class StatusReply(Message):
    status: dict[str, Any]


@dataclass(kw_only=True)
class AdminCommand(Message):
    """Base of the operator's commands; ``sender`` says who sent it."""


@dataclass(kw_only=True)
class AbortRun(AdminCommand):
    """Finish now: the last stored version is the run's result; the open round's updates
    are dropped with a recorded reason; clients get Exit; the server exits 0."""

    reason: str = ""


@dataclass(kw_only=True)
class PauseRounds(AdminCommand):
    """No new round starts (the open one finishes) until ResumeRounds."""


@dataclass(kw_only=True)
class ResumeRounds(AdminCommand):
    pass


@dataclass(kw_only=True)
class RemoveClient(AdminCommand):
    """Never sample this client again (it gets Exit)."""

    client_id: str


@dataclass(kw_only=True)
class SetMinClients(AdminCommand):
    min_clients: int


@dataclass(kw_only=True)
class SetRounds(AdminCommand):
    rounds: int


@dataclass(kw_only=True)
class ShutdownClients(AdminCommand):
    """Send Exit to these clients (none named: to every client)."""

    client_ids: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class AdminReply(Message):
    """The server's answer to an admin command; the journal keeps it beside the command."""

    command: str
    command_id: str
    by: str  # the sender the command claims (e.g. admin:root@host:PID)
    ok: bool
    text: str
    user: str = ""  # the broker user that published the command, as RabbitMQ validated it


@dataclass(kw_only=True)
class AdminStateRecord(Message):
    """The admin state after a change (the newest ``seq`` wins)."""

    seq: int
    paused: bool
    removed: list[str]
    min_clients: int | None
    rounds: int | None


@dataclass(kw_only=True)
class RunRecord(Message):
    """One line of a run's history in the broker's run registry (:mod:`brokerfl.ops.runs`):
    the server's ``started``, ``training``, ``waiting``, ``paused``, ``progress`` (at most
    once per round: the stored version and its target metric), ``finished`` or ``aborted``
    (with ``reason``); ``deleted`` by ``brokerfl delete-run``. ``round`` and
    ``model_version`` are the run's as of the record."""

    event: str
    rounds: int | None = None
    reason: str = ""
    metric_name: str = ""
    metric_value: float | None = None
    dropped_updates: int | None = None  # the run's, across server restarts


RUN_EVENTS = ("started", "waiting", "training", "paused", "progress", "finished", "aborted", "deleted")


# ---------------------------------------------------------------- the state


@dataclass
class AdminState:
    """What the operator changed. ``min_clients`` / ``rounds`` are None until set (then they
    override the config's)."""

    seq: int = 0
    paused: bool = False
    removed: set[str] = field(default_factory=set)
    min_clients: int | None = None
    rounds: int | None = None
    held_start: str | None = None  # a round start that a pause held back: "next" or "retry" (not stored)

    def record(self) -> AdminStateRecord:
        self.seq += 1
        return AdminStateRecord(
            seq=self.seq,
            paused=self.paused,
            removed=sorted(self.removed),
            min_clients=self.min_clients,
            rounds=self.rounds,
        )

    @classmethod
    def from_record(cls, record: AdminStateRecord) -> AdminState:
        return cls(record.seq, record.paused, set(record.removed), record.min_clients, record.rounds)

    def applied_to(self, config: RunConfig) -> RunConfig:
        """``config`` with the operator's rounds and min clients, where set."""
        if self.rounds is not None:
            config = config.model_copy(update={"rounds": self.rounds})
        if self.min_clients is not None:
            config = config.model_copy(
                update={"strategy": config.strategy.model_copy(update={"min_clients": self.min_clients})}
            )
        return config


def restore_admin_state(transport: Transport, topology: RunTopology) -> AdminState:
    """The newest AdminStateRecord in the run's admin queue (older ones are removed; the
    newest stays), or a fresh state."""
    newest, newest_delivery, older = None, None, []
    while (delivery := transport.get(topology.admin_queue)) is not None:
        try:
            record = from_wire(delivery.envelope, delivery.body)
        except Exception:  # noqa: BLE001 - not ours; drop it rather than fail every start
            older.append(delivery)
            continue
        if not isinstance(record, AdminStateRecord):
            older.append(delivery)
        elif newest is None or record.seq > newest.seq:
            if newest_delivery is not None:
                older.append(newest_delivery)
            newest, newest_delivery = record, delivery
        else:
            older.append(delivery)
    for delivery in older:
        transport.ack(delivery)
    if newest_delivery is not None:
        transport.nack(newest_delivery, requeue=True)
    return AdminState.from_record(newest) if newest is not None else AdminState()


# ---------------------------------------------------------------- asking the server


def client_id_order(client_id: str) -> tuple[int, int | str]:
    """Sort key: numeric ids by number, then the others by name."""
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


def operator_name() -> str:
    """Who sends admin commands. With identity (``identity.enforce``) RabbitMQ's validated user_id says it."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = "unknown"
    return f"admin:{user}@{socket.gethostname()}:{os.getpid()}"


def ask(transport: Transport, topology: RunTopology, message: Message, *, timeout: float) -> Message | None:
    """Send a status request or an admin command to the run's server; its reply, or None.
    TransportError if the run has no server queue (no server of it ever started).

    A status request is not sent while no server consumes the server queue (None at once):
    it would only expire there, and the queue dead-letters what expires, so a ``status
    --watch`` polling a stopped server would fill the dead-letter queue. An admin command is
    sent anyway: a server starting within the wait takes it."""
    message.run = message.run or topology.run
    message.sender = message.sender or operator_name()
    envelope, body = to_wire(message)
    if isinstance(message, StatusRequest) and server_consumers(transport, topology) == 0:
        return None
    try:
        if isinstance(message, StatusRequest):
            reply = transport.request("", topology.server_queue, envelope, body, timeout=timeout)
        else:
            reply = transport.request(
                topology.exchange, routing_key(SERVER, message.TYPE), envelope, body, timeout=timeout
            )
    except UnroutableError:
        raise TransportError(
            f"run {topology.run!r} has no server queue on this broker: no server of it has started"
        ) from None
    return None if reply is None else from_wire(*reply)


def server_consumers(transport: Transport, topology: RunTopology) -> int:
    """Consumers of the run's server queue; TransportError if there is none (no server of
    the run has started on this broker)."""
    try:
        return transport.queue_info(topology.server_queue).consumers
    except TransportError as exc:
        if "no queue" in str(exc):
            raise TransportError(
                f"run {topology.run!r} has no server queue on this broker: no server of it has started"
            ) from None
        raise
