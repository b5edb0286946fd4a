"""Broker URL lists (the nodes of a RabbitMQ cluster): parsing, one identity, failing over.
The kill-a-node test of a real cluster is tests/test_cluster.py."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit, urlunsplit

import pytest

from brokerfl.transports.amqp.connect import broker_urls, cluster_parameters
from brokerfl.transports.base import TransportError


def test_broker_urls_take_a_list_or_commas():
    a, b = "amqp://u:p@node1:5672/", "amqp://u:p@node2:5672/"
    assert broker_urls(a) == [a]
    assert broker_urls(f"{a}, {b}") == [a, b]
    assert broker_urls([a, f"{b},"]) == [a, b]
    with pytest.raises(ValueError, match="no broker URL"):
        broker_urls(" , ")


def test_every_node_url_must_log_in_as_the_same_user():
    params, user = cluster_parameters("amqp://u:p@node1:5672/,amqp://u:p@node2:5673/")
    assert user == "u" and [(p.host, p.port) for p in params] == [("node1", 5672), ("node2", 5673)]
    with pytest.raises(ValueError, match="different users"):
        cluster_parameters("amqp://u:p@node1:5672/,amqp://v:p@node2:5672/")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.broker
def test_a_dead_node_in_the_list_is_passed_over(amqp_url):
    from brokerfl.transports.amqp import AmqpTransport

    parts = urlsplit(amqp_url)
    dead = urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.port}", f":{_closed_port()}")))
    with AmqpTransport([dead, amqp_url]) as transport:
        assert transport._connection.node is not None and transport._connection.node.port == parts.port
        assert "***" in transport.safe_url or not parts.password
    with pytest.raises(TransportError, match="cannot connect"):
        AmqpTransport(dead, connect_timeout=2)
