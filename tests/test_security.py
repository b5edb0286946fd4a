"""Per-participant identity on a real RabbitMQ: provisioned users, least privilege, forged
messages, and the same federation over TLS with certificate login.

Each test provisions a run (``brokerfl.ops.provision``) into a vhost of its own, imports the
definitions with ``rabbitmqctl import_definitions`` (or starts a TLS node that loads them),
and deletes the vhost and users afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from rabbit_nodes import node_env

from brokerfl.assembly.roles import client_worker, server_worker, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.ops.certs import write_signing_request
from brokerfl.ops.provision import Provisioned, provision
from brokerfl.runtime.identity import client_user
from brokerfl.storage.accounting import account_run
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.amqp import AmqpTransport
from brokerfl.transports.amqp.connect import TlsOptions
from brokerfl.transports.base import ORIGIN_USER_HEADER, REASON_HEADER, TransportError
from brokerfl.wire.message import Exit, Heartbeat, Join, Leave, ParameterUpdate, to_wire

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]


def secure_config(run: str, clients: int = 3, rounds: int = 3):
    return load_config(
        ROOT / "configs/digits_fedavg.yaml",
        {"run": run, "clients": clients, "rounds": rounds, "identity.enforce": True, "liveness.timeout_s": 600.0},
    )


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except TransportError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling the broker under a deadline (definitions import asynchronously)


def connect(done: Provisioned, user: str, **options) -> AmqpTransport:
    env = done.env(user)
    tls = TlsOptions(env.get("BROKERFL_TLS_CA"), env.get("BROKERFL_TLS_CERT"), env.get("BROKERFL_TLS_KEY"))
    return AmqpTransport(env["BROKERFL_AMQP_URL"], tls=tls, max_reconnect_s=5, **options)


def _can_log_in(done: Provisioned, user: str) -> bool:
    with connect(done, user):
        return True


@pytest.fixture
def provisioned(provision_on_broker):
    """A run's definitions imported into the test broker (vhost and users deleted after)."""
    config = secure_config("s" + uuid.uuid4().hex[:10])
    return config, provision_on_broker(config)


def refused(fn) -> str:
    """The broker's refusal of ``fn`` (the assertion fails if it was allowed)."""
    with pytest.raises(TransportError) as info:
        fn()
    return str(info.value)


def test_least_privilege(provisioned):
    config, done = provisioned
    run = config.run
    topology = topology_for(config)
    server = connect(done, f"{run}-server")
    a = connect(done, f"{run}-client-0")
    b = connect(done, f"{run}-client-1")
    admin = connect(done, f"{run}-admin")
    try:
        topology.declare(server)  # the server may declare its queues again (the same arguments)
        topology.check_client(a, "0")  # the definitions declared each client's queue
        topology.check_client(b, "1")
        join = Join(client_id="1", run=run)

        # A cannot publish as B: the broker refuses a user_id that is not A's
        assert "PRECONDITION_FAILED" in refused(
            lambda: a.publish(
                topology.exchange, "server.join", *to_wire(dataclasses.replace(join, user_id=f"{run}-client-1"))
            )
        )
        # A cannot publish what only the server may
        assert "ACCESS_REFUSED" in refused(
            lambda: a.publish(topology.exchange, "clients.exit", *to_wire(Exit(run=run)))
        )
        assert "ACCESS_REFUSED" in refused(
            lambda: a.publish(topology.exchange, "client.1.train_task", *to_wire(Exit(run=run)))
        )
        assert "ACCESS_REFUSED" in refused(
            lambda: a.publish("", topology.client_queue("1"), *to_wire(Exit(run=run)))
        )  # the default exchange
        # A cannot bind to, consume or take from B's queue, nor bind its own to B's keys
        assert "ACCESS_REFUSED" in refused(lambda: a.bind(topology.client_queue("1"), topology.exchange, "server.#"))
        assert "ACCESS_REFUSED" in refused(lambda: a.bind(topology.client_queue("0"), topology.exchange, "client.1.#"))
        assert "ACCESS_REFUSED" in refused(lambda: a.consume(topology.client_queue("1"), lambda d: None))
        assert "ACCESS_REFUSED" in refused(lambda: a.get(topology.client_queue("1")))
        # A cannot declare or delete the server's queues (or the exchange, or other queues)
        assert "ACCESS_REFUSED" in refused(lambda: a.delete_queue(topology.server_queue))
        assert "ACCESS_REFUSED" in refused(lambda: a.declare_queue(topology.server_queue, kind="quorum"))
        assert "ACCESS_REFUSED" in refused(lambda: a.declare_queue(topology.journal_stream, kind="stream"))
        assert "ACCESS_REFUSED" in refused(lambda: a.delete_exchange(topology.exchange))
        assert "ACCESS_REFUSED" in refused(lambda: a.declare_queue(f"brokerfl.{run}.client.9"))
        # the server cannot publish as a client either
        assert "ACCESS_REFUSED" in refused(lambda: server.publish(topology.exchange, "server.join", *to_wire(join)))

        # what each may do, it can: A's own claim reaches the server queue stamped with A's user
        a.publish(topology.exchange, "server.join", *to_wire(Join(client_id="0", run=run)))
        got = wait_for(lambda: server.get(topology.server_queue), 30, "A's join")
        assert got.envelope.user_id == f"{run}-client-0"
        server.ack(got)
        # the admin can do what the clients cannot
        admin.declare_queue(f"brokerfl.{run}.extra")
        admin.bind(f"brokerfl.{run}.extra", topology.exchange, "client.1.#")
        admin.get(topology.client_queue("1"))
        admin.publish(topology.exchange, "clients.exit", *to_wire(Exit(run=run)))
        admin.delete_queue(f"brokerfl.{run}.extra")
        admin.delete_queue(topology.client_queue("1"))
    finally:
        for t in (server, a, b, admin):
            t.close()


