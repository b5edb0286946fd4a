"""Shared fixtures: a RabbitMQ to test against, transports of both kinds, run names.

The broker is ``BROKERFL_AMQP_URL`` if set, else a testcontainers RabbitMQ where Docker
works, else the tests that need it are skipped (failed with ``BROKERFL_REQUIRE_BROKER=1``).
Tests that use a broker carry the ``broker`` marker: ``pytest -m broker`` / ``-m "not broker"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from brokerfl.transports.base import Transport
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import RunTopology

RABBITMQ_IMAGE = os.environ.get("BROKERFL_RABBITMQ_IMAGE", "rabbitmq:4")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "broker: needs a RabbitMQ broker (BROKERFL_AMQP_URL or Docker)")


SYSTEM_MARKERS = ("broker", "slow", "cluster", "container")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Three groups: ``unit`` (no broker, seconds: the fast loop, ``pytest -m unit``),
    ``broker`` (talks to RabbitMQ), and ``slow`` (federations of processes, fault scenarios,
    clusters, containers). ``unit`` is what carries none of the others."""
    for item in items:
        if not any(item.get_closest_marker(name) for name in SYSTEM_MARKERS):
            item.add_marker(pytest.mark.unit)


class _Broker:
    def __init__(self, url: str, container: Any = None) -> None:
        self.url = url
        self.container = container

    def _ctl_prefix(self) -> list[str]:
        # BROKERFL_RABBITMQ_NODE names a node other than the machine's default (e.g. a private
        # node started for one developer's test runs, so restarts do not disturb others).
        node = os.environ.get("BROKERFL_RABBITMQ_NODE")
        return ["rabbitmqctl", "-n", node] if node else ["rabbitmqctl"]

    def rabbitmqctl(self, *args: str) -> None:
        """Run rabbitmqctl against this broker (in its container, or locally)."""
        if self.container is not None:
            code, output = self.container.exec(["rabbitmqctl", *args])
            if code != 0:
                raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {output!r}")
            return
        subprocess.run([*self._ctl_prefix(), *args], check=True, capture_output=True, timeout=120)

    def _node_listens_on_url_port(self) -> str | None:
        """None if the node rabbitmqctl talks to serves AMQP on the URL's port, else why not:
        a test that restarts "the broker" must not restart another one (the machine's
        default node while BROKERFL_AMQP_URL names a private node on another port)."""
        port = urlsplit(self.url).port or 5672
        done = subprocess.run(
            [*self._ctl_prefix(), "status", "--formatter", "json"], capture_output=True, text=True, timeout=120
        )
        try:
            listeners = json.loads(done.stdout)["listeners"]
        except (ValueError, KeyError, TypeError):
            return f"{' '.join(self._ctl_prefix())} status did not answer ({done.stderr.strip()[:200]})"
        ports = sorted({int(item["port"]) for item in listeners if item.get("protocol") in ("amqp", "amqp/ssl")})
        if port not in ports:
            return (
                f"the node {' '.join(self._ctl_prefix()[1:]) or '(default)'} serves AMQP on {ports}, not on the URL's "
                f"port {port}: set BROKERFL_RABBITMQ_NODE"
            )
        return None

    def can_restart(self) -> str | None:
        """None if tests may restart this broker, else why not."""
        if self.container is not None:
            return None
        if shutil.which("rabbitmqctl") is None:
            return "rabbitmqctl is not installed"
        if urlsplit(self.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            return f"the broker at {urlsplit(self.url).hostname} is not local"
        return self._node_listens_on_url_port()


@pytest.fixture(scope="session")
def broker() -> Iterator[_Broker]:
    url = os.environ.get("BROKERFL_AMQP_URL")
    if url:
        yield _Broker(url)
        return
    try:
        with warnings.catch_warnings():  # testcontainers' own deprecations
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                from testcontainers.community.rabbitmq import RabbitMqContainer
            except ImportError:
                from testcontainers.rabbitmq import RabbitMqContainer
        container = RabbitMqContainer(RABBITMQ_IMAGE)
        container.start()
    except Exception as exc:  # no Docker, no image, no testcontainers
        reason = (
            f"no RabbitMQ: set BROKERFL_AMQP_URL, or make Docker available for testcontainers ({type(exc).__name__}: "
            f"{str(exc)[:200]})"
        )
        if os.environ.get("BROKERFL_REQUIRE_BROKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    params = container.get_connection_params()
    try:
        yield _Broker(f"amqp://{container.username}:{container.password}@{params.host}:{params.port}/", container)
    finally:
        container.stop()


@pytest.fixture(scope="session")
def amqp_url(broker: _Broker) -> str:
    return broker.url


class TransportFactory:
    """Makes connections of one kind; ``factory(chunk_size=...)`` passes AMQP options (the
    local transport has no options and ignores them)."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.local_broker = LocalBroker()
        self.made: list[Transport] = []

    def __call__(self, **amqp_options: Any) -> Transport:
        if self.kind == "local":
            transport: Transport = LocalTransport(self.local_broker)
        else:
            from brokerfl.transports.amqp import AmqpTransport

            transport = AmqpTransport(self.url, **amqp_options)
        self.made.append(transport)
        return transport

    def close_all(self) -> None:
        queues: set[str] = set()
        exchanges: set[str] = set()
        for transport in self.made:
            if hasattr(transport, "declared"):
                q, x = transport.declared()
                queues.update(q)
                exchanges.update(x)
            transport.close()
        if self.kind == "amqp" and (queues or exchanges):
            # leave nothing behind on the broker
            from brokerfl.transports.amqp import AmqpTransport

            with AmqpTransport(self.url) as cleaner:
                for name in sorted(queues):
                    cleaner.delete_queue(name)
                for name in sorted(exchanges):
                    cleaner.delete_exchange(name)


@pytest.fixture(params=["local", pytest.param("amqp", marks=pytest.mark.broker)])
def transport_factory(request: pytest.FixtureRequest) -> Iterator[TransportFactory]:
    url = request.getfixturevalue("amqp_url") if request.param == "amqp" else None
    factory = TransportFactory(request.param, url)
    yield factory
    factory.close_all()


@pytest.fixture
def amqp_factory(amqp_url: str) -> Iterator[TransportFactory]:
    """AMQP connections only (for AMQP-specific tests); what they declare is deleted."""
    factory = TransportFactory("amqp", amqp_url)
    yield factory
    factory.close_all()


@pytest.fixture
def run_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh run name; its RunTopology is deleted afterwards (on the broker, if the test
    uses one)."""
    # Resolve the broker now, so this fixture is torn down before the transports are.
    url = None
    if "transport_factory" in request.fixturenames:
        factory = request.getfixturevalue("transport_factory")
        url = factory.url if factory.kind == "amqp" else None
    elif "amqp_url" in request.fixturenames:
        url = request.getfixturevalue("amqp_url")
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    if url is not None:
        from brokerfl.transports.amqp import AmqpTransport

        with AmqpTransport(url) as cleaner:
            RunTopology(name).delete(cleaner)


@pytest.fixture
def restart_broker(broker: _Broker) -> Callable[[], None]:
    """``restart_broker()`` stops and starts the RabbitMQ application (connections drop,
    durable queues and persistent messages stay)."""
    why_not = broker.can_restart()
    if why_not:
        pytest.skip(f"cannot restart the broker: {why_not}")

    def restart() -> None:
        broker.rabbitmqctl("stop_app")
        broker.rabbitmqctl("start_app")

    return restart


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """Tests that run the CLI configure logging (level filters included); put structlog
    back so that tests capturing logs do not depend on the order they run in."""
    yield
    import structlog

    from brokerfl.runtime.log import install_buffer

    structlog.reset_defaults()
    install_buffer(None)  # a command run in-process may have left its log's copy for the broker


@pytest.fixture
def provision_on_broker(broker: _Broker, amqp_url: str, tmp_path) -> Iterator[Callable[..., Any]]:
    """``provision_on_broker(config)`` provisions a run (``brokerfl.ops.provision``) for the test
    broker, imports its definitions with rabbitmqctl, waits until every user can log in and
    returns the :class:`~brokerfl.ops.provision.Provisioned`; the vhost and users are deleted after."""
    import tempfile
    import time

    from brokerfl.ops.provision import provision
    from brokerfl.transports.amqp import AmqpTransport

    why_not = broker.can_restart()  # the same condition: a local rabbitmqctl
    if why_not:
        pytest.skip(f"needs rabbitmqctl for the test broker: {why_not}")
    made = []

    def provision_run(config, **options):
        parts = urlsplit(amqp_url)
        done = provision(
            config, tmp_path / f"provision-{config.run}", host=parts.hostname, port=parts.port or 5672, **options
        )
        made.append(done)
        # rabbitmqctl runs as the rabbitmq user, which cannot read pytest's tmp_path (and
        # 3.10's import_definitions does not take "-" for stdin): a readable copy
        fd, readable = tempfile.mkstemp(prefix="brokerfl-definitions-", suffix=".json")
        os.write(fd, done.definitions.read_bytes())
        os.close(fd)
        os.chmod(readable, 0o644)
        try:
            broker.rabbitmqctl("import_definitions", readable)
        finally:
            os.unlink(readable)
        for p in done.participants:  # the import is asynchronous
            deadline = time.monotonic() + 60
            while True:
                try:
                    AmqpTransport(done.env(p.user)["BROKERFL_AMQP_URL"], max_reconnect_s=1).close()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # polling the broker under a deadline
        return done

    yield provision_run
    for done in made:  # one rabbitmqctl call (each starts an Erlang VM: seconds on a busy machine)
        users = ", ".join(f'<<"{p.user}">>' for p in done.participants)
        broker.rabbitmqctl(
            "eval",
            f'rabbit_vhost:delete(<<"{done.vhost}">>, <<"brokerfl-tests">>), '
            f'[catch rabbit_auth_backend_internal:delete_user(U, <<"brokerfl-tests">>) || U <- [{users}]], ok.',
        )
