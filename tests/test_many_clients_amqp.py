"""Many logical clients over RabbitMQ: a connection's channels are bounded by the broker's
channel_max, and running out of them is a clear error, never a "lost connection"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from brokerfl.transports.amqp import AmqpTransport, ChannelLimitError
from brokerfl.transports.topology import RunTopology

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]


def _limited(url: str, channels: int) -> str:
    return f"{url}{'&' if '?' in url else '?'}channel_max={channels}"


def test_running_out_of_channels_is_a_clear_error_not_a_lost_connection(amqp_url, run_name):
    queue = RunTopology(run_name).server_queue
    with AmqpTransport(_limited(amqp_url, 12)) as transport:
        assert transport.channel_limit() == 12
        transport.declare_queue(queue)
        for _ in range(transport.consumer_capacity()):
            transport.consume(queue, lambda d: None, prefetch=1)
        with pytest.raises(ChannelLimitError, match=r"channel_max\) and each consumer takes one; at most 9 consumers"):
            transport.consume(queue, lambda d: None, prefetch=1)
        assert transport.queue_info(queue).consumers == 9  # the connection is fine and keeps its consumers
        transport.delete_queue(queue)


def test_a_client_process_refuses_more_logical_clients_than_fit(amqp_url, run_name):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "client",
            "--broker",
            _limited(amqp_url, 12),
            "--run",
            run_name,
            "--clients",
            "20",
            "--client-id",
            "0-19",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert (
        "20 logical clients need one channel each, and the broker allows 9 consumers on one connection (channel_max "
        "12): run them in 3 or more processes" in proc.stderr
    )
