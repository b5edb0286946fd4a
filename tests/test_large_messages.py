"""How large a chunked message a process over RabbitMQ reassembles follows the run's config
(``max_message_mib``, ``max_reassembly_mib``), so a model of any size can be sent."""

from __future__ import annotations

import argparse
import time

import pytest
from test_transport import envelope

from brokerfl.cli.common import connect
from brokerfl.config import RunConfig
from brokerfl.transports.base import Delivery

MiB = 1024**2


def test_the_bounds_follow_the_model_size_and_the_clients_a_round_samples():
    assert RunConfig().reassembly_bounds() == (256 * MiB, 11 * 256 * MiB)  # 10 clients sampled, and one more
    small = RunConfig.model_validate({"clients": 2})
    assert small.reassembly_bounds() == (256 * MiB, 768 * MiB)
    large = RunConfig.model_validate({"max_message_mib": 1024, "strategy": {"name": "fedavg", "clients_per_round": 3}})
    assert large.reassembly_bounds() == (1024 * MiB, 4 * 1024 * MiB)
    fixed = RunConfig.model_validate({"max_message_mib": 64, "max_reassembly_mib": 100})
    assert fixed.reassembly_bounds() == (64 * MiB, 100 * MiB)
    assert RunConfig.model_validate({"clients": 1, "max_message_mib": 8}).reassembly_bounds()[1] == 512 * MiB


def _args(url: str) -> argparse.Namespace:
    return argparse.Namespace(broker=url, tls_ca=None, tls_cert=None, tls_key=None, max_reconnect_s=5.0)


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_a_message_over_the_runs_bound_is_dead_lettered_and_one_under_it_arrives(amqp_url, amqp_factory, run_name):
    admin = amqp_factory()
    queue, dead = f"brokerfl.{run_name}.large", f"brokerfl.{run_name}.large.dead"
    admin.declare_queue(dead)
    admin.declare_queue(queue, dead_letter_queue=dead)
    body = bytes(20 * MiB)  # two chunks of 16 MiB
    for max_message_mib, arrives in ((16, False), (32, True)):
        config = RunConfig.model_validate({"max_message_mib": max_message_mib})
        transport = connect(_args(amqp_url), config=config)
        amqp_factory.made.append(transport)
        transport.declare_queue(queue, dead_letter_queue=dead)
        sent = envelope(max_message_mib)
        admin.publish("", queue, sent, body)
        got: list[Delivery] = []
        transport.consume(queue, got.append, prefetch=4)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not got and admin.queue_info(dead).messages_ready == 0:
            transport.poll(0.05)
        if arrives:
            assert [d.envelope.message_id for d in got] == [sent.message_id]
            assert len(got[0].body) == len(body)
            transport.ack(got[0])
        else:
            assert not got
            letter = admin.get(dead)
            assert letter is not None and "is more than reassembly holds" in str(letter.envelope.headers), letter
            admin.ack(letter)
            while (rest := admin.get(dead)) is not None:  # the other chunk
                admin.ack(rest)
        transport.close()
