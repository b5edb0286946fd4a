"""``brokerfl status``, ``brokerfl runs`` and ``brokerfl admin``: a running federation, as
its server sees it, the runs on a broker (:mod:`brokerfl.ops.runs`), and the operator's
commands to a server (see :mod:`brokerfl.runtime.operator_commands`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from brokerfl.cli import common
from brokerfl.ops.runs import silence_text
from brokerfl.transports.base import Transport, TransportError
from brokerfl.transports.topology import RunTopology

NO_REPLY = 4  # exit code: the server did not answer in time


# ---------------------------------------------------------------- status


def gather(
    transport: Transport, topology: RunTopology, client_ids: list[str], *, timeout: float, amqp_url: str | None
) -> dict[str, Any]:
    """The server's status (None if it did not answer), why not (``absent``: no server of
    the run has started; ``stopped``: none consumes its queue; ``busy``: it did not answer in
    time), the run's registry summary if it did not answer (None where the registry is
    unreadable or does not know the run), and the broker's queue depths."""
    from brokerfl.ops.inspection import management_counts
    from brokerfl.runtime.operator_commands import StatusRequest, ask, client_id_order, server_consumers

    silence = None
    try:
        reply = ask(transport, topology, StatusRequest(), timeout=timeout)
    except TransportError:
        reply, silence = None, "absent"
    status = reply.status if reply is not None else None
    if status is None and silence is None:
        try:
            silence = "busy" if server_consumers(transport, topology) else "stopped"
        except TransportError:
            silence = "absent"
    summary = registry_summary(transport, topology.run) if status is None else None
    ids = sorted({*client_ids, *(c["id"] for c in (status or {}).get("clients", []))}, key=client_id_order)
    counts = management_counts(amqp_url) if amqp_url else None
    queues = {}
    names = {
        "server": topology.server_queue,
        "dead letters": topology.dead_queue,
        **{f"client {c}": topology.client_queue(c) for c in ids},
    }
    if topology.journal:
        names["journal"] = topology.journal_stream
    for label, name in names.items():
        try:
            info = transport.queue_info(name)
        except TransportError:
            continue
        entry = {
            "name": name,
            "ready": info.messages_ready,
            "consumers": info.consumers,
            "unacked": info.messages_unacked,
            "bytes": None,
        }
        if counts and name in counts:
            managed = counts[name]
            entry.update(
                ready=managed["ready"],
                unacked=managed["unacked"],
                consumers=managed["consumers"],
                bytes=managed.get("bytes"),
            )
            if label == "journal" and managed.get("messages") is not None:
                entry["ready"] = managed["messages"]
        queues[label] = entry
    return {
        "run_name": topology.run,
        "server": status,
        "silence": silence,
        "run": summary,
        "queues": queues,
        "journal_max_bytes": topology.journal_max_bytes if topology.journal else None,
        "journal_max_age": topology.journal_max_age,
    }


def registry_summary(transport: Transport, run: str) -> dict[str, Any] | None:
    """The run's summary from the broker's run registry, or None (no registry, no record of
    the run, or no right to read it: only a run's admin may)."""
    from brokerfl.ops.runs import run_summary

    try:
        summary = run_summary(transport, run)
    except TransportError:
        return None
    return None if summary is None else summary.as_dict()


def deadline_text(status: dict[str, Any]) -> str:
    """The open round's deadline and the time left, if the server says them."""
    left, deadline = status.get("round_time_left_s"), status.get("round_deadline")
    if left is None or deadline is None:
        return ""
    clock = time.strftime("%H:%M:%S", time.localtime(deadline))
    return f", deadline {clock} ({left:.1f} s left)" if left >= 0 else f", deadline {clock} ({-left:.1f} s past)"


def metrics_lines(status: dict[str, Any]) -> list[str]:
    """The app's metrics a status holds, one line per kind (the newest version's, the
    newest federated evaluation's), the target metric first."""
    target = (status.get("target") or {}).get("name")
    lines = []
    for key, label in (
        ("metrics", f"metrics of model version {status.get('metrics_version')}"),
        ("federated_metrics", "federated evaluation"),
    ):
        metrics = status.get(key) or {}
        if not metrics:
            continue
        names = sorted(metrics, key=lambda name: (name != target, name.startswith("train_"), name))
        shown = ", ".join(
            f"{name} {'-' if metrics[name] is None else format(metrics[name], '.4g')}"
            + (" (target)" if name == target else "")
            for name in names
        )
        lines.append(f"{label}: {shown}")
    return lines