def run_federation(config, connect_as) -> tuple[list[dict], MemoryModelStore, AmqpTransport]:
    """Server and clients in threads, each on its own connection as its own user; returns
    the metrics, the store and the server's (still open) connection."""
    torch.set_num_threads(1)
    metrics, store = MetricsLog(None), MemoryModelStore()
    server_transport = connect_as(None)
    server = server_worker(server_transport, config, store, metrics)
    clients = [client_worker(connect_as(cid), config, cid) for cid in config.client_ids()]
    errors: list[BaseException] = []

    def run(worker) -> None:
        try:
            worker.start()
            worker.run(poll_s=0.2)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
            worker.stopped = True

    threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in [server, *clients]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    for worker in clients:
        worker.transport.close()
    assert not errors, errors
    assert all(not t.is_alive() for t in threads), "the federation did not finish"
    assert not server.state.failure, server.state.failure
    return metrics.records, store, server_transport


def attack(config, done: Provisioned) -> list[str]:
    """Client 0 tries to speak for others; returns the ids of what it got through to the server queue."""
    run, topology = config.run, topology_for(config)
    forged = [
        ParameterUpdate(
            client_id="1",
            task_id="x",
            parameters={"0.weight": np.full((128, 64), 1e3, np.float32)},
            num_samples=10**6,
            run=run,
            round=1,
        ),
        Leave(client_id="2", run=run),
        Heartbeat(client_id="1", run=run),
    ]
    with connect(done, client_user(run, "0")) as mallory:
        for message in forged:
            mallory.publish(topology.exchange, f"server.{message.TYPE}", *to_wire(message))
        with pytest.raises(TransportError, match="ACCESS_REFUSED"):
            mallory.publish(topology.exchange, "clients.exit", *to_wire(Exit(run=run)))
    return [m.message_id for m in forged]


def test_a_provisioned_federation_refuses_forgeries_and_trains_like_simulate(provisioned):
    config, done = provisioned
    run = config.run
    forged: list[str] = []

    def connect_as(client_id):
        transport = connect(done, f"{run}-server" if client_id is None else client_user(run, client_id))
        if client_id == "0":  # the server's queue exists by now: forge before anyone trains
            forged.extend(attack(config, done))
        return transport

    records, store, server_transport = run_federation(config, connect_as)
    try:
        assert [r["num_updates"] for r in records] == [
            config.clients
        ] * config.rounds  # the forged Leave removed no one
        folded = {uid for v in store.versions() for uid in store.metadata(v)["update_ids"]}
        assert forged[0] not in folded
        accounting = account_run(server_transport, topology_for(config), store)
        assert accounting.ok, accounting.summary()
        assert set(accounting.dead) == {forged[0]}
        assert "claims client '1'" in accounting.dead[forged[0]][0]
        assert (
            f"published by {run}-client-0: {config.rounds + 1} updates, {config.rounds} folded" in accounting.summary()
        )
    finally:
        server_transport.close()
    with connect(done, f"{run}-admin") as admin:  # every forgery is in the dead-letter queue with its reason
        dead = {}
        while (d := admin.get(topology_for(config).dead_queue)) is not None:
            dead[d.envelope.message_id] = (d.envelope.headers[REASON_HEADER], d.envelope.headers[ORIGIN_USER_HEADER])
            admin.ack(d)
    assert set(dead) == set(forged)
    assert all(reason.startswith("refused: ") and user == f"{run}-client-0" for reason, user in dead.values())

    torch.set_num_threads(1)
    open_run = simulate(
        config.model_copy(update={"identity": config.identity.model_copy(update={"enforce": False})})
    ).records
    assert [r["accuracy"] for r in records] == [r["accuracy"] for r in open_run]
    assert [r["sha256"] for r in records] == [r["sha256"] for r in open_run]


