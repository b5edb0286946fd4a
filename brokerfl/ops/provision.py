"""``brokerfl provision``: what an operator needs to run one federation across organisations.

It writes RabbitMQ *definitions* (applied with ``rabbitmqctl import_definitions /absolute/FILE``
or the broker's ``load_definitions`` setting), not code of ours that grants rights. Applying
them is the broker administrator's job, a role apart from the run's: ``rabbitmqctl`` on the
broker's host, or a user tagged ``administrator`` (creating vhosts and users is broker-wide;
docs/how-to/provisioning.md says who holds it). The users written here have rights in the run's
vhost only, and no tag but the run admin's ``management`` (its vhost's queues in the
management API, for ``brokerfl status``; it cannot list users, set permissions or policies,
or see other vhosts there):

- the run's vhost and its topic exchange ``brokerfl.<run>`` (so it exists before anyone
  connects, and clients need no right to declare it);
- one user per participant (names in :mod:`brokerfl.runtime.identity`), passwords stored hashed
  (``rabbit_password_hashing_sha256``: base64(salt4 + sha256(salt4 + password)));
- permissions (configure / write / read regexes over exchange and queue names) and topic
  permissions (regexes over routing keys on the run's exchange) for least privilege:

| user   | configure                          | write                                          | read                          | publishes (topic write)                         | binds (topic read)      |
|--------|------------------------------------|------------------------------------------------|-------------------------------|-------------------------------------------------|-------------------------|
| client | nothing                            | the exchange                                   | its own queue, the models stream | ``server.<client message types>``, ``dead.*`` | nothing                 |
| server | exchange, server/dead/admin/journal queues, the server lease | the same, and ``amq.default`` (direct replies) | the same as configure | ``client.*``, ``clients.*``, ``dead.*``, ``audit.*``, ``admin.*``, ``server.server_standby`` | ``server.#``, ``dead.#``, ``admin.#``, ``#`` |
| admin  | everything in the run's vhost (tag ``management``) | everything in the run's vhost | everything              | everything                                      | everything              |

The run's logs (:mod:`brokerfl.runtime.remote_log`) have an exchange of their own,
``brokerfl.<run>.logs.in``, routed into the stream ``brokerfl.<run>.logs``: each client may
write to that exchange under ``client.<its id>.log_records`` only, the server under
``server.log_records`` only (it also declares and binds them); nobody but the admin may
read the stream (``brokerfl logs``).

The definitions declare every queue of the run and its bindings, with the arguments
:class:`brokerfl.transports.topology.RunTopology` gives them (the server may declare its own again:
the same arguments, so the broker takes it as a no-op). A client configures nothing: it
only checks that its queue is there, so no client chooses its queue's arguments (length 0
with ``reject-publish``, a dead-letter exchange that republishes the server's messages
under the server's name) nor deletes it. ``dead.*`` is what a receiver's worker publishes
when it dead-letters a message (through the run's exchange, so the journal keeps it).

Limits (:class:`BrokerLimits`): per user, connections and channels (a client that opens
hundreds is refused past its limit, and the others go on); per client queue, a length and
a size with ``overflow: drop-head``, so a queue nobody consumes loses its oldest messages
instead of making the server's publishes nack (``reject-publish`` would stall every round);
the dead-letter queue capped the same way; and in the ``rabbitmq.conf`` fragment a maximum
message size of one chunk (:mod:`brokerfl.transports.amqp.chunks`; a node-wide setting). The
choices and what remains open are in ``docs/concepts/broker-rights.md``.

Beside the definitions: one env file per participant (``<user>.env``: ``BROKERFL_AMQP_URL``
with its password, ``BROKERFL_RUN``, ``BROKERFL_CLIENT_ID``, TLS paths), and with ``tls``
the CA's certificate, the broker's certificate and one client certificate per participant
(CN = user) for certificate login (:mod:`brokerfl.ops.certs`): signed from the participant's own
request (``brokerfl keygen``; its key never leaves its site) or with a key made here; the
CA's key in ``ca_dir``, apart. Plus a ``rabbitmq.conf`` fragment for the broker (with TLS:
TLS 1.2/1.3 only, password login off unless asked for). ``out`` is 0700 and every secret in
it (env files, keys) is written 0600 each time (:mod:`brokerfl.storage.private_files`).
"""  # noqa: E501 - a table

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brokerfl.config import RunConfig
from brokerfl.runtime.identity import admin_user, client_user, server_user
from brokerfl.runtime.remote_log import LogRecords
from brokerfl.storage.private_files import private_directory, write_private, write_public
from brokerfl.transports.topology import ADMIN, AUDIT, CLIENTS, DEAD, LOGS_ROUTE, SERVER, client_dest
from brokerfl.wire.message import FlowerReply, SecureKeys, SecureMasked, SecureReveal, SecureShares, ServerStandby
from brokerfl.wire.names import bounded

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
SigningRequest = str | Path | tuple[str, str | Path]  # a <user>.csr file, or (user, its request file)
ADMIN_TAG = "management"  # the run admin's only tag (docs/how-to/provisioning.md: why not another)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's sha256 password hash, as its definitions carry it."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def client_message_types(config: RunConfig) -> list[str]:
    """What a client of this run may publish to the server: ``identity.client_messages``,
    and the replies of the protocols the run's config turns on."""
    types = list(config.identity.client_messages)
    if config.secure_aggregation is not None:
        types += [m.TYPE for m in (SecureKeys, SecureShares, SecureMasked, SecureReveal)]
    if config.flower_app is not None:
        types.append(FlowerReply.TYPE)
    return list(dict.fromkeys(types))


