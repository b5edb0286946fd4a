"""Who may say what: broker user names of a run's participants, and the checks receivers
make against the AMQP ``user_id`` of what they consume.

RabbitMQ validates ``user_id``: a message whose ``user_id`` is not its connection's login is
refused, so ``user_id`` is the publisher's identity, for free. The convention (written into
the definitions by ``brokerfl provision``, see :mod:`brokerfl.ops.provision`):

| participant | broker user             |
|-------------|-------------------------|
| server      | ``<run>-server``        |
| client ID   | ``<run>-client-<ID>``   |
| operator    | ``<run>-admin``         |

With ``identity.enforce: true`` in the run's config, receivers check every message
*before* its handler runs (the worker calls the check, keyed by nothing but the message):
the server takes only messages published by one of the run's client users, and a message
that names a ``client_id`` must come from that client's user; clients take only what the
server's user published. A refused message is dead-lettered with the reason. With
``enforce: false`` (the default: one laptop, every process ``guest``) nothing is checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from brokerfl.wire.names import check_name

if TYPE_CHECKING:
    from brokerfl.wire.message import Message

SenderCheck = Callable[["Message", str], "str | None"]
"""``check(message, user_id)``: None if the publisher may send it, else why not."""


def server_user(run: str) -> str:
    return f"{check_name('run name', run)}-server"


def admin_user(run: str) -> str:
    return f"{check_name('run name', run)}-admin"


def client_user(run: str, client_id: str) -> str:
    return f"{check_name('run name', run)}-client-{check_name('client id', client_id)}"


def server_inbox_check(run: str, client_ids: Iterable[str]) -> SenderCheck:
    """What the server accepts: messages of the run's clients, each about itself only, the
    operator's status requests and admin commands from the admin user only, and standby
    announcements from the server user only."""
    from brokerfl.runtime.operator_commands import AdminCommand, StatusRequest
    from brokerfl.wire.message import ServerStandby

    clients = {client_user(run, cid): cid for cid in client_ids}
    admin = admin_user(run)
    server = server_user(run)

    def check(message: Message, user: str) -> str | None:
        if isinstance(message, (AdminCommand, StatusRequest)):
            return (
                None
                if user == admin
                else f"{message.TYPE} may come from the admin user {admin!r} only, not {user or '(no user_id)'!r}"
            )
        if isinstance(message, ServerStandby):  # another server process of the run, waiting for the role
            return (
                None
                if user == server
                else f"{message.TYPE} may come from the server user {server!r} only, not {user or '(no user_id)'!r}"
            )
        who = clients.get(user)
        if who is None:
            return f"publisher {user or '(no user_id)'!r} is not a client of run {run!r}"
        claimed = getattr(message, "client_id", None)
        if claimed is not None and claimed != who:
            return f"{message.TYPE} claims client {claimed!r} but was published by {user!r} (client {who!r})"
        for other in getattr(message, "clients", None) or ():  # Heartbeats: a user speaks for its own client only
            if other != who:
                return f"{message.TYPE} claims client {other!r} but was published by {user!r} (client {who!r})"
        return None

    return check


def client_inbox_check(run: str) -> SenderCheck:
    """What a client accepts: only what the server's user published."""
    server = server_user(run)

    def check(message: Message, user: str) -> str | None:
        if user != server:
            return f"{message.TYPE} was published by {user or '(no user_id)'!r}, not by the server ({server!r})"
        return None

    return check