@pytest.mark.timeout(300)
def test_the_run_admin_has_only_the_management_tag_and_still_operates_the_run(provisioned):
    """``<run>-admin`` has rights in the run's vhost only (its one tag, ``management``, opens
    that vhost in the management API and nothing broker-wide: see
    test_the_run_admin_cannot_reach_users_or_other_vhosts_through_the_management_api), which is
    all that ``brokerfl status`` and ``brokerfl admin`` need."""
    import json

    config, done = provisioned
    run = config.run
    definitions = json.loads(done.definitions.read_text())
    assert {u["name"]: u["tags"] for u in definitions["users"]}[f"{run}-admin"] == ["management"]
    server = server_worker(
        connect(done, f"{run}-server"), config, MemoryModelStore(), MetricsLog(None)
    )  # waits for its clients
    thread = threading.Thread(target=lambda: (server.start(), server.run(poll_s=0.2)), daemon=True)
    thread.start()
    env = {**os.environ, **done.env(f"{run}-admin")}  # the admin's URL, run and identity settings

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "brokerfl.cli", *args, "--run", run],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    try:
        status = cli("status", "--json", "--timeout", "30")
        assert status.returncode == 0, status.stdout + status.stderr
        assert json.loads(status.stdout)["server"]["run"] == run
        changed = cli("admin", "set-rounds", "5", "--timeout", "30")
        assert changed.returncode == 0 and changed.stdout.startswith("OK: rounds 3 -> 5"), (
            changed.stdout + changed.stderr
        )
        refused = cli("admin", "remove-client", "99", "--timeout", "30")
        assert refused.returncode == 1 and "REFUSED: client 99 is not in the federation" in refused.stdout, (
            refused.stdout + refused.stderr
        )
    finally:
        server.stopped = True
        thread.join(60)
        server.transport.close()
    assert not thread.is_alive() and server.state.config.rounds == 5


# ---------------------------------------------------------------- TLS with certificate login


def _tls_node_settings(amqp_url: str) -> tuple[str, int]:
    """A node name and TLS port for the test's own node: BROKERFL_TLS_NODE / BROKERFL_TLS_PORT,
    else derived from the test broker's (``h9@localhost`` on 5685 -> ``h9tls@localhost`` on 5785)."""
    base = (os.environ.get("BROKERFL_RABBITMQ_NODE") or "rabbit@localhost").split("@")[0]
    name = os.environ.get("BROKERFL_TLS_NODE") or f"{base}tls@localhost"
    port = int(os.environ.get("BROKERFL_TLS_PORT") or (urlsplit(amqp_url).port or 5672) + 100)
    return name, port


