"""What the ``brokerfl`` commands share: options from the environment, the run config's
and the broker's arguments, loading the config, connecting to the broker."""

from __future__ import annotations

import argparse
import os
from typing import Any

from brokerfl.config import RunConfig, load_config
from brokerfl.wire.names import check_name


def env(name: str) -> str | None:
    """Every option can also come from BROKERFL_<NAME> (containers are configured so)."""
    return os.environ.get(f"BROKERFL_{name}") or None


def env_flag(name: str) -> bool | None:
    """A flag's default from BROKERFL_<NAME>: True for 1/true/yes, else None (the config decides)."""
    return True if (env(name) or "").strip().lower() in ("1", "true", "yes") else None


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=env("CONFIG"),
        help=(
            "YAML run config (default: $BROKERFL_CONFIG, else the embedded default run: digits, 10 IID clients, FedAvg)"
        ),
    )
    parser.add_argument(
        "--clients", type=int, default=env("CLIENTS"), help="federation size = number of data partitions"
    )
    parser.add_argument("--rounds", type=int, default=env("ROUNDS"), help="number of rounds")
    parser.add_argument(
        "--seed", type=int, default=env("SEED"), help="seed for data split, sampling, initialisation and training"
    )
    parser.add_argument("--run", default=env("RUN"), help="run name (the broker namespace)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines written to stderr (JSON lines, or text on a terminal)",
    )
    parser.add_argument(
        "--enforce-identity",
        action="store_const",
        const=True,
        default=env_flag("ENFORCE_IDENTITY"),
        help="check every message's publisher against the run's users (identity.enforce; $BROKERFL_ENFORCE_IDENTITY=1)",
    )
    parser.add_argument(
        "--replicated-queues",
        action="store_const",
        const=True,
        default=env_flag("REPLICATED_QUEUES"),
        help=(
            "every queue of the run a quorum queue, replicated on a RabbitMQ cluster (replicated_queues; "
            "$BROKERFL_REPLICATED_QUEUES=1)"
        ),
    )


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--broker",
        help=(
            "AMQP URL, amqp:// or amqps:// (default: $BROKERFL_AMQP_URL); amqps:// without a user and with --tls-cert "
            "logs in by certificate; "
            "the nodes of a RabbitMQ cluster as comma-separated URLs (tried in order, failed over on connection loss)"
        ),
    )
    parser.add_argument(
        "--tls-ca",
        default=env("TLS_CA"),
        help="CA certificate (PEM) that signed the broker's (default: $BROKERFL_TLS_CA, else the system's CAs)",
    )
    parser.add_argument(
        "--tls-cert", default=env("TLS_CERT"), help="this participant's certificate (PEM) (default: $BROKERFL_TLS_CERT)"
    )
    parser.add_argument("--tls-key", default=env("TLS_KEY"), help="its private key (PEM) (default: $BROKERFL_TLS_KEY)")
    parser.add_argument(
        "--max-reconnect-s",
        type=float,
        default=env("MAX_RECONNECT_S") or 60.0,
        help=(
            "how long to keep trying to reach the broker, after a lost connection and (server, client) at start "
            "(default 60; $BROKERFL_MAX_RECONNECT_S)"
        ),
    )


def load_run_config(args: argparse.Namespace) -> RunConfig:
    # argparse applies `type` to string defaults too, so env values arrive as ints here
    overrides: dict[str, Any] = {
        "clients": args.clients,
        "rounds": args.rounds,
        "seed": args.seed,
        "run": args.run,
        "identity.enforce": getattr(args, "enforce_identity", None),
        "replicated_queues": getattr(args, "replicated_queues", None),
    }
    return load_config(args.config, overrides)


def broker_url(args: argparse.Namespace) -> str:
    url = args.broker or env("AMQP_URL")
    if not url:
        raise SystemExit("brokerfl: no broker: pass --broker URL or set BROKERFL_AMQP_URL")
    return url


def connect(
    args: argparse.Namespace, *, side: bool = False, retry_start: bool = False, config: RunConfig | None = None
):
    """``side``: a connection used now and then between long idle spells (the models
    stream's): without heartbeats, which only a connection that is polled sends, so the
    broker does not close it while idle (a dead one is reopened on its next use).
    ``retry_start``: a long-running process (server, client) keeps trying to reach a broker
    that is not up yet, as after a lost connection (``--max-reconnect-s``); the one-shot
    commands fail at once. ``config``: the run's, whose models set how large a chunked
    message may be reassembled (``max_message_mib``)."""
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.amqp.connect import TlsOptions

    return AmqpTransport(
        broker_url(args),
        tls=TlsOptions(args.tls_ca, args.tls_cert, args.tls_key),
        max_reconnect_s=float(getattr(args, "max_reconnect_s", 60.0)),
        retry_start=retry_start,
        **({"heartbeat": 0} if side else {}),
        **_reassembly(config),
    )


def _reassembly(config: RunConfig | None) -> dict[str, int]:
    if config is None:
        return {}
    per_sender, total = config.reassembly_bounds()
    return {"max_partial_bytes_per_sender": per_sender, "max_partial_bytes": total}


def parse_client_ids(text: str) -> list[str]:
    """``3``, ``0-9`` or ``0-3,7,9``."""
    ids: list[str] = []
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if dash and low.isdigit() and high.isdigit():
            if int(high) < int(low):
                raise argparse.ArgumentTypeError(f"empty client id range {part!r}")
            ids.extend(str(i) for i in range(int(low), int(high) + 1))
        else:
            ids.append(check_name("client id", part.strip()))
    return ids
