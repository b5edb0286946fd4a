"""One active server per run: the server role is a lease the broker gives one connection at
a time. A second server waits as a hot standby (its log and the active server's status say
so) and takes over when the active one dies; a server whose connection was lost while
another took the role stops instead of acting beside it."""

from __future__ import annotations

import threading
import time

import pytest
from test_faults import CONFIG, ROOT, check, fault_free_accuracy, federation  # noqa: F401 - a fixture

from brokerfl.assembly.roles import topology_for
from brokerfl.config import load_config
from brokerfl.runtime.operator_commands import StatusRequest, ask
from brokerfl.transports.base import LeaseLost


def test_a_lease_is_held_by_one_connection_at_a_time(transport_factory, run_name):
    lease = topology_for(load_config(CONFIG, {"run": run_name})).server_lease
    first, second = transport_factory(), transport_factory()
    assert first.hold_lease(lease)
    assert not second.hold_lease(lease)
    assert first.hold_lease(lease)  # holding it already
    first.close()
    deadline = time.monotonic() + 30
    while not second.hold_lease(lease):  # the broker releases it as the connection goes
        assert time.monotonic() < deadline, "the lease was not released when its connection closed"
        time.sleep(0.05)


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_a_connection_that_finds_its_lease_taken_after_a_reconnect_stops_consuming(amqp_factory, run_name):
    """The zombie case: the active server's connection is lost, a standby takes the role,
    then the old one reconnects. It must not consume the role's queue again."""
    import socket

    queue = f"brokerfl.{run_name}.role-queue"
    lease = f"brokerfl.{run_name}.role-lease"
    old, new = amqp_factory(), amqp_factory()
    old.declare_queue(queue, kind="quorum")
    got: list[str] = []
    old.consume(queue, lambda d: got.append(d.envelope.message_id))
    assert old.hold_lease(lease)
    old._connection.conn._impl._transport._sock.shutdown(socket.SHUT_RDWR)  # the connection is cut under it
    deadline = time.monotonic() + 30
    while not new.hold_lease(lease):
        assert time.monotonic() < deadline, "the cut connection's lease was not released"
        time.sleep(0.05)
    with pytest.raises(LeaseLost):
        old.poll(0.5)  # it reconnects, and finds the role taken
    assert new.queue_info(queue).consumers == 0
    old.poll(0.2)  # no error again: it simply holds nothing now
    assert not old.hold_lease(lease)
    new.delete_queue(queue)


class StatusWatcher:
    """Asks the run's server for its status every 0.2 s on a thread of its own; records which
    server process answered (None: no answer)."""

    def __init__(self, url: str, run: str) -> None:
        self.url, self.topology = url, topology_for(load_config(CONFIG, {"run": run}))
        self.answers: list[tuple[float, str | None, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        from brokerfl.transports.amqp import AmqpTransport

        with AmqpTransport(self.url) as transport:
            while not self._stop.is_set():
                reply = ask(transport, self.topology, StatusRequest(), timeout=1.0)
                status = reply.status if reply is not None else {}
                self.answers.append((time.monotonic(), status.get("server"), status.get("standbys") or []))
                self._stop.wait(0.2)

    def first(self, what, timeout: float) -> float:
        """When an answer first satisfied ``what(server, standbys)``; waits up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for at, server, standbys in list(self.answers):
                if what(server, standbys):
                    return at
            assert time.monotonic() < deadline, f"no such status answer within {timeout} s: {self.answers[-5:]}"
            time.sleep(0.1)

    def stop(self) -> list[tuple[float, str | None, list[str]]]:
        self._stop.set()
        self._thread.join(timeout=30)
        return self.answers


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_second_server_stands_by_and_takes_over_when_the_active_one_is_killed(
    federation,  # noqa: F811 - the fixture imported above
    run_name,
    tmp_path,
    amqp_url,
):
    slow = tmp_path / "slow.yaml"
    # client 0 sleeps 10x its training, so the run lasts long enough to watch both servers
    slow.write_text((ROOT / CONFIG).read_text() + "client_slowdown: {'0': 10.0}\n")
    fed = federation(clients=4, rounds=10, config=str(slow))
    fed.start()
    fed.wait_for_versions(1, timeout=180)
    active = fed.server
    host_of = lambda proc: f":{proc.pid}"  # noqa: E731 - status names a server host:pid
    watcher = StatusWatcher(amqp_url, run_name)
    standby = fed._spawn("server", *fed.args, "--out", str(tmp_path / "standby-host"))
    standby_log = fed.logs / f"{fed.starts:03d}-server.log"
    try:
        watcher.first(lambda server, standbys: any(s.endswith(host_of(standby)) for s in standbys), timeout=120)
        fed.wait_for_versions(3, timeout=180)
        assert standby.poll() is None, "the standby exited"
        fed.kill(active)
        killed = time.monotonic()
        fed.server, fed.out = standby, tmp_path / "standby-host"
        took_over = watcher.first(
            lambda server, standbys: bool(server) and server.endswith(host_of(standby)), timeout=120
        )
        print(f"takeover: the standby answered status {took_over - killed:.2f} s after the active server was killed")
        fed.finish()
    finally:
        answers = watcher.stop()
    servers = [server for _, server, _ in answers if server]
    changes = [s for i, s in enumerate(servers) if i == 0 or s != servers[i - 1]]
    assert [c.rsplit(":", 1)[1] for c in changes] == [str(active.pid), str(standby.pid)], (
        changes
    )  # never two, never back
    assert "another server holds this run's server role" in standby_log.read_text()
    assert "this server is now the active one" in standby_log.read_text()
    check(fed, expect_accuracy=fault_free_accuracy(run_name, 4, 10))
