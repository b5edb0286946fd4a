"""Starting RabbitMQ nodes of a test's own (a cluster, a TLS node): the environment that
puts everything a node writes under one directory, beside the test broker's node."""

from __future__ import annotations

import os
from pathlib import Path


def node_env(node: str, port: int, base: Path, *, tcp_listener: bool = True) -> dict[str, str]:
    """The environment for ``rabbitmq-server``/``rabbitmqctl`` of node ``node``: data, logs,
    config (``base/rabbitmq.conf``), plugins and pid file under ``base``; its distribution
    port ``port + 20000``; AMQP on ``port`` unless ``tcp_listener`` is False (then the
    node's config names its listeners, e.g. TLS only)."""
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_DIST_PORT": str(port + 20000),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(base / "pid"),
    }
    if tcp_listener:
        env["RABBITMQ_NODE_PORT"] = str(port)
    return env
