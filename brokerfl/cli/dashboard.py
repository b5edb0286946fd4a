"""``brokerfl dashboard``: the runs on a broker as a live web page (:mod:`brokerfl.ops.dashboard`)."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any

from brokerfl.cli import common, operate
from brokerfl.config import RunConfig, load_config
from brokerfl.transports.base import Transport

DEFAULT_PORT = 8765


def cmd_dashboard(args: argparse.Namespace) -> int:
    from brokerfl.ops.dashboard import Dashboard, accounting_on_broker, serve

    configs = [_load(path, args) for path in args.configs]
    if not configs and args.run:
        configs = [load_config(None, {"run": args.run})]
    runs = [c.run for c in configs]
    if len(set(runs)) != len(runs):
        print(f"brokerfl dashboard: two configs name the same run ({', '.join(runs)})", file=sys.stderr)
        return 2
    url = common.broker_url(args)

    def connect() -> Transport:
        return common.connect(args)

    dashboard = Dashboard(
        connect,
        configs,
        gather=operate.gather,
        admin_message=operate.admin_message if args.admin else None,
        amqp_url=url,
        interval=args.interval,
        status_timeout=args.timeout,
        accounting=accounting_on_broker(lambda config: common.connect(args, config=config)),
    )
    try:
        server = serve(dashboard, args.addr, args.port)
    except OSError as exc:
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror or exc})"
        print(f"brokerfl dashboard: port {args.port} on {args.addr} {why}: pass another --port", file=sys.stderr)
        return 2
    if args.admin:
        _warn_if_not_admin(configs, url)
    dashboard.start()
    host = f"[{args.addr}]" if ":" in args.addr else args.addr
    print(
        f"brokerfl dashboard: http://{host}:{server.port}/ ({'admin' if args.admin else 'read-only'}; Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        dashboard.stop()
    return 0


def _warn_if_not_admin(configs: list[RunConfig], url: str) -> None:
    """Where a run enforces identity, only its admin user may send commands: say so at
    start rather than on each refused button."""
    from urllib.parse import urlsplit

    from brokerfl.runtime.identity import admin_user

    user = urlsplit(url.split(",")[0]).username or "guest"
    for config in configs:
        if config.identity.enforce and user != admin_user(config.run):
            print(
                f"brokerfl dashboard: run {config.run} enforces identity: its server refuses admin commands from "
                f"{user}; connect as {admin_user(config.run)} to send them",
                file=sys.stderr,
            )


def _load(path: str, args: argparse.Namespace) -> RunConfig:
    overrides: dict[str, Any] = {"run": args.run} if args.run and len(args.configs) == 1 else {}
    return load_config(path, overrides)


def add_commands(commands: Any) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="a live web page of the runs on a broker (round, clients, curves, dead letters, admin)",
        description="Serve a web page that shows the runs on the broker, read from the broker alone: the selected "
        "run's open round, clients, accuracy and loss curves, dead letters with their reasons, admin log and "
        "accounting. Read-only unless --admin: then the page can pause, resume, abort and resize the run with the "
        "--broker credentials (the run's admin user where identity is enforced).",
    )
    dashboard.add_argument(
        "configs",
        nargs="*",
        metavar="CONFIG",
        help="YAML run configs of the runs to show (default: pick from the runs on the broker)",
    )
    dashboard.add_argument("--run", default=common.env("RUN"), help="run name (with one config, or none)")
    dashboard.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    dashboard.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to serve (default {DEFAULT_PORT})")
    dashboard.add_argument(
        "--admin",
        action="store_true",
        help="let the page send admin commands (pause, resume, abort, set-rounds, ...) with the --broker credentials",
    )
    dashboard.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes from the broker")
    dashboard.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a server's status answer")
    dashboard.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines written to stderr",
    )
    common.add_broker_arguments(dashboard)
    dashboard.set_defaults(func=cmd_dashboard)
