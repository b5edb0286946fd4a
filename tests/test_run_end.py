"""Every message has a fate to the end: what reaches a run after its last version (updates
of clients still training when an operator aborts, a late or forged update after the
finish) is accounted for without a server running again."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from test_faults import CONFIG, ROOT, federation  # noqa: F401 - a fixture

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.storage.accounting import account
from brokerfl.storage.journal import read_journal
from brokerfl.transports.local import LocalTransport
from brokerfl.transports.topology import SERVER, routing_key
from brokerfl.wire.message import ParameterUpdate, to_wire

pytestmark = pytest.mark.timeout(600)


def _late_update(run: str, client_id: str) -> ParameterUpdate:
    import numpy as np

    return ParameterUpdate(
        run=run,
        sender=f"client.{client_id}",
        client_id=client_id,
        task_id="t-late",
        round=99,
        model_version=98,
        parameters={"w": np.zeros(3, np.float32)},
        num_samples=10,
    )


def test_an_update_published_after_the_run_ended_has_a_category_of_its_own_in_simulate():
    config = load_config(CONFIG, {"run": "late-after-end", "clients": 3, "rounds": 2})
    result = simulate(config, None, progress=False, journal=True)
    transport = LocalTransport(result.broker)
    topology = topology_for(config)
    envelope, body = to_wire(_late_update(config.run, "1"))
    transport.publish(topology.exchange, routing_key(SERVER, ParameterUpdate.TYPE), envelope, body)
    store = result.store
    report = account(read_journal(transport, topology), (store.metadata(v) for v in store.versions()))
    assert report.ok, report.summary()
    assert report.only_after_end == [envelope.message_id]
    assert "published after the run ended: 1, from user guest (claims client.1) (1)" in report.summary()


def _accounting(fed, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "accounting",
            CONFIG,
            "--broker",
            fed.url,
            "--run",
            fed.run,
            "--clients",
            str(fed.clients),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.broker
@pytest.mark.slow
def test_accounting_passes_right_after_an_abort_with_clients_still_training(federation, tmp_path):  # noqa: F811
    slow = tmp_path / "slow.yaml"
    # every client sleeps 30x its training after it, before its update goes out: the abort
    # lands while they train, and their updates come after the server has gone
    slow.write_text(
        (ROOT / CONFIG).read_text() + "client_slowdown: {" + ", ".join(f'"{i}": 30' for i in range(3)) + "}\n"
    )
    fed = federation(clients=3, rounds=20, config=str(slow))
    fed.start()
    fed.wait_for_versions(2, timeout=180)
    abort = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "admin",
            "abort",
            "--run",
            fed.run,
            "--broker",
            fed.url,
            "--reason",
            "test",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert abort.returncode == 0, abort.stdout + abort.stderr
    fed.server.wait(timeout=120)
    right_after = _accounting(fed)
    assert right_after.returncode == 0, right_after.stdout + right_after.stderr
    for proc in fed.client_procs.values():
        proc.wait(timeout=180)
    later = _accounting(fed)  # the clients' last updates are in by now: still accounted for
    assert later.returncode == 0, later.stdout + later.stderr
    assert "unaccounted for: 0" in later.stdout


@pytest.mark.broker
def test_accounting_passes_after_a_finish_with_an_update_published_late(federation, amqp_url):  # noqa: F811
    from brokerfl.transports.amqp import AmqpTransport

    fed = federation(clients=3, rounds=3)
    fed.start()
    fed.finish()
    topology = topology_for(load_config(CONFIG, {"run": fed.run}))
    late = _late_update(fed.run, "2")
    envelope, body = to_wire(late)
    with AmqpTransport(amqp_url) as transport:
        transport.publish(topology.exchange, routing_key(SERVER, ParameterUpdate.TYPE), envelope, body)
    deadline = time.monotonic() + 60
    while True:  # the journal is a stream: the late update is readable a moment after its confirm
        done = _accounting(fed)
        if "published after the run ended: 1" in done.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "published after the run ended: 1, from user guest (claims client.2) (1)" in done.stdout, done.stdout


def test_a_server_step_that_raises_finishes_the_run_as_failed_instead_of_waiting_for_ever(monkeypatch):
    """Closing a round is the handler of a local timer: nothing can dead-letter it, so its
    failure ends the run with the reason (before, the round stayed open for good)."""
    from brokerfl.assembly.simulate import SimulationError
    from brokerfl.handlers.strategies.fedavg import FedAvg

    finish_round = FedAvg.finish_round
    closed = []

    def failing_second_close(self, global_parameters):
        closed.append(1)
        if len(closed) == 2:
            raise ArithmeticError("the aggregate went wrong")
        return finish_round(self, global_parameters)

    monkeypatch.setattr(FedAvg, "finish_round", failing_second_close)
    config = load_config(CONFIG, {"run": "server-step-raises", "clients": 3, "rounds": 4})
    with pytest.raises(
        SimulationError,
        match=r"could not go on: handler .*round_complete raised ArithmeticError: the aggregate went wrong",
    ):
        simulate(config, None, progress=False)
    assert len(closed) == 2  # no round after the failing one
