"""``brokerfl provision``: what an operator needs to run one federation across organisations.

It writes RabbitMQ *definitions* (applied with ``rabbitmqctl import_definitions /absolute/FILE``
or the broker's ``load_definitions`` setting), not code of ours that grants rights. Applying
them is the broker administrator's job, a role apart from the run's: ``rabbitmqctl`` on the
broker's host, or a user tagged ``administrator`` (creating vhosts and users is broker-wide).
The users written here have no tag and rights in the run's vhost only:

- the run's vhost and its topic exchange ``brokerfl.<run>`` (so it exists before anyone
  connects, and clients need no right to declare it);
- one user per participant (names in :mod:`brokerfl.identity`), passwords stored hashed
  (``rabbit_password_hashing_sha256``: base64(salt4 + sha256(salt4 + password)));
- permissions (configure / write / read regexes over exchange and queue names) and topic
  permissions (regexes over routing keys on the run's exchange) for least privilege:

| user   | configure                          | write / read                                   | publishes (topic write)                         | binds (topic read)      |
|--------|------------------------------------|------------------------------------------------|-------------------------------------------------|-------------------------|
| client | its own queue                      | the exchange, its own queue                    | ``server.<client message types>``, ``dead.*``   | ``client.<id>.#``, ``clients.#`` |
| server | exchange, server/dead/admin/journal queues, the server lease | the same, and ``amq.default`` (direct replies) | ``client.*``, ``clients.*``, ``dead.*``, ``audit.*``, ``admin.*``, ``server.server_standby`` | ``server.#``, ``dead.#``, ``admin.#``, ``#`` |
| admin  | everything in the run's vhost (no tag) | everything in the run's vhost              | everything                                      | everything              |

The server declares the run's queues (server, dead letters, journal); each client declares
and binds only its own queue. ``dead.*`` is what a receiver's worker publishes when it
dead-letters a message (through the run's exchange, so the journal keeps it).

Beside the definitions: one env file per participant (``<user>.env``: ``BROKERFL_AMQP_URL``
with its password, ``BROKERFL_RUN``, ``BROKERFL_CLIENT_ID``, TLS paths), and with ``tls``
a CA, the broker's certificate and one client certificate per participant (CN = user) for
certificate login (:mod:`brokerfl.certs`), plus a ``rabbitmq.conf`` fragment for the broker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brokerfl.config import RunConfig
from brokerfl.identity import admin_user, client_user, server_user
from brokerfl.message import ServerStandby
from brokerfl.topology import ADMIN, AUDIT, CLIENTS, DEAD, SERVER, RunTopology

HASHING_ALGORITHM = "rabbit_password_hashing_sha256"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's sha256 password hash, as its definitions carry it."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _any_of(*names: str) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


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


def definitions(config: RunConfig, people: list[Participant], *, vhost: str) -> dict[str, Any]:
    """RabbitMQ definitions for one run in ``vhost`` (see the module docstring's table)."""
    topo = RunTopology(config.run)
    x = topo.exchange
    client_types = config.identity.client_messages
    users, permissions, topics = [], [], []
    for p in people:
        users.append({"name": p.user, "password_hash": hash_password(p.password), "hashing_algorithm": HASHING_ALGORITHM, "tags": []})
        if p.role == "admin":
            permissions.append({"user": p.user, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"})
            continue  # no topic permissions: every routing key
        if p.role == "server":
            own = _any_of(x, topo.server_queue, topo.dead_queue, topo.admin_queue, topo.journal_stream, topo.models_stream, topo.server_lease)
            # amq.default: the server answers status requests and admin commands on the
            # requester's direct reply-to address, which RabbitMQ routes through the default
            # exchange (the server already sends every client its tasks)
            write = _any_of(x, topo.server_queue, topo.dead_queue, topo.admin_queue, topo.journal_stream, topo.models_stream, "amq.default")
            permissions.append({"user": p.user, "vhost": vhost, "configure": own, "write": write, "read": own})
            # server.server_standby: a standby server announces itself to the active one
            topics.append({"user": p.user, "vhost": vhost, "exchange": x, "write": rf"^(({CLIENTS}|client|{DEAD}|{AUDIT}|{ADMIN})\..+|{SERVER}\.{ServerStandby.TYPE})$", "read": _any_of(f"{SERVER}.#", f"{DEAD}.#", f"{ADMIN}.#", "#")})
        else:
            queue = topo.client_queue(p.client_id)
            # the models stream: clients fetch the versions their tasks name (brokerfl.model_refs)
            permissions.append({"user": p.user, "vhost": vhost, "configure": _any_of(queue), "write": _any_of(x, queue), "read": _any_of(x, queue, topo.models_stream)})
            sends = "|".join(re.escape(t) for t in client_types)
            topics.append({"user": p.user, "vhost": vhost, "exchange": x, "write": rf"^({SERVER}\.({sends})|{DEAD}\.[A-Za-z0-9_]+)$", "read": _any_of(f"client.{p.client_id}.#", f"{CLIENTS}.#")})
    return {
        "rabbit_version": "3.10.8",
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topics,
        "exchanges": [{"name": x, "vhost": vhost, "type": "topic", "durable": True, "auto_delete": False, "internal": False, "arguments": {}}],
        # Rejected messages of the run's queues go to its dead-letter queue. A policy, because
        # naming a dead-letter exchange in a queue's arguments needs write access to it (the
        # default exchange, which would let a user publish straight into any queue).
        "policies": [
            {
                "vhost": vhost,
                "name": f"brokerfl-{config.run}-dead-letters",
                "pattern": "^" + re.escape(f"brokerfl.{config.run}.") + r"(server|client\..+)$",
                "apply-to": "queues",
                "priority": 0,
                "definition": {"dead-letter-exchange": "", "dead-letter-routing-key": topo.dead_queue},
            }
        ],
        "queues": [],
        "bindings": [],
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
) -> Provisioned:
    """Write ``definitions.json``, ``<user>.env`` per participant and (``tls``) certificates
    under ``out``. ``broker_dir``: where the broker will see ``out`` (e.g. a container mount)
    for the paths in ``rabbitmq.conf``; ``host``/``port``: how participants reach the broker."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vhost = vhost or config.run
    people = participants(config)
    path = out / "definitions.json"
    path.write_text(json.dumps(definitions(config, people, vhost=vhost), indent=2))  # hashes only: the broker reads it
    port = port or (5671 if tls else 5672)
    tls_dir = None
    if tls:
        from brokerfl.certs import issue_federation

        tls_dir = out / "tls"
        issue_federation(tls_dir, broker_names=[host, "localhost", "127.0.0.1"], users=[p.user for p in people])
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
            env["BROKERFL_TLS_KEY"] = str((tls_dir / f"{p.user}.key").resolve())
        else:
            env["BROKERFL_AMQP_URL"] = f"amqp://{p.user}:{p.password}@{host}:{port}/{quoted_vhost}"
        env_files[p.user] = out / f"{p.user}.env"
        _write_private(env_files[p.user], "".join(f"{k}={v}\n" for k, v in env.items()))
    conf = out / "rabbitmq.conf"
    conf.write_text(rabbitmq_conf(broker_dir or str(out.resolve()), tls=tls, port=port))
    return Provisioned(out, vhost, path, people, env_files, tls_dir, conf)


def rabbitmq_conf(broker_dir: str, *, tls: bool, port: int) -> str:
    """A ``rabbitmq.conf`` fragment: load the definitions at start; with TLS, a TLS-only
    listener that wants client certificates from this CA, and certificate login (enable
    the ``rabbitmq_auth_mechanism_ssl`` plugin too)."""
    lines = [f"load_definitions = {broker_dir}/definitions.json"]
    if tls:
        lines += [
            "listeners.tcp = none",
            f"listeners.ssl.default = {port}",
            f"ssl_options.cacertfile = {broker_dir}/tls/ca.pem",
            f"ssl_options.certfile = {broker_dir}/tls/broker.pem",
            f"ssl_options.keyfile = {broker_dir}/tls/broker.key",
            "ssl_options.verify = verify_peer",
            "ssl_options.fail_if_no_peer_cert = true",
            "auth_mechanisms.1 = EXTERNAL",
            "auth_mechanisms.2 = PLAIN",
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


def _write_private(path: Path, text: str) -> None:
    """Secrets: readable by their owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