def render(view: dict[str, Any]):
    """A rich renderable of :func:`gather`'s view."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    status = view["server"]
    parts: list[Any] = []
    if status is None:
        style = "bold" if (view.get("run") or {}).get("state") == "finished" else "bold red"
        parts.append(Text(silence_text(view, view.get("run_name") or "?"), style=style))  # Text: a reason is the wire's
    else:
        state = (
            "finished"
            if status["done"]
            else "paused"
            if status["paused"]
            else "training"
            if status["round_open"]
            else "waiting"
            if not status["begun"]
            else "between rounds"
        )
        acc = "-" if status["accuracy"] is None else f"{status['accuracy']:.4f}"
        loss = "-" if status["loss"] is None else f"{status['loss']:.4f}"
        age = "" if status["round_age_s"] is None else f" for {status['round_age_s']:.1f} s"
        parts.append(
            Text(
                f"run {status['run']} ({status['strategy']}): {state}; round {status['round']} of "
                f"{status['rounds']}{age}{deadline_text(status)}; model version {status['model_version']}; "
                f"accuracy {acc}, loss {loss}",
                style="bold",
            )
        )
        for line in metrics_lines(status):
            parts.append(Text(line))  # Text: no markup from the wire (metric names are the app's)
        standbys = status.get("standbys") or []
        parts.append(
            Text(
                f"active server {status.get('server') or '?'}; standby servers: "
                f"{', '.join(standbys) if standbys else 'none'}"
            )
        )
        live = sum(c["live"] for c in status["clients"])
        parts.append(
            Text(
                f"clients live {live} of {status['clients_expected']} expected, min {status['min_clients']}; "
                f"still training: {', '.join(status['still_training']) or '-'}; held updates {status['held_updates']}; "
                f"dropped {status['dropped_updates']}"
                + (f"; removed: {', '.join(status['removed'])}" if status["removed"] else "")
                + (f"; training failed: {', '.join(status['failed'])}" if status.get("failed") else "")
                + (f"; app failed at start: {', '.join(status['unable'])}" if status.get("unable") else "")
                + (f"; FAILED: {status['failure']}" if status["failure"] else "")
            )
        )
        if secure := status.get("secure_round"):  # a secure round's stage, and who it waits for
            parts.append(
                Text(
                    f"secure aggregation: {secure['stage']}, waiting for {', '.join(secure['waiting']) or '-'}"
                    + (f"; dropped out: {', '.join(secure['dropouts'])}" if secure["dropouts"] else "")
                )
            )
        for c in status["clients"]:
            if c.get("duplicate"):
                parts.append(
                    Text(
                        f"DUPLICATE: client {c['id']} is claimed by two processes: {' and '.join(c['duplicate'])}",
                        style="bold red",
                    )
                )
        clients = Table(title="clients", title_justify="left")
        for column in ("client", "state", "last seen", "samples", "this round"):
            clients.add_column(column)
        for c in status["clients"]:
            state_text = "removed" if c["removed"] else "live" if c["live"] else "silent"
            clients.add_row(
                c["id"],
                state_text + (", duplicate" if c.get("duplicate") else ""),
                f"{c['last_seen_s']:.1f} s ago",
                "?" if c["num_samples"] is None else str(c["num_samples"]),
                _this_round(c, status),
            )
        parts.append(clients)
        failures = status.get("train_failures") or []
        if failures:
            failed = Table(title="training failures (newest last)", title_justify="left")
            for column in ("client", "round", "error"):
                failed.add_column(column)
            for f in failures:
                failed.add_row(
                    Text(str(f["client_id"])), str(f["round"]), Text(str(f["error"]))
                )  # Text: no markup from the wire
            parts.append(failed)
    queues = Table(title="queues", title_justify="left")
    for column in ("queue", "ready", "unacked", "consumers", "bytes"):
        queues.add_column(column, justify="right" if column != "queue" else "left")
    for label, q in view["queues"].items():
        ready = str(q["ready"])
        size = "?" if q["bytes"] is None else f"{q['bytes']:,}"
        if label == "journal" and view["journal_max_bytes"]:
            size += f" of {view['journal_max_bytes']:,}" + (
                f", {view['journal_max_age']}" if view["journal_max_age"] else ""
            )
        queues.add_row(label, ready, "?" if q["unacked"] is None else str(q["unacked"]), str(q["consumers"]), size)
    parts.append(queues)
    return Group(*parts)


def _this_round(client: dict[str, Any], status: dict[str, Any]) -> str:
    """A client's part in the open round: training (for how long, as its heartbeats say),
    failed, its update refused, answered; or training on a task of its own (the asynchronous server's)."""
    seconds = client.get("training_s")
    training = "training" + ("" if seconds is None else f" {seconds:.1f} s")
    if client["id"] in status.get("failed", []):
        return "failed"
    if client["id"] in status.get("refused", []):
        return "update refused"
    if client["id"] in status["still_training"]:
        return training
    if client["id"] in status["participants"]:
        return "answered"
    return training if seconds is not None else ""


def cmd_status(args: argparse.Namespace) -> int:
    from brokerfl.assembly.roles import topology_for

    config = common.load_run_config(args)
    topology = topology_for(config)
    url = common.broker_url(args)
    with common.connect(args) as transport:
        if not args.watch:
            view = gather(transport, topology, config.client_ids(), timeout=args.timeout, amqp_url=url)
            if args.json:
                print(json.dumps(view, indent=2))
            else:
                from rich.console import Console

                Console().print(render(view))
            return 0 if view["server"] is not None else NO_REPLY
        return _watch(transport, topology, config.client_ids(), args, url)


def _watch(
    transport: Transport, topology: RunTopology, client_ids: list[str], args: argparse.Namespace, url: str
) -> int:
    from rich.live import Live

    try:
        with Live(
            render(gather(transport, topology, client_ids, timeout=args.timeout, amqp_url=url)), auto_refresh=False
        ) as live:
            while True:
                started = time.monotonic()
                view = gather(transport, topology, client_ids, timeout=args.timeout, amqp_url=url)
                if args.json:
                    print(json.dumps(view), flush=True)
                else:
                    live.update(render(view), refresh=True)
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0


# ---------------------------------------------------------------- runs


def cmd_runs(args: argparse.Namespace) -> int:
    from brokerfl.ops.runs import list_runs

    with common.connect(args) as transport:
        try:
            runs = list_runs(transport, timeout=args.timeout)
        except TransportError as exc:
            print(f"brokerfl runs: cannot read the broker's run registry: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([r.as_dict() for r in runs], indent=2))
        return 0
    if not runs:
        print("no runs on this broker (its run registry is empty, or every run in it was deleted)")
        return 0
    from rich.console import Console

    Console().print(runs_table(runs))
    return 0


def runs_table(runs: list[Any]):
    """A rich table of :class:`brokerfl.ops.runs.RunSummary` (every wire string as Text: no markup)."""
    from rich.table import Table
    from rich.text import Text

    def when(seconds: float | None) -> str:
        return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))

    table = Table(title=f"runs on this broker ({len(runs)})", title_justify="left")
    for column in ("run", "state", "round", "version", "metric", "started", "finished", "reason"):
        table.add_column(column)
    for r in runs:
        metric = "-" if r.metric_value is None else f"{r.metric_name} {r.metric_value:.4g}"
        table.add_row(
            Text(r.run),
            Text(r.state, style={"crashed": "bold red", "aborted": "red", "finished": "green"}.get(r.state, "")),
            f"{'-' if r.round is None else r.round} of {'-' if r.rounds is None else r.rounds}",
            "-" if r.model_version is None else str(r.model_version),
            Text(metric),
            when(r.started_at),
            when(r.finished_at),
            Text(r.reason or ""),
        )
    return table


