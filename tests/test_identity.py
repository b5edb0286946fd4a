"""Identity without a broker: the user_id every message carries, the receivers' checks
(identity.enforce), provisioning's definitions, and a simulated federation under attack."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import numpy as np
import pytest

from brokerfl.assembly.roles import client_worker, server_worker, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import parse_config
from brokerfl.ops.provision import definitions, hash_password, participants, provision, read_env_file
from brokerfl.runtime.identity import client_inbox_check, client_user, server_inbox_check, server_user
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.base import ORIGIN_USER_HEADER, REASON_HEADER, TransportError
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import Exit, Heartbeat, Join, Leave, ParameterUpdate, to_wire

RUN = "idt"


def secure_config(**overrides):
    data = {
        "run": RUN,
        "clients": 3,
        "rounds": 2,
        "train": {"epochs": 1, "max_batches": 10},
        "identity": {"enforce": True},
    }
    data.update(overrides)
    return parse_config(data)


def test_rabbitmq_password_hash_format():
    # RabbitMQ's documented example: password "test12", salt 908DC60A
    assert hash_password("test12", bytes.fromhex("908DC60A")) == "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
    raw = base64.b64decode(hash_password("secret"))
    assert raw[4:] == hashlib.sha256(raw[:4] + b"secret").digest()


def test_the_local_transport_stamps_and_validates_user_id():
    broker = LocalBroker()
    a, b = LocalTransport(broker, user="alice"), LocalTransport(broker, user="bob")
    b.declare_exchange("x")
    b.declare_queue("q")
    b.bind("q", "x", "#")
    envelope, body = to_wire(Join(client_id="0"))
    a.publish("x", "k", envelope, body)
    assert b.get("q").envelope.user_id == "alice"
    forged = to_wire(Join(client_id="0", user_id="bob"))
    with pytest.raises(TransportError, match="user_id"):
        a.publish("x", "k", *forged)


def test_receivers_checks():
    server = server_inbox_check(RUN, ["0", "1"])
    assert (
        server(ParameterUpdate(client_id="1", task_id="t", parameters={}, num_samples=1), client_user(RUN, "1")) is None
    )
    assert "claims client '1'" in server(
        ParameterUpdate(client_id="1", task_id="t", parameters={}, num_samples=1), client_user(RUN, "0")
    )
    assert "claims client '0'" in server(Leave(client_id="0"), client_user(RUN, "1"))
    assert "not a client" in server(Heartbeat(client_id="7"), client_user(RUN, "7"))  # not in the federation
    assert "not a client" in server(Join(client_id="0"), "guest")
    client = client_inbox_check(RUN)
    assert client(Exit(), server_user(RUN)) is None
    assert "not by the server" in client(Exit(), client_user(RUN, "1"))


def test_definitions_give_least_privilege(tmp_path):
    config = secure_config()
    people = participants(config)
    defs = definitions(config, people, vhost="v")
    assert {u["name"] for u in defs["users"]} == {
        f"{RUN}-server",
        f"{RUN}-admin",
        *(f"{RUN}-client-{i}" for i in range(3)),
    }
    assert all(
        u["hashing_algorithm"] == "rabbit_password_hashing_sha256" and "password" not in u for u in defs["users"]
    )
    topics = {t["user"]: t for t in defs["topic_permissions"]}
    perms = {p["user"]: p for p in defs["permissions"]}
    c0 = client_user(RUN, "0")
    # Python's re stands in for RabbitMQ's (PCRE) here: same syntax for these patterns
    may = lambda pattern, text: re.search(pattern, text) is not None  # noqa: E731
    assert may(topics[c0]["write"], "server.parameter_update") and may(topics[c0]["write"], "dead.train_task")
    for key in ("clients.exit", "client.1.train_task", "server.train_task", "audit.update_dropped"):
        assert not may(topics[c0]["write"], key), key
    # a client binds nothing (its queue's bindings come with the definitions) and configures nothing
    assert not any(may(topics[c0]["read"], key) for key in ("client.0.#", "clients.#", "client.1.#"))
    assert may(perms[c0]["read"], f"brokerfl.{RUN}.client.0") and not may(perms[c0]["read"], f"brokerfl.{RUN}.client.1")
    assert perms[c0]["configure"] == "^$" and not may(perms[c0]["write"], f"brokerfl.{RUN}.client.0")
    queues = {q["name"]: q["arguments"] for q in defs["queues"]}
    assert {f"brokerfl.{RUN}.client.{i}" for i in range(3)} <= set(queues) and queues[f"brokerfl.{RUN}.server"][
        "x-queue-type"
    ] == "quorum"
    bound = {(b["destination"], b["routing_key"]) for b in defs["bindings"]}
    assert {
        (f"brokerfl.{RUN}.client.1", "client.1.#"),
        (f"brokerfl.{RUN}.client.1", "clients.#"),
        (f"brokerfl.{RUN}.server", "server.#"),
    } <= bound
    assert not may(perms[server_user(RUN)]["configure"], f"brokerfl.{RUN}.client.0")
    assert may(topics[server_user(RUN)]["write"], "clients.exit") and not may(
        topics[server_user(RUN)]["write"], "server.join"
    )

    done = provision(config, tmp_path, host="broker.example", port=5672)
    assert json.loads(done.definitions.read_text())["vhosts"] == [{"name": RUN}]
    env = read_env_file(done.env_files[c0])
    password = next(p.password for p in done.participants if p.user == c0)
    assert (
        env["BROKERFL_AMQP_URL"] == f"amqp://{c0}:{password}@broker.example:5672/{RUN}"
        and env["BROKERFL_CLIENT_ID"] == "0"
    )
    assert (done.env_files[c0].stat().st_mode & 0o077) == 0  # a secret: its owner's only
    assert password not in done.definitions.read_text()


def test_simulate_with_identity_matches_simulate_without():
    secure = simulate(secure_config()).records
    open_ = simulate(secure_config(identity={"enforce": False})).records
    assert [r["sha256"] for r in secure] == [r["sha256"] for r in open_]


def test_forged_messages_are_dead_lettered_not_folded():
    """Client 0 (its own user) claims to be client 1 and 2 in an update, a Leave, a Heartbeat
    and a Join, and sends Exit to client 1: every one is refused with the reason, the run is
    unaffected (client 2 still answers every round)."""
    config = secure_config(clients=3, rounds=2, liveness={"timeout_s": 1e9})
    broker = LocalBroker()
    topology_for(config, journal=True).declare_provisioned(
        LocalTransport(broker), config.client_ids()
    )  # the definitions' part
    metrics, store = MetricsLog(None), MemoryModelStore()
    server = server_worker(LocalTransport(broker, user=server_user(RUN)), config, store, metrics, journal=True)
    clients = [
        client_worker(LocalTransport(broker, user=client_user(RUN, c)), config, c, journal=True)
        for c in config.client_ids()
    ]
    topology = topology_for(config)
    attacker = LocalTransport(broker, user=client_user(RUN, "0"))
    huge = {"0.weight": np.full((64, 128), 1e3, np.float32)}
    forged = [
        (
            "server.parameter_update",
            ParameterUpdate(client_id="1", task_id="x", parameters=huge, num_samples=10**6, run=RUN, round=1),
        ),
        ("server.leave", Leave(client_id="2", run=RUN)),
        ("server.heartbeat", Heartbeat(client_id="1", run=RUN)),
        ("server.join", Join(client_id="2", run=RUN)),
        ("client.1.exit", Exit(run=RUN)),
    ]
    for key, message in forged:
        attacker.publish(topology.exchange, key, *to_wire(message))
    from brokerfl.assembly.simulate import _run

    for client in clients:
        client.start()
    server.start()
    _run(server, clients)
    assert [r["num_updates"] for r in metrics.records] == [3, 3]
    dead = []
    admin = LocalTransport(broker)
    while (d := admin.get(topology.dead_queue)) is not None:
        dead.append((d.envelope.type, d.envelope.headers[REASON_HEADER], d.envelope.headers[ORIGIN_USER_HEADER]))
    assert sorted(t for t, _, _ in dead) == ["exit", "heartbeat", "join", "leave", "parameter_update"]
    assert all(reason.startswith("refused: ") and user == client_user(RUN, "0") for _, reason, user in dead)
    assert server.dead_letter_kinds == {"refused": 4} and clients[1].dead_letter_kinds == {
        "refused": 1
    }  # counted as refusals, not "unhandled"
    forged_id = forged[0][1].message_id
    assert all(forged_id not in store.metadata(v)["update_ids"] for v in store.versions())
    # replay says who sent what
    from brokerfl.ops.replay import replay
    from brokerfl.storage.journal import read_journal

    result = replay(read_journal(admin, topology), config)
    assert [sorted(row.users) for row in result.rows] == [[], *[[client_user(RUN, c) for c in "012"]] * 2]
    assert f"from {client_user(RUN, '0')}" in result.table()


def test_provision_command_writes_definitions_credentials_and_certificates(tmp_path, capsys):
    from brokerfl.cli import main

    assert (
        main(
            [
                "provision",
                "--run",
                "acme",
                "--clients",
                "2",
                "--host",
                "broker.example",
                "--tls",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "definitions.json" in capsys.readouterr().out
    env = read_env_file(tmp_path / "acme-client-1.env")
    assert env["BROKERFL_AMQP_URL"] == "amqps://broker.example:5671/acme"  # certificate login: no password
    assert env["BROKERFL_CLIENT_ID"] == "1" and env["BROKERFL_ENFORCE_IDENTITY"] == "1"
    from brokerfl.transports.amqp.connect import certificate_user

    assert certificate_user(env["BROKERFL_TLS_CERT"]) == "acme-client-1"
    conf = (tmp_path / "rabbitmq.conf").read_text()
    assert (
        "ssl_cert_login_from = common_name" in conf
        and f"load_definitions = {tmp_path.resolve()}/definitions.json" in conf
    )
    with pytest.raises(SystemExit, match="one --client-id per process"):
        main(
            ["client", "--run", "acme", "--enforce-identity", "--client-id", "0-1", "--broker", "amqp://x@127.0.0.1:1/"]
        )


def test_only_the_admin_user_may_send_admin_commands_and_status_requests():
    from brokerfl.runtime.identity import admin_user, client_user, server_inbox_check, server_user
    from brokerfl.runtime.operator_commands import AbortRun, StatusRequest

    check = server_inbox_check("r1", ["0", "1"])
    for message in (AbortRun(reason="x"), StatusRequest()):
        assert check(message, admin_user("r1")) is None
        for intruder in (client_user("r1", "0"), server_user("r1"), "guest", ""):
            why = check(message, intruder)
            assert why is not None and "admin user" in why
