"""`brokerfl delete-run`: what a run keeps on the broker goes, and not while it is consumed."""

from __future__ import annotations

import pytest

from brokerfl.cli import main
from brokerfl.transports.base import TransportError
from brokerfl.transports.topology import RunTopology

pytestmark = pytest.mark.broker


def _present(transport, queue: str) -> bool:
    try:
        transport.queue_info(queue)
        return True
    except TransportError:
        return False


@pytest.mark.timeout(120)
def test_delete_run_refuses_a_consumed_run_then_deletes_everything_it_keeps(amqp_url, amqp_factory, run_name, capsys):
    transport = amqp_factory()
    topology = RunTopology(run_name)
    topology.declare(transport)
    for client_id in ("0", "1"):
        topology.declare_client(transport, client_id)
    queues = [spec.name for spec in topology.queues()] + [topology.client_queue("0"), topology.client_queue("1")]
    assert all(_present(transport, q) for q in queues)
    command = ["delete-run", "--broker", amqp_url, "--run", run_name, "--clients", "2"]

    tag = transport.consume(topology.client_queue("1"), lambda delivery: None)
    assert main(command) == 1
    assert f"run {run_name} is still consumed (brokerfl.{run_name}.client.1)" in capsys.readouterr().err
    assert all(_present(transport, q) for q in queues)  # nothing deleted

    transport.cancel(tag)
    assert main(command) == 0
    assert f"deleted run {run_name}" in capsys.readouterr().out
    assert not any(_present(transport, q) for q in queues)
    assert main(command) == 0  # again: nothing left to delete is no error
