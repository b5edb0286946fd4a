"""Names and declarations of one run's exchange and queues (DESIGN.md section 2).

| name                           | kind           | takes                                    |
|--------------------------------|----------------|------------------------------------------|
| exchange ``brokerfl.<run>``    | topic          | every message of the run                 |
| ``brokerfl.<run>.server``      | quorum         | ``server.#``                             |
| ``brokerfl.<run>.client.<id>`` | classic        | ``client.<id>.#`` and ``clients.#``      |
| ``brokerfl.<run>.dead``        | classic        | ``dead.#``: dead letters, reason in a header |
| ``brokerfl.<run>.journal``     | stream         | ``#``: a copy of every message           |
| ``brokerfl.<run>.admin``       | classic        | ``admin.#``: the operator's admin state  |
| ``brokerfl.<run>.models``      | stream         | nothing routed: every stored model version (``brokerfl.storage.broker_store``) |
| ``brokerfl.<run>.server.lease``| exclusive      | nothing: held by the active server's connection (one server acts at a time) |
| exchange ``brokerfl.<run>.logs.in`` | topic     | every process's log records (``brokerfl.runtime.remote_log``) |
| ``brokerfl.<run>.logs``        | stream         | ``#`` of ``brokerfl.<run>.logs.in``: the run's logs, bounded by size and age |

The logs have an exchange of their own so that the journal (``#`` on the run's exchange)
does not fill with log lines, and so that a site's right to publish logs is granted apart
from its right to talk to the run (a topic permission per exchange).

With ``replicated`` (config ``replicated_queues: true``, for a RabbitMQ cluster) every queue
is a quorum queue: a classic queue lives on one node, and a client whose queue's node dies
would have no queue until that node returns. Streams replicate anyway.

Routing keys are ``<receiver>.<message type>``: ``server.parameter_update``,
``client.7.train_task``, ``clients.exit``; ``dead.<type>`` for dead letters and
``audit.<type>`` for records only the journal takes.

Who declares: :meth:`RunTopology.queues` and :meth:`RunTopology.client_queue_spec` are the
one description of every queue, its arguments and its bindings. Unprovisioned runs (one
``guest``, no identity) declare them from it (the server :meth:`~RunTopology.declare`, each
client :meth:`~RunTopology.declare_client`); provisioned runs get them from the definitions
``brokerfl provision`` writes from the same description, and a client only checks that its
queue is there (:meth:`~RunTopology.check_client`): its user may configure nothing, so no
client chooses its queue's arguments (a ``x-max-length: 0`` with ``reject-publish`` would
nack every broadcast; a dead-letter exchange of its choosing would republish the server's
messages under the server's name).

A client queue has no dead-letter queue: the client's worker dead-letters with its own
bounded copy (:meth:`brokerfl.transports.base.Transport.dead_letter`), everything routed to it
is in the journal anyway, and the broker's own dead-lettering would republish whole bodies
(e.g. of what its length cap drops).
"""  # noqa: E501 - a table

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from brokerfl.transports.base import QueueKind, Transport, TransportError
from brokerfl.wire.names import check_name

SERVER = "server"
CLIENTS = "clients"
DEAD = "dead"  # dead letters go through the exchange (so the journal records them, reason and all)
AUDIT = "audit"  # records for the journal only, e.g. which updates were dropped and why
ADMIN = "admin"  # the admin state's records (see brokerfl.runtime.operator_commands)
REQUESTER = "requester"  # not a routing key: the reply address of the request being handled
# The logs stream's retention: a run's logs are for following and for the post-mortem of
# its last days, not an archive (a site keeps its own stderr for that).
LOGS_MAX_BYTES = 256 * 1024**2
LOGS_MAX_AGE = "7D"
LOGS_ROUTE = "#"  # what binds the logs stream to its exchange


class QueueMissing(TransportError):
    """A queue that provisioning should have declared is not on the broker."""


@dataclass(frozen=True)
class QueueSpec:
    """One queue of a run as it is declared: its kind, arguments and the routing-key
    patterns that bind it to the run's exchange."""

    name: str
    kind: QueueKind
    bindings: tuple[str, ...] = ()
    dead_letter_queue: str | None = None
    max_length_bytes: int | None = None  # streams: retention by size
    max_age: str | None = None  # streams: retention by age
    single_active_consumer: bool = False

    def declare(self, transport: Transport, exchange: str) -> None:
        transport.declare_queue(
            self.name,
            kind=self.kind,
            dead_letter_queue=self.dead_letter_queue,
            max_length_bytes=self.max_length_bytes,
            max_age=self.max_age,
            single_active_consumer=self.single_active_consumer,
        )
        for pattern in self.bindings:
            transport.bind(self.name, exchange, pattern)


def client_dest(client_id: str) -> str:
    return f"client.{check_name('client id', client_id)}"


def routing_key(dest: str, message_type: str) -> str:
    return f"{dest}.{message_type}"


