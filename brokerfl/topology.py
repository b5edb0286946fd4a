"""Names and declarations of one run's exchange and queues (DESIGN.md section 2).

| name                           | kind           | takes                                    |
|--------------------------------|----------------|------------------------------------------|
| exchange ``brokerfl.<run>``    | topic          | every message of the run                 |
| ``brokerfl.<run>.server``      | quorum         | ``server.#``                             |
| ``brokerfl.<run>.client.<id>`` | classic        | ``client.<id>.#`` and ``clients.#``      |
| ``brokerfl.<run>.dead``        | classic        | ``dead.#``: dead letters, reason in a header |
| ``brokerfl.<run>.journal``     | stream         | ``#``: a copy of every message           |
| ``brokerfl.<run>.admin``       | classic        | ``admin.#``: the operator's admin state  |
| ``brokerfl.<run>.models``      | stream         | nothing routed: every stored model version (``brokerfl.broker_store``) |
| ``brokerfl.<run>.server.lease``| exclusive      | nothing: held by the active server's connection (one server acts at a time) |

With ``replicated`` (config ``replicated_queues: true``, for a RabbitMQ cluster) every queue
is a quorum queue: a classic queue lives on one node, and a client whose queue's node dies
would have no queue until that node returns. Streams replicate anyway.

Routing keys are ``<receiver>.<message type>``: ``server.parameter_update``,
``client.7.train_task``, ``clients.exit``; ``dead.<type>`` for dead letters and
``audit.<type>`` for records only the journal takes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from brokerfl.transport import Transport

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

SERVER = "server"
CLIENTS = "clients"
DEAD = "dead"  # dead letters go through the exchange (so the journal records them, reason and all)
AUDIT = "audit"  # records for the journal only, e.g. which updates were dropped and why
ADMIN = "admin"  # the admin state's records (see brokerfl.admin)
REQUESTER = "requester"  # not a routing key: the reply address of the request being handled


def check_name(kind: str, value: str) -> str:
    """Run names and client ids become words of routing keys: no dots, no wildcards."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of letters, digits, '_' or '-'")
    return value


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
    def queue_kind(self) -> str:
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
        """The server role's lease (:meth:`brokerfl.transport.Transport.hold_lease`): the
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

    def client_queue(self, client_id: str) -> str:
        return f"brokerfl.{self.run}.client.{check_name('client id', client_id)}"

    def declare(self, transport: Transport) -> None:
        """The run's exchange, dead-letter queue, server queue and journal (idempotent)."""
        transport.declare_exchange(self.exchange)
        transport.declare_queue(self.dead_queue, kind=self.queue_kind)
        transport.bind(self.dead_queue, self.exchange, f"{DEAD}.#")
        transport.declare_queue(self.server_queue, kind="quorum", dead_letter_queue=self.dead_queue, single_active_consumer=self.swarm)
        transport.declare_queue(self.models_stream, kind="stream")  # every stored model version (brokerfl.broker_store)
        transport.bind(self.server_queue, self.exchange, f"{SERVER}.#")
        transport.declare_queue(self.admin_queue, kind=self.queue_kind)
        transport.bind(self.admin_queue, self.exchange, f"{ADMIN}.#")
        if self.journal:
            transport.declare_queue(self.journal_stream, kind="stream", max_length_bytes=self.journal_max_bytes, max_age=self.journal_max_age)
            transport.bind(self.journal_stream, self.exchange, "#")

    def declare_client(self, transport: Transport, client_id: str) -> str:
        """A client's durable queue, bound to its own and the broadcast keys; returns its name."""
        queue = self.client_queue(client_id)
        transport.declare_queue(queue, kind=self.queue_kind, dead_letter_queue=self.dead_queue)
        transport.bind(queue, self.exchange, f"{client_dest(client_id)}.#")
        transport.bind(queue, self.exchange, f"{CLIENTS}.#")
        return queue

    def delete(self, transport: Transport, client_ids: list[str] = ()) -> None:
        """Remove everything of the run (tests, and ``brokerfl`` operators cleaning up)."""
        for client_id in client_ids:
            transport.delete_queue(self.client_queue(client_id))
        for queue in (self.server_queue, self.dead_queue, self.admin_queue, self.journal_stream, self.models_stream):
            transport.delete_queue(queue)
        transport.delete_exchange(self.exchange)