# ---------------------------------------------------------------- admin

COMMANDS = {
    "abort": "finish now with the last stored model version; clients get Exit; the server exits 0",
    "pause": "no new round starts (the open one finishes) until resume",
    "resume": "start rounds again",
    "remove-client": "ID: never sample this client again (it gets Exit); --delete-queue also deletes its queue",
    "set-min-clients": "N: fewest updates a round may close with at its deadline",
    "set-rounds": "N: extend or shorten the run",
    "shutdown-clients": "[IDS]: send Exit to these clients (e.g. 3 or 0-2,5), or to all",
}


def admin_message(command: str, values: list[str], args: argparse.Namespace):
    """The AdminCommand for ``brokerfl admin COMMAND VALUES``; ValueError says what is wrong."""
    from brokerfl.runtime import operator_commands as admin

    def one(kind: str) -> str:
        if len(values) != 1:
            raise ValueError(f"{command} takes one {kind}, got {len(values)} values")
        return values[0]

    def number(kind: str) -> int:
        text = one(kind)
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{command}: {kind} must be a positive whole number, got {text!r}")
        return int(text)

    if command in ("pause", "resume", "abort") and values:
        raise ValueError(f"{command} takes no values, got {values}")
    if command == "abort":
        return admin.AbortRun(reason=args.reason or "")
    if command == "pause":
        return admin.PauseRounds()
    if command == "resume":
        return admin.ResumeRounds()
    if command == "remove-client":
        (client_id,) = common.parse_client_ids(one("client id"))
        return admin.RemoveClient(client_id=client_id)
    if command == "set-min-clients":
        return admin.SetMinClients(min_clients=number("N"))
    if command == "set-rounds":
        return admin.SetRounds(rounds=number("N"))
    if command == "shutdown-clients":
        return admin.ShutdownClients(client_ids=[c for value in values for c in common.parse_client_ids(value)])
    raise ValueError(f"unknown admin command {command!r}")  # pragma: no cover - argparse checks choices


