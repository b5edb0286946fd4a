"""``brokerfl logs``: any process's log, read from the run's logs stream (with the run's
admin credentials where identity is enforced)."""

from __future__ import annotations

import argparse
import json
import sys

from brokerfl.cli.common import add_broker_arguments, add_config_arguments, connect, load_run_config
from brokerfl.wire.names import check_name


def cmd_logs(args: argparse.Namespace) -> int:
    from brokerfl.assembly.roles import topology_for
    from brokerfl.ops.remote_logs import Skipped, parse_since, read_log_batches, records, render, wanted

    config = load_run_config(args)
    try:
        since = parse_since(args.since) if args.since else None
        client = check_name("client id", args.client) if args.client is not None else None
    except ValueError as exc:
        print(f"brokerfl logs: {exc}", file=sys.stderr)
        return 2
    skipped = Skipped()
    shown = 0
    try:
        with connect(args, config=config) as transport:
            batches = read_log_batches(transport, topology_for(config), follow=args.follow)
            for record in records(batches, config.run, enforce_identity=config.identity.enforce, skipped=skipped):
                if not wanted(record, client=client, server=args.server, since=since):
                    continue
                shown += 1
                print(json.dumps(record, default=str) if args.json else render(record), flush=args.follow)
    except KeyboardInterrupt:  # --follow ends so
        pass
    if skipped.counts:
        print(f"brokerfl logs: skipped {skipped.summary()}", file=sys.stderr)
    if not shown and not args.follow:
        print(f"brokerfl logs: no matching log records of run {config.run}", file=sys.stderr)
    return 0


def add_command(commands: argparse._SubParsersAction) -> None:
    logs = commands.add_parser(
        "logs",
        help="any process's log, from the run's logs stream on the broker (the run's admin credentials)",
        description=(
            "Print the log records the run's processes published to the broker (the logs stream: bounded by size and "
            "age), oldest first, as the console shows them. Who wrote a record is the routing key it came under, "
            "checked against the publishing broker user where identity is enforced."
        ),
    )
    add_config_arguments(logs)
    add_broker_arguments(logs)
    logs.add_argument("--client", metavar="ID", help="only this client's records (its process's too)")
    logs.add_argument("--server", action="store_true", help="only the server's records")
    logs.add_argument("--follow", "-f", action="store_true", help="go on printing new records until Ctrl-C")
    logs.add_argument("--since", help="only records from then on: a duration ago (30s, 10m, 2h, 1d) or an ISO time")
    logs.add_argument("--json", action="store_true", help="JSON lines (one record each) instead of text")
    logs.set_defaults(func=cmd_logs)