def _any_of(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


MiB = 1024**2


@dataclass(frozen=True)
class BrokerLimits:
    """What the broker refuses a run's participants beyond what their rights allow.

    Connections and channels per user: a process opens two connections per transport (one
    to consume, one to publish) and about five channels each; a client process has two
    transports (its queue, the models it fetches), a server two. The limits leave room for
    the connections of a process that reconnects before the broker has noticed its old
    ones gone (heartbeats), and for an operator's few concurrent commands.

    A client queue holds what the server sent a client that has not taken it yet: a task
    (the whole model, unless tasks name it by reference), evaluations, Exit. Over its caps
    the broker drops its oldest messages: a client away that long starts again from the
    newest task and Exit, and the journal keeps a copy of everything dropped. The byte cap
    must exceed the run's largest task (all its chunks), or a task's first chunks are
    dropped as its last arrive and that client never gets a whole one."""

    client_connections: int = 12
    client_channels: int = 64
    server_connections: int = 32
    server_channels: int = 256
    admin_connections: int = 16
    admin_channels: int = 128
    client_queue_messages: int = 10_000
    client_queue_bytes: int = 1024 * MiB
    dead_queue_messages: int = 10_000
    dead_queue_bytes: int = 128 * MiB
    max_message_bytes: int = 16 * MiB  # the AMQP transport's default chunk size: one chunk fits

    def for_role(self, role: str) -> dict[str, int]:
        """A user's limits, as RabbitMQ's definitions carry them."""
        connections, channels = {
            "client": (self.client_connections, self.client_channels),
            "server": (self.server_connections, self.server_channels),
            "admin": (self.admin_connections, self.admin_channels),
        }[role]
        return {"max-connections": connections, "max-channels": channels}


@dataclass
class Participant:
    user: str
    role: str  # "server", "client" or "admin"
    client_id: str | None = None
    password: str = field(default_factory=lambda: secrets.token_urlsafe(24))


def participants(config: RunConfig) -> list[Participant]:
    run = config.run
    return [
        Participant(server_user(run), "server"),
        Participant(admin_user(run), "admin"),
        *(Participant(client_user(run, cid), "client", cid) for cid in config.client_ids()),
    ]


def definitions(
    config: RunConfig, people: list[Participant], *, vhost: str, limits: BrokerLimits = BrokerLimits()
) -> dict[str, Any]:
    """RabbitMQ definitions for one run in ``vhost`` (see the module docstring's table)."""
    from brokerfl.assembly.roles import topology_for
    from brokerfl.transports.amqp import queue_arguments

    topo = topology_for(config)
    x = topo.exchange
    client_types = client_message_types(config)
    users, permissions, topics = [], [], []
    for p in people:
        # management: the run admin sees its vhost's queue counts in the management API
        # (brokerfl status); users, permissions, policies and other vhosts stay out of reach
        tags = [ADMIN_TAG] if p.role == "admin" else []
        users.append(
            {
                "name": p.user,
                "password_hash": hash_password(p.password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": tags,
                "limits": limits.for_role(p.role),
            }
        )
        if p.role == "admin":
            permissions.append({"user": p.user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
            continue  # no topic permissions: every routing key
        if p.role == "server":
            # amq.default: the server answers status requests and admin commands on the
            # requester's direct reply-to address, which RabbitMQ routes through the default
            # exchange (the server already sends every client its tasks)
            write = _any_of(
                x,
                topo.server_queue,
                topo.dead_queue,
                topo.admin_queue,
                topo.journal_stream,
                topo.models_stream,
                "amq.default",
                topo.logs_exchange,
                topo.logs_stream,
            )
            # the logs: it declares them (configure) and binds the stream (write on it, read on
            # their exchange), and publishes its own; reading them is the admin's alone
            configure = _any_of(
                x,
                topo.server_queue,
                topo.dead_queue,
                topo.admin_queue,
                topo.journal_stream,
                topo.models_stream,
                topo.server_lease,
                topo.logs_exchange,
                topo.logs_stream,
            )
            read = _any_of(
                x,
                topo.server_queue,
                topo.dead_queue,
                topo.admin_queue,
                topo.journal_stream,
                topo.models_stream,
                topo.server_lease,
                topo.logs_exchange,
            )
            permissions.append({"user": p.user, "vhost": vhost, "configure": configure, "write": write, "read": read})
            topics.append(
                {
                    "user": p.user,
                    "vhost": vhost,
                    "exchange": topo.logs_exchange,
                    "write": rf"^{SERVER}\.{LogRecords.TYPE}$",
                    "read": _any_of(LOGS_ROUTE),
                }
            )
            # server.server_standby: a standby server announces itself to the active one
            topics.append(
                {
                    "user": p.user,
                    "vhost": vhost,
                    "exchange": x,
                    "write": rf"^(({CLIENTS}|client|{DEAD}|{AUDIT}|{ADMIN})\..+|{SERVER}\.{ServerStandby.TYPE})$",
                    "read": _any_of(f"{SERVER}.#", f"{DEAD}.#", f"{ADMIN}.#", "#"),
                }
            )
        else:
            queue = topo.client_queue(p.client_id)
            # configure nothing: the definitions declare and bind its queue. Write: publish to
            # the exchange only (binding would need write on the queue). Read: consume its
            # queue and the models stream (clients fetch the versions their tasks name,
            # brokerfl.storage.model_refs), nothing else (binding would need read on the exchange).
            permissions.append(
                {
                    "user": p.user,
                    "vhost": vhost,
                    "configure": "^$",
                    "write": _any_of(x, topo.logs_exchange),
                    "read": _any_of(queue, topo.models_stream),
                }
            )
            # its log records, under its own routing key only (brokerfl.runtime.remote_log)
            topics.append(
                {
                    "user": p.user,
                    "vhost": vhost,
                    "exchange": topo.logs_exchange,
                    "write": "^" + re.escape(f"{client_dest(p.client_id)}.{LogRecords.TYPE}") + "$",
                    "read": "^$",
                }
            )
            sends = "|".join(re.escape(t) for t in client_types)
            topics.append(
                {
                    "user": p.user,
                    "vhost": vhost,
                    "exchange": x,
                    "write": rf"^({SERVER}\.({sends})|{DEAD}\.[A-Za-z0-9_]+)$",
                    "read": "^$",
                }
            )
    specs = [*topo.queues(), *(topo.client_queue_spec(cid) for cid in config.client_ids())]
    logs = topo.logs_spec()  # bound to the logs exchange, not the run's
    queues = [
        {
            "name": spec.name,
            "vhost": vhost,
            "durable": True,
            "auto_delete": False,
            "arguments": queue_arguments(
                spec.kind,
                dead_letter_queue=spec.dead_letter_queue,
                max_length_bytes=spec.max_length_bytes,
                max_age=spec.max_age,
                single_active_consumer=spec.single_active_consumer,
            ),
        }
        for spec in [*specs, logs]
    ]
    bindings = [
        {
            "source": x,
            "vhost": vhost,
            "destination": spec.name,
            "destination_type": "queue",
            "routing_key": pattern,
            "arguments": {},
        }
        for spec in specs
        for pattern in spec.bindings
    ] + [
        {
            "source": topo.logs_exchange,
            "vhost": vhost,
            "destination": logs.name,
            "destination_type": "queue",
            "routing_key": pattern,
            "arguments": {},
        }
        for pattern in logs.bindings
    ]

    def capped(name: str, pattern: str, messages: int, size: int) -> dict[str, Any]:
        # drop-head, never reject-publish: a full queue must not nack its publisher's messages
        # (the server's broadcasts reach every client queue), and no dead-letter exchange: what
        # drop-head drops would be republished whole
        definition = {"max-length": messages, "max-length-bytes": size, "overflow": "drop-head"}
        return {
            "vhost": vhost,
            "name": name,
            "pattern": pattern,
            "apply-to": "queues",
            "priority": 0,
            "definition": definition,
        }

    return {
        "rabbit_version": "3.10.8",
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topics,
        "exchanges": [
            {
                "name": name,
                "vhost": vhost,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for name in (x, topo.logs_exchange)
        ],
        "policies": [
            capped(
                f"brokerfl-{config.run}-clients",
                "^" + re.escape(f"brokerfl.{config.run}.client."),
                limits.client_queue_messages,
                limits.client_queue_bytes,
            ),
            capped(
                f"brokerfl-{config.run}-dead-letters",
                _any_of(topo.dead_queue),
                limits.dead_queue_messages,
                limits.dead_queue_bytes,
            ),
        ],
        "queues": queues,
        "bindings": bindings,
    }


@dataclass
class Provisioned:
    out: Path
    vhost: str
    definitions: Path
    participants: list[Participant]
    env_files: dict[str, Path]  # user -> its env file
    tls_dir: Path | None = None
    rabbitmq_conf: Path | None = None
    ca_dir: Path | None = None  # where the CA's key is kept (None: it was not kept)
    self_keyed: list[str] = field(default_factory=list)  # users whose certificate was signed from their own request
    password_login: bool = True

    def env(self, user: str) -> dict[str, str]:
        return read_env_file(self.env_files[user])


def provision(
    config: RunConfig,
    out: str | Path,
    *,
    host: str = "localhost",
    port: int | None = None,
    vhost: str | None = None,
    tls: bool = False,
    broker_dir: str | None = None,
    ca_dir: str | Path | None = None,
    requests: Iterable[SigningRequest] = (),
    password_login: bool | None = None,
    limits: BrokerLimits = BrokerLimits(),
) -> Provisioned:
    """Write ``definitions.json``, ``<user>.env`` per participant and (``tls``) certificates
    under ``out`` (made 0700; every secret in it 0600, rewritten so each time).
    ``broker_dir``: where the broker will see ``out`` (e.g. a container mount) for the paths
    in ``rabbitmq.conf``; ``host``/``port``: how participants reach the broker.

    With ``tls``: ``ca_dir`` keeps the CA (made there once, reused after; never under
    ``out``); without it the CA's key is used for this provisioning and kept nowhere.
    ``requests``: participants' certificate signing requests (``brokerfl keygen``): paths
    named ``<user>.csr``, or (user, path); each is signed if its CN is that user, a user of
    this run, and that participant gets a certificate and no key from us. Requests signed before are kept in
    ``ca_dir/requests`` and signed again on
    re-provisioning. ``password_login`` (default: off with TLS): PLAIN beside certificate
    login on the TLS listener."""
    out = Path(out)
    password_login = (not tls) if password_login is None else password_login
    requests = list(requests)
    if not tls and not password_login:
        raise ValueError("without TLS a password is the only way to log in: password login cannot be turned off")
    if not tls and (requests or ca_dir is not None):
        raise ValueError("certificate signing requests and a CA directory need TLS (--tls)")
    if tls and ca_dir is not None and _is_within(Path(ca_dir), out):
        raise ValueError(f"the CA directory {ca_dir} is inside {out}, which is handed to the broker: keep it apart")
    vhost = vhost or config.run
    people = participants(config)
    to_sign = _signing_requests(ca_dir, requests, [p.user for p in people]) if tls else {}
    self_keyed = sorted(to_sign)
    private_directory(out)
    path = write_public(
        out / "definitions.json", json.dumps(definitions(config, people, vhost=vhost, limits=limits), indent=2)
    )  # hashes only: the broker reads it
    port = port or (5671 if tls else 5672)
    tls_dir = None
    if tls:
        tls_dir = out / "tls"
        _issue_certificates(tls_dir, ca_dir, to_sign, host=host, users=[p.user for p in people])
    env_files = {}
    quoted_vhost = vhost.replace("/", "%2F")
    for p in people:
        env = {"BROKERFL_RUN": config.run, "BROKERFL_ENFORCE_IDENTITY": "1"}
        if p.client_id is not None:
            env["BROKERFL_CLIENT_ID"] = p.client_id
        if tls:
            # certificate login: no password in the URL, the certificate's CN is the user
            env["BROKERFL_AMQP_URL"] = f"amqps://{host}:{port}/{quoted_vhost}"
            env["BROKERFL_TLS_CA"] = str((tls_dir / "ca.pem").resolve())
            env["BROKERFL_TLS_CERT"] = str((tls_dir / f"{p.user}.pem").resolve())
            if p.user not in self_keyed:
                env["BROKERFL_TLS_KEY"] = str((tls_dir / f"{p.user}.key").resolve())
        else:
            env["BROKERFL_AMQP_URL"] = f"amqp://{p.user}:{p.password}@{host}:{port}/{quoted_vhost}"
        text = "".join(f"{k}={v}\n" for k, v in env.items())
        if p.user in self_keyed:
            text += "# BROKERFL_TLS_KEY=<the key that brokerfl keygen made at your site; it never left it>\n"
        env_files[p.user] = write_private(out / f"{p.user}.env", text)
    conf = write_public(
        out / "rabbitmq.conf",
        rabbitmq_conf(broker_dir or str(out.resolve()), tls=tls, port=port, password_login=password_login),
    )
    return Provisioned(
        out,
        vhost,
        path,
        people,
        env_files,
        tls_dir,
        conf,
        Path(ca_dir) if tls and ca_dir is not None else None,
        self_keyed,
        password_login,
    )


def _is_within(path: Path, directory: Path) -> bool:
    return path.resolve() == directory.resolve() or directory.resolve() in path.resolve().parents


def _signing_requests(
    ca_dir: str | Path | None, requests: list[SigningRequest], users: list[str]
) -> dict[str, tuple[bytes, Any]]:
    """Every request to sign, checked (before anything is written): user -> (its PEM, the
    request). The given ones, and those signed at an earlier provisioning (``ca_dir/requests``).
    A request must be for the user the operator expects: the one named with it
    (``(user, path)``), else the one its file is named after (``brokerfl keygen`` writes
    ``<user>.csr``), so a site cannot slip in a request for the server's or another site's user."""
    from brokerfl.ops.certs import check_request

    found: dict[str, tuple[bytes, Any]] = {}
    stored = Path(ca_dir) / "requests" if ca_dir is not None else None
    if stored is not None and stored.is_dir():
        for f in sorted(stored.glob("*.csr")):
            if f.stem in users:
                data = f.read_bytes()
                found[f.stem] = (data, check_request(data, [f.stem], source=str(f))[1])
    given: dict[str, str | Path] = {}
    for request in requests:
        expected, path = request if isinstance(request, tuple) else (Path(request).stem, request)
        data = Path(path).read_bytes()
        user, csr = check_request(data, users, source=str(path))
        if user != expected:
            raise ValueError(
                f"{path} is a request for {user}, not for {bounded(expected, 80)}: sign it as {user}={path} only if it "
                f"came from {user}'s site"
            )
        if user in given:
            raise ValueError(f"two certificate signing requests for {user}: {given[user]} and {path}")
        given[user] = path
        found[user] = (data, csr)
    return found


def _issue_certificates(
    tls_dir: Path, ca_dir: str | Path | None, requests: dict[str, tuple[bytes, Any]], *, host: str, users: list[str]
) -> None:
    """The CA's certificate, the broker's pair and every user's certificate in ``tls_dir``;
    ``requests`` (from :func:`_signing_requests`) are signed and kept in ``ca_dir/requests``."""
    from brokerfl.ops.certs import (
        authority_in,
        issue_federation,
        new_authority,
        sign_request,
    )

    ca = authority_in(ca_dir) if ca_dir is not None else new_authority()
    signed = {user: sign_request(ca, csr) for user, (_, csr) in requests.items()}
    if ca_dir is not None and requests:
        stored = private_directory(Path(ca_dir) / "requests")
        for user, (data, _) in requests.items():
            write_public(stored / f"{user}.csr", data)
    issue_federation(tls_dir, broker_names=[host, "localhost", "127.0.0.1"], users=users, ca=ca, signed=signed)


def rabbitmq_conf(broker_dir: str, *, tls: bool, port: int, password_login: bool = True) -> str:
    """A ``rabbitmq.conf`` fragment: load the definitions at start; with TLS, a TLS-only
    listener (TLS 1.3 and 1.2, nothing older) that wants client certificates from this CA,
    and certificate login (enable the ``rabbitmq_auth_mechanism_ssl`` plugin too), with
    password login beside it only if ``password_login``."""
    lines = [f"load_definitions = {broker_dir}/definitions.json"]
    # node-wide: the largest message any publisher may send, one chunk of our transport's
    lines.append(f"max_message_size = {BrokerLimits().max_message_bytes}")
    if tls:
        lines += [
            "listeners.tcp = none",
            f"listeners.ssl.default = {port}",
            f"ssl_options.cacertfile = {broker_dir}/tls/ca.pem",
            f"ssl_options.certfile = {broker_dir}/tls/broker.pem",
            f"ssl_options.keyfile = {broker_dir}/tls/broker.key",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            # TLS 1.0 and 1.1 are deprecated (RFC 8996): a client that offers only them is refused
            "ssl_options.versions.1 = tlsv1.3",
            "ssl_options.versions.2 = tlsv1.2",
            "auth_mechanisms.1 = EXTERNAL",
            *(["auth_mechanisms.2 = PLAIN"] if password_login else []),
            "ssl_cert_login_from = common_name",
        ]
    return "\n".join(lines) + "\n"


def read_env_file(path: str | Path) -> dict[str, str]:
    env = {}
    for line in Path(path).read_text().splitlines():
        key, eq, value = line.partition("=")
        if eq and not key.startswith("#"):
            env[key.strip()] = value.strip()
    return env