def refused_by_config(message: Any, config: Any) -> str | None:
    """What the run's config alone shows wrong with an admin command (client ids outside the
    federation, more min clients than clients), or None; the server checks it all again
    against what it knows (removed clients, the round under way)."""
    from brokerfl.runtime import operator_commands as admin

    ids = (
        [message.client_id]
        if isinstance(message, admin.RemoveClient)
        else list(message.client_ids)
        if isinstance(message, admin.ShutdownClients)
        else []
    )
    outside = [cid for cid in ids if not config.has_client(cid)]
    if outside:
        return (
            f"client{'s' if len(outside) > 1 else ''} {', '.join(outside[:10])} not in the federation of run "
            f"{config.run} (client ids {config.client_ids_text()})"
        )
    if isinstance(message, admin.SetMinClients) and message.min_clients > config.clients:
        return f"min clients {message.min_clients} is more than the {config.clients} clients of run {config.run}"
    return None


def cmd_admin(args: argparse.Namespace) -> int:
    from brokerfl.assembly.roles import topology_for
    from brokerfl.runtime.operator_commands import ask

    config = common.load_run_config(args)
    topology = topology_for(config)
    try:
        message = admin_message(args.admin_command, args.values, args)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        print(f"brokerfl admin: {exc}", file=sys.stderr)
        return 2
    refusal = (
        refused_by_config(message, config) if args.config else None
    )  # without one, the default run's size says nothing
    if refusal is not None:
        print(f"REFUSED (not sent): {refusal}")
        return 1
    with common.connect(args) as transport:
        reply = ask(transport, topology, message, timeout=args.timeout)
        if reply is None:
            print(
                f"brokerfl admin: no reply from the server of run {config.run} within {args.timeout:g} s (not running, "
                "or busy): the command expired unapplied, unless the server took it at the last moment (see brokerfl "
                "status)",
                file=sys.stderr,
            )
            return NO_REPLY
        print(f"{'OK' if reply.ok else 'REFUSED'}: {reply.text}")
        if reply.ok and args.admin_command == "remove-client" and args.delete_queue:
            transport.delete_queue(topology.client_queue(message.client_id))
            print(f"deleted queue {topology.client_queue(message.client_id)}")
    return 0 if reply.ok else 1