@dataclass(frozen=True)
class RunTopology:
    run: str
    journal: bool = True
    journal_max_bytes: int | None = 4 * 1024**3
    journal_max_age: str | None = None
    swarm: bool = False  # the server queue is the aggregator role (single active consumer); versions live in a stream
    replicated: bool = False  # every queue quorum (replicated on a cluster), not only the server's

    @property
    def queue_kind(self) -> QueueKind:
        """The kind of the run's queues other than the server queue and the streams."""
        return "quorum" if self.replicated else "classic"

    @property
    def models_stream(self) -> str:
        return f"brokerfl.{self.run}.models"

    def __post_init__(self) -> None:
        check_name("run name", self.run)

    @property
    def exchange(self) -> str:
        return f"brokerfl.{self.run}"

    @property
    def server_queue(self) -> str:
        return f"brokerfl.{self.run}.server"

    @property
    def server_lease(self) -> str:
        """The server role's lease (:meth:`brokerfl.transports.base.Transport.hold_lease`): the
        server process that holds it consumes the server queue; any other waits."""
        return f"brokerfl.{self.run}.server.lease"

    @property
    def dead_queue(self) -> str:
        return f"brokerfl.{self.run}.dead"

    @property
    def admin_queue(self) -> str:
        return f"brokerfl.{self.run}.admin"

    @property
    def journal_stream(self) -> str:
        return f"brokerfl.{self.run}.journal"

    @property
    def logs_exchange(self) -> str:
        """Where each process publishes its log records (:mod:`brokerfl.runtime.remote_log`)."""
        return f"brokerfl.{self.run}.logs.in"

    @property
    def logs_stream(self) -> str:
        return f"brokerfl.{self.run}.logs"

    def logs_spec(self) -> QueueSpec:
        """The logs stream, bound to the logs exchange (not the run's)."""
        return QueueSpec(
            self.logs_stream, "stream", (LOGS_ROUTE,), max_length_bytes=LOGS_MAX_BYTES, max_age=LOGS_MAX_AGE
        )

    def client_queue(self, client_id: str) -> str:
        return f"brokerfl.{self.run}.client.{check_name('client id', client_id)}"

    def queues(self) -> list[QueueSpec]:
        """The run's queues other than the clients' and the server's lease, in the order
        they are declared (a queue's dead-letter queue before it)."""
        specs = [
            QueueSpec(self.dead_queue, self.queue_kind, (f"{DEAD}.#",)),
            QueueSpec(
                self.server_queue,
                "quorum",
                (f"{SERVER}.#",),
                dead_letter_queue=self.dead_queue,
                single_active_consumer=self.swarm,
            ),
            QueueSpec(self.models_stream, "stream"),  # every stored model version (brokerfl.storage.broker_store)
            QueueSpec(self.admin_queue, self.queue_kind, (f"{ADMIN}.#",)),
        ]
        if self.journal:
            specs.append(
                QueueSpec(
                    self.journal_stream,
                    "stream",
                    ("#",),
                    max_length_bytes=self.journal_max_bytes,
                    max_age=self.journal_max_age,
                )
            )
        return specs

    def client_queue_spec(self, client_id: str) -> QueueSpec:
        """A client's durable queue, bound to its own and the broadcast keys (no dead-letter
        queue: see the module docstring)."""
        return QueueSpec(self.client_queue(client_id), self.queue_kind, (f"{client_dest(client_id)}.#", f"{CLIENTS}.#"))

    def declare(self, transport: Transport) -> None:
        """The run's exchange, dead-letter queue, server queue and journal (idempotent)."""
        transport.declare_exchange(self.exchange)
        for spec in self.queues():
            spec.declare(transport, self.exchange)
        transport.declare_exchange(self.logs_exchange)
        self.logs_spec().declare(transport, self.logs_exchange)

    def declare_client(self, transport: Transport, client_id: str) -> str:
        """Declare a client's queue and its bindings (unprovisioned runs); returns its name."""
        spec = self.client_queue_spec(client_id)
        spec.declare(transport, self.exchange)
        return spec.name

    def declare_provisioned(self, transport: Transport, client_ids: list[str]) -> None:
        """What a provisioned run's definitions declare: everything of :meth:`declare` and
        every client's queue (for an in-process run with identity, where nobody imports
        definitions)."""
        self.declare(transport)
        for client_id in client_ids:
            self.declare_client(transport, client_id)

    def check_client(self, transport: Transport, client_id: str) -> str:
        """A provisioned client's queue, which it may not declare: its name if it is on the
        broker, else :class:`QueueMissing` saying so (other errors pass through)."""
        queue = self.client_queue(client_id)
        self._check(transport, queue, "your queue")
        return queue

    def check(self, transport: Transport) -> None:
        """The run's queues are on the broker (:class:`QueueMissing` if one is not): what a
        participant that may not declare them checks before it uses them."""
        for spec in self.queues():
            self._check(transport, spec.name, "the run's queue")

    @staticmethod
    def _check(transport: Transport, queue: str, whose: str) -> None:
        try:
            transport.queue_info(queue)
        except TransportError as exc:
            if "no queue" not in str(exc):
                raise
            raise QueueMissing(
                f"{whose} {queue!r} is missing: has the operator imported the definitions "
                "(brokerfl provision writes them; rabbitmqctl import_definitions /absolute/path/definitions.json)?"
            ) from None

    def delete(self, transport: Transport, client_ids: Sequence[str] = ()) -> None:
        """Remove everything of the run (tests, and ``brokerfl`` operators cleaning up)."""
        for client_id in client_ids:
            transport.delete_queue(self.client_queue(client_id))
        for queue in (
            self.server_queue,
            self.dead_queue,
            self.admin_queue,
            self.journal_stream,
            self.models_stream,
            self.logs_stream,
        ):
            transport.delete_queue(queue)
        transport.delete_exchange(self.exchange)
        transport.delete_exchange(self.logs_exchange)