def _skip_or_fail(reason: str):
    if os.environ.get("BROKERFL_REQUIRE_BROKER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tls_node(amqp_url):
    """A RabbitMQ node of the test's own with a TLS-only listener, certificate login and the
    run's definitions loaded at boot; stopped and removed after."""
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        _skip_or_fail(
            "starting a TLS RabbitMQ node needs rabbitmq-server and root (to hand the node directory to the rabbitmq "
            "user)"
        )
    node, port = _tls_node_settings(amqp_url)
    base = Path(tempfile.mkdtemp(prefix="brokerfl-tls-"))
    run = "tls" + uuid.uuid4().hex[:8]
    config = secure_config(run, clients=2, rounds=2)
    # client 1 makes its own key and request at its site (brokerfl keygen); the operator signs
    # the request with a CA kept apart from the broker's files, and hands back the rest
    site, self_keyed = base / "site-1", client_user(run, "1")
    own_key, request = write_signing_request(site, self_keyed)
    done = provision(
        config, base / "provision", host="localhost", port=port, tls=True, ca_dir=base / "ca", requests=[request]
    )
    site_env = site / f"{self_keyed}.env"  # the site completes its file with its key's path
    site_env.write_text(done.env_files[self_keyed].read_text() + f"BROKERFL_TLS_KEY={own_key}\n")
    done.env_files[self_keyed] = site_env
    (base / "rabbitmq.conf").write_text(done.rabbitmq_conf.read_text() + "loopback_users = none\n")
    (base / "enabled_plugins").write_text("[rabbitmq_auth_mechanism_ssl].\n")
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=True)
    base.chmod(0o755)
    env = node_env(node, port, base, tcp_listener=False)  # TLS only: the listener is in rabbitmq.conf
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True, timeout=60)
    try:
        subprocess.run(
            ["rabbitmqctl", "-n", node, "wait", "--timeout", "90", str(base / "pid")],
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )
        wait_for(lambda: _can_log_in(done, f"{run}-admin"), 60, "certificate login on the TLS node")
        yield config, done, base
    finally:
        subprocess.run(["rabbitmqctl", "-n", node, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


def test_a_federation_over_tls_with_certificate_login(tls_node):
    """Client 1's key was made at its site: the operator only signed its request."""
    config, done, base = tls_node
    run = config.run
    self_keyed = client_user(run, "1")
    assert done.self_keyed == [self_keyed] and not (done.tls_dir / f"{self_keyed}.key").exists()
    own_key = Path(done.env(self_keyed)["BROKERFL_TLS_KEY"])
    assert own_key.parent == base / "site-1"
    assert not any(
        own_key.read_bytes() in f.read_bytes() for d in (done.out, base / "ca") for f in d.rglob("*") if f.is_file()
    )
    assert not list(done.out.rglob("ca.key")) and (base / "ca" / "ca.key").exists()

    def connect_as(client_id):
        return connect(done, f"{run}-server" if client_id is None else client_user(run, client_id))

    records, store, server_transport = run_federation(config, connect_as)
    server_transport.close()
    assert [r["num_updates"] for r in records] == [config.clients] * config.rounds
    assert server_transport.user == f"{run}-server"  # from the certificate's CN: no password anywhere
    torch.set_num_threads(1)
    open_run = simulate(
        config.model_copy(update={"identity": config.identity.model_copy(update={"enforce": False})})
    ).records
    assert [r["sha256"] for r in records] == [r["sha256"] for r in open_run]


def test_tls_refuses_a_foreign_ca_and_a_wrong_hostname(tls_node, tmp_path):
    config, done, _ = tls_node
    from brokerfl.ops.certs import issue, new_authority, write_pair

    user = client_user(config.run, "0")
    env = done.env(user)
    # a certificate for the same CN, from another CA: the broker refuses the handshake
    other = new_authority("someone else's CA")
    cert, key = write_pair(tmp_path, "mallory", *issue(other, user))
    with pytest.raises(TransportError):
        AmqpTransport(
            env["BROKERFL_AMQP_URL"], tls=TlsOptions(env["BROKERFL_TLS_CA"], str(cert), str(key)), max_reconnect_s=1
        )
    # the broker's certificate names localhost and 127.0.0.1, not 127.0.0.2: we refuse it
    wrong_host = env["BROKERFL_AMQP_URL"].replace("localhost", "127.0.0.2")
    with pytest.raises(TransportError, match="(?i)certificate|hostname"):
        AmqpTransport(
            wrong_host,
            tls=TlsOptions(env["BROKERFL_TLS_CA"], env["BROKERFL_TLS_CERT"], env["BROKERFL_TLS_KEY"]),
            max_reconnect_s=1,
        )
    # the right one is accepted, also from the command line's flags
    from brokerfl.cli import main

    flags = [
        "--tls-ca",
        env["BROKERFL_TLS_CA"],
        "--tls-cert",
        env["BROKERFL_TLS_CERT"],
        "--tls-key",
        env["BROKERFL_TLS_KEY"],
    ]
    assert main(["ping", "--broker", env["BROKERFL_AMQP_URL"], *flags]) == 0


def _handshake(port: int, context: ssl.SSLContext) -> str:
    """The TLS version the node agrees to with ``context`` (raises ssl.SSLError if none)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        return tls.version()


def _client_context(
    env: dict[str, str], *, newest: ssl.TLSVersion, oldest: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version, context.maximum_version = oldest, newest
    if oldest < ssl.TLSVersion.TLSv1_2:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old versions at all
    context.load_verify_locations(env["BROKERFL_TLS_CA"])
    context.load_cert_chain(env["BROKERFL_TLS_CERT"], env["BROKERFL_TLS_KEY"])
    return context


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")  # offering the old versions is the point
def test_the_tls_listener_speaks_tls_1_2_and_1_3_only(tls_node):
    config, done, _ = tls_node
    env = done.env(client_user(config.run, "1"))  # the participant-made key
    port = urlsplit(env["BROKERFL_AMQP_URL"]).port
    assert _handshake(port, _client_context(env, newest=ssl.TLSVersion.TLSv1_3)) == "TLSv1.3"
    assert _handshake(port, _client_context(env, newest=ssl.TLSVersion.TLSv1_2)) == "TLSv1.2"
    for newest in (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1):
        with pytest.raises(ssl.SSLError, match="(?i)protocol.version"):  # the node's alert: no version in common
            _handshake(port, _client_context(env, newest=newest, oldest=ssl.TLSVersion.TLSv1))


def test_password_login_is_refused_on_the_tls_listener(tls_node):
    """Provisioned with TLS (password login off by default): a participant's valid password,
    over a valid TLS connection with its certificate, does not log in; its certificate does."""
    config, done, _ = tls_node
    user = client_user(config.run, "0")
    assert not done.password_login and "PLAIN" not in done.rabbitmq_conf.read_text()
    env = done.env(user)
    password = next(p.password for p in done.participants if p.user == user)
    parts = urlsplit(env["BROKERFL_AMQP_URL"])
    with_password = f"amqps://{user}:{password}@{parts.hostname}:{parts.port}{parts.path}"
    tls = TlsOptions(env["BROKERFL_TLS_CA"], env["BROKERFL_TLS_CERT"], env["BROKERFL_TLS_KEY"])
    with pytest.raises(TransportError, match="(?i)PLAIN|auth"):
        AmqpTransport(with_password, tls=tls, max_reconnect_s=1)
    with AmqpTransport(env["BROKERFL_AMQP_URL"], tls=tls, max_reconnect_s=1) as transport:  # the certificate
        assert transport.user == user


# ---------------------------------------------------------------- the management API


def _management_node_settings(amqp_url: str) -> tuple[str, int, int]:
    """Node name, AMQP port and HTTP port for the management test's own node:
    BROKERFL_MANAGEMENT_NODE / _PORT / _HTTP_PORT, else derived from the test broker's
    (``h9@localhost`` on 5685 -> ``h9mgmt@localhost`` on 5985, HTTP on 15985)."""
    base = (os.environ.get("BROKERFL_RABBITMQ_NODE") or "rabbit@localhost").split("@")[0]
    name = os.environ.get("BROKERFL_MANAGEMENT_NODE") or f"{base}mgmt@localhost"
    port = int(os.environ.get("BROKERFL_MANAGEMENT_PORT") or (urlsplit(amqp_url).port or 5672) + 300)
    http = int(os.environ.get("BROKERFL_MANAGEMENT_HTTP_PORT") or port + 10000)
    return name, port, http


def _api(
    http_port: int, user: str, password: str, method: str, path: str, body: dict | None = None
) -> tuple[int, object]:
    """One management API call: (HTTP status, decoded JSON body or None)."""
    import base64
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/api{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
    )
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read()
    return status, json.loads(text) if text else None


@pytest.mark.timeout(240)
def test_the_run_admin_cannot_reach_users_or_other_vhosts_through_the_management_api(amqp_url):
    """Two runs provisioned on a node with the management plugin: run A's admin (tag
    ``management``) sees and manages its own vhost's queues there, and is refused listing
    users, creating one, granting itself rights on run B's vhost, touching B's queues or
    exchange, changing its own run's policies, or reading the definitions. The broker
    administrator (docs/how-to/provisioning.md), a user apart, can do all of that."""
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        _skip_or_fail(
            "starting a RabbitMQ node needs rabbitmq-server and root (to hand the node directory to the rabbitmq user)"
        )
    node, port, http = _management_node_settings(amqp_url)
    base = Path(tempfile.mkdtemp(prefix="brokerfl-mgmt-"))
    (base / "rabbitmq.conf").write_text(f"management.tcp.port = {http}\nloopback_users = none\n")
    (base / "enabled_plugins").write_text("[rabbitmq_management].\n")
    runs = {
        name: provision(secure_config(name, clients=2), base / name, port=port)
        for name in ("m" + uuid.uuid4().hex[:8], "m" + uuid.uuid4().hex[:8])
    }
    a, b = list(runs)
    password = {p.user: p.password for done in runs.values() for p in done.participants}
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=True)
    base.chmod(0o755)
    env = node_env(node, port, base)
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True, timeout=60)
    try:
        ctl = ["rabbitmqctl", "-n", node]
        subprocess.run(
            [*ctl, "wait", "--timeout", "90", str(base / "pid")], env=env, check=True, capture_output=True, timeout=120
        )
        for done in runs.values():  # as the broker administrator on the node's host
            subprocess.run(
                [*ctl, "import_definitions", str(done.definitions.resolve())],
                env=env,
                check=True,
                capture_output=True,
                timeout=60,
            )
        root, root_password = "broker-admin", uuid.uuid4().hex
        subprocess.run([*ctl, "add_user", root, root_password], env=env, check=True, capture_output=True, timeout=60)
        subprocess.run(
            [*ctl, "set_user_tags", root, "administrator"], env=env, check=True, capture_output=True, timeout=60
        )
        admin = f"{a}-admin"

        def as_admin(method: str, path: str, body: dict | None = None) -> tuple[int, object]:
            return _api(http, admin, password[admin], method, path, body)

        def logged_in() -> object:
            status, body = as_admin("GET", "/whoami")
            return body if status == 200 else None

        whoami = wait_for(logged_in, 90, "the run admin's login to the management API (the import is asynchronous)")
        assert whoami["tags"] == ["management"]
        # its own vhost: queue counts (brokerfl status) and what its vhost rights allow
        extra = f"brokerfl.{a}.extra"
        assert as_admin("PUT", f"/queues/{a}/{extra}", {"durable": False})[0] in (201, 204)
        status, queues = as_admin("GET", f"/queues/{a}")
        assert status == 200 and extra in {q["name"] for q in queues}
        assert {v["name"] for v in as_admin("GET", "/vhosts")[1]} == {a}
        # nothing broker-wide, nothing of run B's
        refusals = {
            "list users (and their hashes)": ("GET", "/users", None),
            "read another user": ("GET", f"/users/{b}-admin", None),
            "create an administrator": ("PUT", "/users/intruder", {"password": "x", "tags": "administrator"}),
            "tag itself administrator": ("PUT", f"/users/{admin}", {"password": "x", "tags": "administrator"}),
            "grant itself rights on B's vhost": (
                "PUT",
                f"/permissions/{b}/{admin}",
                {"configure": ".*", "write": ".*", "read": ".*"},
            ),
            "list permissions": ("GET", "/permissions", None),
            "read B's queues": ("GET", f"/queues/{b}", None),
            "declare a queue in B's vhost": ("PUT", f"/queues/{b}/stolen", {"durable": False}),
            "delete B's exchange": ("DELETE", f"/exchanges/{b}/brokerfl.{b}", None),
            "delete B's vhost": ("DELETE", f"/vhosts/{b}", None),
            "create a vhost": ("PUT", "/vhosts/intruder", {}),
            "change its run's policies": (
                "PUT",
                f"/policies/{a}/lifted",
                {"pattern": ".*", "definition": {"max-length": 1}},
            ),
            "lift its own limits": ("PUT", f"/user-limits/{admin}/max-connections", {"value": 10000}),
            "read the definitions": ("GET", "/definitions", None),
        }
        for what, (method, path, body) in refusals.items():
            assert as_admin(method, path, body)[0] in (401, 403), f"the run admin could {what}"
        # the broker administrator can do what the run admin could not, and nothing it tried happened
        status, users = _api(http, root, root_password, "GET", "/users")
        assert status == 200 and {u["name"] for u in users} >= {admin, f"{b}-admin"}
        assert "intruder" not in {u["name"] for u in users}
        assert {u["name"]: u["tags"] for u in users}[admin] == ["management"]
        assert {p["vhost"] for p in _api(http, root, root_password, "GET", f"/users/{admin}/permissions")[1]} == {a}
        assert {e["name"] for e in _api(http, root, root_password, "GET", f"/exchanges/{b}")[1]} >= {f"brokerfl.{b}"}
    finally:
        subprocess.run(["rabbitmqctl", "-n", node, "stop"], check=False, env=env, capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)