def cmd_delete_run(args: argparse.Namespace) -> int:
    """Everything a run keeps on the broker: its exchange, queues and streams (the model
    versions and the journal with them). Refused while a process still consumes one of its
    queues, unless ``--force``: a running server or client would only declare them again."""
    from brokerfl.assembly.roles import topology_for

    config = common.load_run_config(args)
    topology = topology_for(config, journal=True)
    watched = [topology.server_queue, *(topology.client_queue(c) for c in config.client_ids())]
    with common.connect(args) as transport:
        busy = [queue for queue in watched if _consumers(transport, queue)]
        if busy and not args.force:
            shown = ", ".join(busy[:3]) + (f" and {len(busy) - 3} more" if len(busy) > 3 else "")
            print(
                f"brokerfl delete-run: run {config.run} is still consumed ({shown}): stop its processes first, "
                "or pass --force",
                file=sys.stderr,
            )
            return 1
        topology.delete(transport, config.client_ids())
        from brokerfl.ops.runs import record_deleted
        from brokerfl.runtime.operator_commands import operator_name

        record_deleted(transport, config.run, sender=operator_name())  # brokerfl runs lists it no more
    print(f"deleted run {config.run}: its exchange, queues, model versions and journal")
    return 0


def _consumers(transport: Transport, queue: str) -> int:
    try:
        return transport.queue_info(queue).consumers
    except TransportError:  # not there (never declared, or deleted already)
        return 0


def add_commands(commands: Any) -> None:
    status = commands.add_parser("status", help="a running federation as its server sees it (rounds, clients, queues)")
    common.add_config_arguments(status)
    common.add_broker_arguments(status)
    status.add_argument(
        "--watch",
        action="store_true",
        help="refresh as a live view until Ctrl-C (waiting for a server that has not started yet)",
    )
    status.add_argument("--json", action="store_true", help="JSON (one object per refresh with --watch)")
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes with --watch")
    status.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server's answer")
    status.set_defaults(func=cmd_status)

    runs = commands.add_parser(
        "runs",
        help="the runs on a broker: state (waiting, training, paused, finished, aborted, crashed), round, version, "
        "newest target metric, started and finished times",
        description="List the runs on a broker from its run registry (the stream brokerfl.runs, which every server "
        "appends to). A run is crashed when it has not recorded its end and no server consumes its server queue. "
        "Where identity is enforced, only a run's admin user may read the registry.",
    )
    common.add_broker_arguments(runs)
    runs.add_argument("--json", action="store_true", help="JSON: one object per run, newest first")
    runs.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the registry's newest records")
    runs.set_defaults(func=cmd_runs)

    admin = commands.add_parser(
        "admin",
        help="operator commands to a running server: " + ", ".join(COMMANDS),
        description="\n".join(f"{name}: {what}" for name, what in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    admin.add_argument("admin_command", choices=list(COMMANDS), metavar="COMMAND", help="the operator command (above)")
    admin.add_argument("values", nargs="*", help="the command's values (a client id, N, client ids)")
    admin.add_argument(
        "--config",
        default=common.env("CONFIG"),
        help="YAML run config (default: $BROKERFL_CONFIG; only the run name and journal are used)",
    )
    admin.add_argument("--run", default=common.env("RUN"), help="run name")
    admin.add_argument("--reason", help="abort: why (journaled)")
    admin.add_argument("--delete-queue", action="store_true", help="remove-client: also delete the client's queue")
    admin.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the server's reply")
    admin.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="the least severe log lines written to stderr",
    )
    common.add_broker_arguments(admin)
    admin.set_defaults(func=cmd_admin, clients=None, rounds=None, seed=None)

    delete_run = commands.add_parser(
        "delete-run",
        help="delete what a run keeps on the broker: exchange, queues, model versions, journal",
        description="Delete a finished or abandoned run from the broker: its exchange, the server, client, dead-letter "
        "and admin queues, the models stream (every stored model version) and the journal. Export what you want to "
        "keep first (brokerfl export, brokerfl journal export).",
    )
    common.add_config_arguments(delete_run)
    common.add_broker_arguments(delete_run)
    delete_run.add_argument(
        "--force", action="store_true", help="delete even while processes still consume the run's queues"
    )
    delete_run.set_defaults(func=cmd_delete_run)
