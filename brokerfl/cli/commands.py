"""The ``brokerfl`` command: its parser and the commands that run a federation (status and
admin: :mod:`brokerfl.cli.operate`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from brokerfl.app import AppError, base_of
from brokerfl.cli.common import (
    add_broker_arguments,
    add_config_arguments,
    broker_url,
    connect,
    env,
    load_run_config,
    parse_client_ids,
)
from brokerfl.cli.dashboard import add_commands as add_dashboard_commands
from brokerfl.cli.logs import add_command as add_logs_command
from brokerfl.cli.operate import add_commands as add_operate_commands
from brokerfl.config import ConfigError, RunConfig
from brokerfl.runtime.log import LogBuffer, configure_logging, get_logger, install_buffer
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.transports.base import TransportError
from brokerfl.transports.memory import tune_allocator


def _metrics_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port", type=int, default=env("METRICS_PORT"), help="serve Prometheus metrics on this port (/metrics)"
    )
    parser.add_argument(
        "--metrics-addr",
        default=env("METRICS_ADDR") or "127.0.0.1",
        help="the address --metrics-port listens on (default 127.0.0.1: this host only; 0.0.0.0 in a container)",
    )


def _start_metrics(args: argparse.Namespace, role: str, run: str) -> Any:
    """The process's metrics endpoint, listening before the process connects (a port in use
    is said at once: MetricsServeError, exit code 2), or None without --metrics-port."""
    if not args.metrics_port:
        return None
    from brokerfl.ops.monitoring import ProcessMetrics

    return ProcessMetrics(role, run, args.metrics_port, args.metrics_addr)


def _set_torch_threads() -> None:
    # One thread per process: many logical clients share 2 cores, and a fixed thread count
    # keeps training bitwise reproducible across processes and transports. torch is set up
    # only if the app imports it (an app without torch runs without it).
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    else:
        os.environ["OMP_NUM_THREADS"] = "1"  # what torch's thread count starts from


def cmd_new(args: argparse.Namespace) -> int:
    from brokerfl.ops.scaffold import ScaffoldError, create_app

    try:
        root = create_app(args.name, args.dir)
    except ScaffoldError as exc:
        print(f"brokerfl new: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the app {args.name} in {root}/. Next:")
    print(f"  pip install -e {root}")
    print(f"  cd {root} && brokerfl simulate        # runs ./brokerfl.yaml: the app in one process")
    print("  python -m pytest tests                 # the app's own test")
    return 0


APP_CONFIG = "brokerfl.yaml"  # the run of an app folder (what `brokerfl new` writes)


def cmd_simulate(args: argparse.Namespace) -> int:
    from brokerfl.assembly.simulate import SimulationError, simulate
    from brokerfl.storage.model_file import FINAL_MODEL

    if args.config is None and Path(APP_CONFIG).is_file():
        # in an app's folder, `brokerfl simulate` runs that app (like `flwr run .`)
        args.config = APP_CONFIG
        print(f"brokerfl simulate: using ./{APP_CONFIG}", file=sys.stderr)
    config = load_run_config(args)
    _set_torch_threads()
    out = Path(args.out or f"runs/{config.run}")
    try:
        result = simulate(
            config, out, progress=not args.no_progress, journal=bool(args.journal), keep_versions=args.keep_versions
        )
    except SimulationError as exc:
        print(f"brokerfl simulate: {exc}", file=sys.stderr)
        return 1
    if args.journal:
        from brokerfl.assembly.roles import topology_for
        from brokerfl.storage.journal import read_journal, write_journal_file
        from brokerfl.transports.local import LocalTransport

        count = write_journal_file(
            args.journal, config.run, read_journal(LocalTransport(result.broker), topology_for(config))
        )
        print(f"wrote the journal ({count} messages) to {args.journal}")
    if config.flower_app is not None:
        _print_flower_summary(config, result, out)
        return 0
    from brokerfl.app import load_app
    from brokerfl.storage.metrics_log import record_metrics

    target = load_app(config).target.name
    scored = [
        m for r in result.records if (m := record_metrics(r)).get(target) is not None
    ]  # federated evaluation lines too
    last = scored[-1] if scored else {}
    loss = last.get("loss")
    versions = [r for r in result.records if "evaluation" not in r]
    rounds = len({r.get("round") for r in versions})
    # a cyclic round is one version per hop, and an asynchronous strategy's versions are its rounds
    done = f"{rounds} rounds" if rounds == len(versions) else f"{rounds} rounds ({len(versions)} model versions)"
    print(
        f"{config.run}: {done} in {result.duration_s:.1f} s; "
        f"final {target} {last.get(target, float('nan')):.4f}, loss {float('nan') if loss is None else loss:.4f}; "
        f"wrote {out / 'metrics.jsonl'}, {out / 'curve.png'}"
        + (f" and {out / FINAL_MODEL}" if (out / FINAL_MODEL).exists() else "")
    )
    _print_cross_site(config, out)
    return 0


def _print_flower_summary(config: RunConfig, result: Any, out: Path) -> None:
    """A Flower run's end: its rounds, and the last metrics its nodes' replies carried."""
    rounds = len({r["round"] for r in result.records})
    last: dict[str, dict[str, Any]] = {}
    for record in result.records:
        last[record.get("flower", "?")] = record.get("metrics") or {}
    shown = "; ".join(
        f"{kind}: " + ", ".join(f"{name} {value:.4g}" for name, value in sorted(metrics.items()))
        for kind, metrics in last.items()
        if metrics
    )
    print(
        f"{config.run}: Flower app {Path(config.flower_app or '').name}, {rounds} rounds in {result.duration_s:.1f} s"
        + (f"; last replies' metrics (weighted means) {shown}" if shown else "")
        + f"; wrote {out / 'metrics.jsonl'}"
        + (f", {out / 'curve.png'}" if (out / "curve.png").exists() else "")
    )


def cmd_export(args: argparse.Namespace) -> int:
    from brokerfl.storage.model_file import ModelFileError, export_version

    try:
        meta = export_version(args.source, args.out, version=args.version)
    except ModelFileError as exc:
        print(f"brokerfl export: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote model version {meta['version']} (round {meta['round']}, sha256 {meta['sha256'][:12]}) of run "
        f"{meta['run'] or '?'} to {args.out}"
    )
    return 0


def _print_cross_site(config: RunConfig, out: Path) -> None:
    if config.cross_site_eval:
        from brokerfl.storage.cross_site_results import HEATMAP_FILE, print_table, read_results

        document = read_results(out)
        if document is not None:
            print_table(document)
            print(f"heatmap: {out / HEATMAP_FILE}")


def cmd_server(args: argparse.Namespace) -> int:
    from brokerfl.app import curve_settings, load_app
    from brokerfl.assembly.roles import (
        server_instance,
        server_worker,
        take_server_role,
        topology_for,
    )
    from brokerfl.runtime.remote_log import flush, log_shipper, site_of
    from brokerfl.runtime.worker import run_workers
    from brokerfl.storage.broker_store import BrokerModelStore
    from brokerfl.storage.metrics_log import MetricsLog, plot_curve
    from brokerfl.storage.store import DirectoryModelStore
    from brokerfl.storage.tracking import check_tracking, open_tracking
    from brokerfl.transports.base import LeaseLost

    config = load_run_config(args)
    check_tracking(config)  # a tracker's missing package is said before the broker is
    log = get_logger(run=config.run, role="server")
    install_buffer(buffer := LogBuffer())  # from its first line on, its log goes to the run too
    log.info("starting", broker=broker_hosts(broker_url(args)), rounds=config.rounds, clients=config.clients)
    # The server's evaluation too: with torch's default of one thread per core, a small
    # model's evaluation waits for its second thread to be scheduled on a loaded machine (a
    # few milliseconds idle, up to a second under load: docs/benchmarks/round-floor.md).
    _set_torch_threads()
    out = Path(args.out or env("OUT") or f"runs/{config.run}")
    process_metrics = _start_metrics(args, "server", config.run)  # a standby's too: brokerfl_server_active 0
    # The versions live on the broker (the run's models stream), so a server on a fresh
    # host with an empty --out resumes the run; DIR/models is an export of them.
    with (
        connect(args, retry_start=True, config=config) as transport,
        connect(args, side=True, retry_start=True, config=config) as store_transport,
    ):
        topology_for(config).declare(transport)
        log.info("connected", broker=broker_hosts(broker_url(args)))
        # a hot standby: the app's code (and torch, if it uses it) loaded before it waits
        if config.flower_app is not None:
            _check_flower_server(config)
        else:
            app = load_app(config)
            app.check_model()
            if (size := app.travelling_bytes()) is not None and size > config.max_message_mib * 2**20:
                print(
                    f"{config.run}: the model travels as {size / 2**20:,.1f} MiB, more than max_message_mib "
                    f"({config.max_message_mib}), the largest message a process reassembles: raise max_message_mib "
                    "in the config (every process's)",
                    file=sys.stderr,
                )
                return 2
        take_server_role(transport, config)  # a standby until no other server holds the role
        if process_metrics is not None:
            process_metrics.server_role_taken()
        # keep=1: the newest version's parameters are the model the server holds anyway
        store = BrokerModelStore(
            store_transport, topology_for(config), keep=1, export=DirectoryModelStore(out / "models")
        ).refresh()
        if not store.versions() and config.flower_app is None:  # a fresh run: no stale lines from an earlier one
            # (a Flower run has no versions: its journal says whether it is fresh)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        metrics = MetricsLog(out / "metrics.jsonl")
        worker = server_worker(transport, config, store, metrics)
        worker.state.instance = server_instance()
        # MLflow and TensorBoard: a resumed run goes on in its MLflow run, from the lines it has
        resumed = bool(store.versions()) or (out / "metrics.jsonl").exists()
        tracker = open_tracking(config, out, resume=resumed)
        if tracker is not None:
            if resumed:
                tracker.catch_up(read_metrics(out / "metrics.jsonl"))
            worker.state.on_round.append(tracker)
        if process_metrics is not None:
            from brokerfl.handlers.workflows.admin import held_updates
            from brokerfl.handlers.workflows.server_state import live_clients

            process_metrics.attach_server(worker, live_clients, held_updates)
        shipper = log_shipper(transport, topology_for(config), site_of("server", []), buffer=buffer)
        try:
            shipper.start()
            worker.start()
            run_workers(transport, [worker], background=[shipper])
            log.info("stopping", reason=worker.state.failure or "the run is finished")
            flush(shipper)
        except LeaseLost:
            # Its connection was lost and another server holds the role now: this one's
            # rounds, timers and held updates are that one's to redo. Started again, it waits
            # as a standby.
            print(
                "brokerfl server: lost the server role to another server (this one's connection was lost meanwhile); "
                "stopping",
                file=sys.stderr,
            )
            return 4
        store.wait_for_export()
    state = worker.state
    if config.flower_app is not None:
        if tracker is not None:
            lines = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
            tracker.finish(lines, [out / "metrics.jsonl"], failed=bool(state.failure))
        if state.failure:
            print(f"brokerfl server: {state.failure}", file=sys.stderr)
            return 1
        print(f"{config.run}: the Flower app's ServerApp finished; wrote {out / 'metrics.jsonl'}")
        return 0
    from brokerfl.storage.model_file import FINAL_MODEL, write_model_file

    if state.model is not None and state.model.parameters:  # the model the run ended with
        write_model_file(
            out / FINAL_MODEL, state.model, run=config.run, app=config.app, base_fingerprint=base_of(config)
        )
    records = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    if records:
        plot_curve(
            records,
            out / "curve.png",
            title=f"{config.run}: {config.strategy.name}, {config.clients} clients",
            **curve_settings(config),
        )
    if tracker is not None:
        tracker.finish(
            records, [out / FINAL_MODEL, out / "metrics.jsonl", out / "curve.png"], failed=bool(state.failure)
        )
    if state.failure:
        print(f"brokerfl server: {state.failure}", file=sys.stderr)
        return 1
    print(
        f"{config.run}: done at model version {state.model.version}; wrote {out / 'metrics.jsonl'}, "
        f"{out / 'curve.png'} and {out / FINAL_MODEL}"
    )
    _print_cross_site(config, out)
    return 0


def _check_flower_server(config: RunConfig) -> None:
    """A Flower run's server: its ServerApp imports, and the run has a journal (a restarted
    ServerApp resumes from it)."""
    from brokerfl.flower.app_dir import FlowerAppError
    from brokerfl.handlers.workflows.flower_server import flower_app_of

    if not config.journal:
        raise ConfigError(
            "flower_app: a Flower run's server resumes from the run's journal (durable execution): journal must be on"
        )
    try:
        flower_app_of(config).load_server_app()
    except FlowerAppError as exc:
        raise ConfigError(str(exc)) from None


def cmd_ping(args: argparse.Namespace) -> int:
    with connect(args):
        pass
    print(f"broker at {_mask(broker_url(args))} answers")
    return 0


def _mask(url: str) -> str:
    from brokerfl.transports.amqp import mask_url

    return mask_url(url)  # every node's URL of a comma-separated list too


def cmd_client(args: argparse.Namespace) -> int:
    if not args.client_id:
        raise SystemExit("brokerfl client: pass --client-id (an id, a range such as 0-9) or set BROKERFL_CLIENT_ID")
    config = load_run_config(args)
    log = get_logger(run=config.run, role="client", clients=_shown(args.client_id))
    install_buffer(buffer := LogBuffer())  # from its first line on, its log goes to the run too
    # before the app's imports (torch: seconds, tens of seconds with several processes starting at once)
    log.info("starting", broker=broker_hosts(broker_url(args)))
    from brokerfl.assembly.roles import PER_CLIENT_LINES_MAX, client_process_worker, client_worker, topology_for
    from brokerfl.runtime.remote_log import flush, log_shipper, site_of
    from brokerfl.runtime.worker import run_workers
    from brokerfl.storage.model_refs import ModelCache

    outside = [cid for cid in args.client_id if not config.has_client(cid)]
    if outside:
        shown = ", ".join(outside[:10]) + (f" and {len(outside) - 10} more" if len(outside) > 10 else "")
        raise SystemExit(
            f"brokerfl client: client id{'s' if len(outside) > 1 else ''} {shown} not in the federation of run "
            f"{config.run} "
            f"(its {config.clients} clients are {config.client_ids_text()}; see --clients)"
        )
    if config.identity.enforce and len(args.client_id) > 1:
        raise SystemExit(
            "brokerfl client: with identity enforced each client has its own broker user: one --client-id per process"
        )
    if config.flower_app is not None:
        config = _flower_client_config(config, args)
    elif args.node_config:
        raise SystemExit("brokerfl client: --node-config is a Flower node's setting; this run names no flower_app")
    _set_torch_threads()
    process_metrics = _start_metrics(args, "client", config.run) if config.workflow != "swarm" else None
    if config.workflow == "swarm":  # a peer: these clients plus an aggregator candidate
        from brokerfl.assembly.swarm_peers import run_peer

        out = Path(env("OUT") or f"runs/{config.run}")
        code = run_peer(lambda: connect(args, retry_start=True, config=config), config, args.client_id, out)
        _print_cross_site(config, out)  # written by the peer that held the role at the end
        return code
    with (
        connect(args, retry_start=True, config=config) as transport,
        connect(args, side=True, retry_start=True, config=config) as models_transport,
    ):
        # one connection, one consumer per logical client; a second one fetches the models
        # tasks name by reference, once per process for all its logical clients
        capacity = transport.consumer_capacity()  # one channel per logical client's consumer
        if len(args.client_id) > capacity:
            raise SystemExit(
                f"brokerfl client: {len(args.client_id)} logical clients need one channel each, and the broker allows "
                f"{capacity} consumers "
                f"on one connection (channel_max {transport.channel_limit()}): run them in "
                f"{-(-len(args.client_id) // capacity)} or more processes"
            )
        log.info("connected", broker=broker_hosts(broker_url(args)))
        models = ModelCache(models_transport, topology_for(config))
        # many logical clients: each one's lifecycle lines at --log-level debug only (PER_CLIENT_LINES_MAX)
        quiet = len(args.client_id) > PER_CLIENT_LINES_MAX and args.log_level != "debug"
        if not config.identity.enforce:  # once for all its logical clients (each declares only its queue)
            topology_for(config).declare(transport)
        workers = [
            client_worker(transport, config, client_id, models=models, warnings_only=quiet, declare_run=False)
            for client_id in args.client_id
        ]
        beat = client_process_worker(transport, config, workers)  # one heartbeat for all of them
        log.info(
            "ready: the app is loaded",
            app=config.app,
            **({"each_client_logs": "warnings only (--log-level debug: every line)"} if quiet else {}),
        )
        shipper = log_shipper(transport, topology_for(config), site_of("client", args.client_id), buffer=buffer)
        shipper.start()
        if process_metrics is not None:
            process_metrics.attach_clients(workers)
        for worker in workers:
            worker.start()
        if beat is not None:
            beat.start()
        run_workers(transport, workers, background=[shipper, *([beat] if beat is not None else [])])
        reasons = sorted({getattr(w.state, "exit_reason", None) or "stopped" for w in workers})
        log.info("stopping", reason="; ".join(reasons)[:300])
        flush(shipper)
    return 0


def _shown(ids: list[str]) -> str:
    return ",".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


def broker_hosts(url: str) -> str:
    """The broker's host:port (each node's), without user or password, for a log line."""
    from urllib.parse import urlsplit

    hosts = []
    for part in url.split(","):
        try:
            parts = urlsplit(part.strip())
            hosts.append(f"{parts.hostname}:{parts.port or (5671 if parts.scheme == 'amqps' else 5672)}")
        except ValueError:
            hosts.append("?")
    return ",".join(hosts)


def _flower_client_config(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """A Flower node's site settings: ``--node-config`` entries for its nodes, and where
    their Contexts are kept (``client_state_dir``, by default ``runs/<run>/nodes``: a
    node's state survives its process)."""
    import tomllib

    entries: dict[str, Any] = {}
    for item in args.node_config:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"brokerfl client: --node-config {item!r}: give KEY=VALUE")
        try:
            entries[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            entries[key.strip()] = value
        if not isinstance(entries[key.strip()], bool | int | float | str):
            raise SystemExit(f"brokerfl client: --node-config {item!r}: a value is a bool, number or string")
    node_config = dict(config.flower_node_config)
    for client_id in args.client_id:
        node_config[client_id] = {**node_config.get(client_id, {}), **entries}
    return config.model_copy(
        update={
            "flower_node_config": node_config,
            "client_state_dir": config.client_state_dir or str(Path("runs") / config.run / "nodes"),
        }
    )


def cmd_accounting(args: argparse.Namespace) -> int:
    from brokerfl.assembly.roles import topology_for
    from brokerfl.storage.accounting import account_run
    from brokerfl.storage.store import DirectoryModelStore

    if args.journal:  # a journal file (simulate --journal, journal export): no broker needed
        from brokerfl.storage.accounting import account_journal
        from brokerfl.storage.journal import read_journal_file
        from brokerfl.transports.base import TransportError

        if not Path(args.journal).is_file():
            print(f"brokerfl accounting: no journal file {args.journal}", file=sys.stderr)
            return 2
        try:
            report = account_journal(read_journal_file(args.journal))
        except TransportError as exc:
            print(f"brokerfl accounting: {exc}", file=sys.stderr)
            return 2
        print(report.summary())
        return 0 if report.ok and report.cut_at is None else 1
    config = load_run_config(args)
    out = Path(args.out or env("OUT")) if (args.out or env("OUT")) else None
    with connect(args, config=config) as transport, connect(args, config=config) as store_transport:
        if out is not None:  # the versions as a server exported them
            if not (out / "models").is_dir():
                raise SystemExit(f"brokerfl accounting: no stored model versions in {out / 'models'}")
            store = DirectoryModelStore(out / "models")
        else:  # the versions on the broker, in the run's models stream
            from brokerfl.storage.broker_store import BrokerModelStore

            store = BrokerModelStore(store_transport, topology_for(config), keep=1).refresh()
        report = account_run(transport, topology_for(config), store)
    print(report.summary())
    return 0 if report.ok and report.cut_at is None else 1  # a cut journal proves only part of the run


def _journal_source(args: argparse.Namespace, config: RunConfig):
    """(deliveries, closer): the run's journal from --journal FILE, else from the broker."""
    from brokerfl.assembly.roles import topology_for
    from brokerfl.storage.journal import read_journal, read_journal_file

    if args.journal:
        return read_journal_file(args.journal), None
    transport = connect(args, config=config)
    return read_journal(transport, topology_for(config.model_copy(update={"journal": True}))), transport


def _load_for_journal(args: argparse.Namespace) -> RunConfig:
    if args.journal and not args.run:
        from brokerfl.storage.journal import journal_file_run

        args.run = journal_file_run(args.journal) or None
    return load_run_config(args)


def _strategy_option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    import yaml

    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{key}: {value!r} is not a YAML value") from None


def cmd_replay(args: argparse.Namespace) -> int:
    from brokerfl.ops.replay import ReplayError, replay

    config = _load_for_journal(args)
    if config.flower_app is not None:
        return _replay_flower(args, config)
    if config.secure_aggregation is not None and (args.strategy or args.option):
        print(
            "brokerfl replay: a what-if needs each update, and under secure_aggregation the journal holds only masked "
            "ones, whose sum alone can be unmasked (that is the point); replay --check recomputes each version from "
            "that sum",
            file=sys.stderr,
        )
        return 2
    deliveries, transport = _journal_source(args, config)
    try:
        result = replay(
            deliveries,
            config,
            what_if=args.strategy,
            what_if_options=dict(args.option),
            from_version=args.from_version,
            to_version=args.to_version,
        )
    except (ReplayError, ValueError) as exc:  # ValueError: a what-if strategy's bad option
        print(f"brokerfl replay: {exc}", file=sys.stderr)
        return 1
    finally:
        if transport is not None:
            transport.close()
    print(result.table(args.strategy))
    if args.check and not result.ok:
        first = result.first_diff()
        print(
            f"DIFF: first at version {first.version}" + (f" ({first.problem})" if first.problem else ""),
            file=sys.stderr,
        )
        return 1
    return 0


def _replay_flower(args: argparse.Namespace, config: RunConfig) -> int:
    """A Flower run's replay: its train aggregates recomputed as weighted means."""
    from brokerfl.flower.audit import check_weighted_means, table

    if args.strategy or args.option or args.from_version or args.to_version is not None:
        print(
            "brokerfl replay: a Flower run aggregates in its ServerApp's own code: what-if strategies and version "
            "ranges apply to brokerfl strategies only; replay --check recomputes its weighted means",
            file=sys.stderr,
        )
        return 2
    deliveries, transport = _journal_source(args, config)
    try:
        rows = check_weighted_means(deliveries)
    finally:
        if transport is not None:
            transport.close()
    print(table(rows))
    if not rows:
        print("brokerfl replay: the journal holds no train exchange of a Flower app", file=sys.stderr)
        return 1 if args.check else 0
    if args.check and not all(row.ok for row in rows):
        first = next(row for row in rows if not row.ok)
        print(f"DIFF: first at exchange {first.call} (round {first.round}) {first.problem}".rstrip(), file=sys.stderr)
        return 1
    return 0


def cmd_journal_export(args: argparse.Namespace) -> int:
    from brokerfl.assembly.roles import topology_for
    from brokerfl.storage.journal import Skipped, read_journal, write_journal_file

    config = load_run_config(args)
    skipped = Skipped()
    with connect(args, config=config) as transport:
        count = write_journal_file(
            args.file,
            config.run,
            read_journal(transport, topology_for(config.model_copy(update={"journal": True}))),
            skipped,
        )
    print(f"wrote {count} messages of run {config.run} to {args.file}")
    print(skipped.summary())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from brokerfl.ops import inspection as inspect

    config = _load_for_journal(args)
    if args.message or args.update:
        deliveries, transport = _journal_source(args, config)
        try:
            found = inspect.find_message(deliveries, args.update or args.message)
            if args.npz:
                names = inspect.dump_npz(found, args.npz)
                print(f"wrote {len(names)} tensors of {found.envelope.type} {found.envelope.message_id} to {args.npz}")
            else:
                print(inspect.describe(found))
        except KeyError as exc:
            print(f"brokerfl inspect: {exc.args[0]}", file=sys.stderr)
            return 1
        finally:
            if transport is not None:
                transport.close()
        return 0
    dead_queue = None
    if not args.journal:
        from brokerfl.assembly.roles import topology_for

        with connect(args) as transport:
            topology = topology_for(config)
            print(inspect.queue_table(transport, topology, config.client_ids(), broker_url(args)))
            dead_queue = inspect.dead_queue_depth(transport, topology)
    deliveries, transport = _journal_source(args, config)
    try:
        print(inspect.journal_report(deliveries, run=config.run, dead_queue=dead_queue))
    finally:
        if transport is not None:
            transport.close()
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from brokerfl.ops.provision import provision

    config = load_run_config(args)
    done = provision(
        config,
        args.out,
        host=args.host,
        port=args.port,
        vhost=args.vhost,
        tls=args.tls,
        broker_dir=args.broker_dir,
        ca_dir=args.ca_dir,
        requests=args.sign,
        password_login=args.password_login,
    )
    print(
        f"wrote {done.definitions} (vhost {done.vhost!r}: {len(done.participants)} users with limits, permissions, "
        "topic permissions, queues, bindings, policies)"
    )
    print(f"      {len(done.env_files)} credentials files {done.out}/<user>.env (hand each site only its own)")
    if done.tls_dir:
        made_here = len(done.participants) - len(done.self_keyed)
        print(
            f"      in {done.tls_dir}: ca.pem, the broker's certificate and key, a certificate per participant"
            f" ({made_here} with a key made here; signed from their own requests: "
            f"{', '.join(done.self_keyed) or 'none'})"
        )
        if done.ca_dir:
            print(f"      the CA's key is in {done.ca_dir} (keep it there, away from the broker's files)")
        else:
            print("      the CA's key was not kept: provision again with --ca-dir DIR to sign requests later")
        login = (
            "password login beside certificate login"
            if done.password_login
            else "certificate login only (no password login)"
        )
        print(f"      the broker's TLS listener: TLS 1.2 and 1.3, {login}")
    # an absolute path: rabbitmqctl (Debian's wrapper) runs from another directory
    print(
        f"      {done.rabbitmq_conf} for the broker; or, as a broker administrator: rabbitmqctl import_definitions "
        f"{done.definitions.resolve()}"
    )
    return 0


def _signing_request(text: str) -> str | tuple[str, str]:
    """``--sign``: ``USER=FILE`` (the user the request must be for), or a file ``USER.csr``."""
    user, eq, path = text.partition("=")
    if eq and user and not Path(text).exists():
        return user, path
    return text


def cmd_keygen(args: argparse.Namespace) -> int:
    from brokerfl.ops.certs import write_signing_request

    key, request = write_signing_request(args.out, args.user, replace=args.replace)
    print(f"wrote {key} (your private key: it stays here) and {request}")
    print(
        f"      send {request.name} to the operator (brokerfl provision ... --tls --sign {request.name});"
        f" you get back {args.user}.pem, ca.pem and {args.user}.env: set BROKERFL_TLS_KEY={key.resolve()} in it"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brokerfl", description="Federated learning over a message broker.")
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a whole federation in this process (local transport, no broker)")
    add_config_arguments(sim)
    # one process, many logical clients: its view is the progress bar and the summary; every
    # client's lifecycle lines (four a round each) at --log-level info
    sim.set_defaults(log_level="warning")
    sim.add_argument("--out", help="directory for metrics.jsonl, curve.png and final_model.npz (default: runs/<run>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.add_argument("--journal", help="also write the run's journal to this file (for brokerfl replay --journal)")
    sim.add_argument(
        "--keep-versions",
        action="store_true",
        help=(
            "write every model version to OUT/models (for brokerfl export --version); the final one goes to "
            "OUT/final_model.npz anyway"
        ),
    )
    sim.set_defaults(func=cmd_simulate)

    new = commands.add_parser("new", help="write a ready-to-run app package (model, data, config, test)")
    new.add_argument("name", help="the app's package name (lower case, e.g. my_app)")
    new.add_argument("--dir", default=".", help="where to create the package folder (default: here)")
    new.set_defaults(func=cmd_new)

    server = commands.add_parser("server", help="run the server of a federation over RabbitMQ")
    add_config_arguments(server)
    add_broker_arguments(server)
    server.add_argument(
        "--out",
        help=(
            "directory for metrics.jsonl, curve.png and stored model versions (default: $BROKERFL_OUT, else runs/<run>)"
        ),
    )
    _metrics_argument(server)
    server.set_defaults(func=cmd_server)

    client = commands.add_parser(
        "client",
        help="run one or many logical clients over RabbitMQ",
        description=(
            "Run one or many logical clients over RabbitMQ. With workflow swarm the process is also an aggregator "
            "candidate, and writes the run's outputs to $BROKERFL_OUT (default: runs/<run>)."
        ),
    )
    add_config_arguments(client)
    add_broker_arguments(client)
    client.add_argument(
        "--client-id",
        default=env("CLIENT_ID"),
        type=parse_client_ids,
        help="an id, a range such as 0-9, or a list such as 0-3,7 (default: $BROKERFL_CLIENT_ID)",
    )
    client.add_argument(
        "--node-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Flower app: an entry of this process's nodes' context.node_config (repeatable; VALUE as TOML reads "
        "it, else a string), e.g. data-path=/srv/site-a",
    )
    _metrics_argument(client)
    client.set_defaults(func=cmd_client)

    export = commands.add_parser(
        "export", help="write a stored model version to a model file an app loads back (brokerfl.app.load_model)"
    )
    export.add_argument(
        "source",
        help=(
            "a run's output directory (its models/: a server's, or simulate --keep-versions's; else its "
            "final_model.npz), or a models/ directory"
        ),
    )
    export.add_argument("--version", type=int, help="the model version (default: the newest)")
    export.add_argument(
        "--out", required=True, help="the model file to write (.npz: numpy arrays and JSON metadata, no pickle)"
    )
    export.set_defaults(func=cmd_export)

    accounting = commands.add_parser(
        "accounting", help="prove every update is in exactly one model version or dropped with a reason"
    )
    add_config_arguments(accounting)
    add_broker_arguments(accounting)
    accounting.add_argument(
        "--out",
        help=(
            "read the model versions a server exported to this directory (default: $BROKERFL_OUT; without either, "
            "from the run's models stream on the broker)"
        ),
    )
    accounting.add_argument(
        "--journal",
        help=(
            "a journal file (brokerfl journal export, simulate --journal): the versions from its records, no broker "
            "needed"
        ),
    )
    accounting.set_defaults(func=cmd_accounting)

    rep = commands.add_parser(
        "replay", help="recompute a run's model versions from its journal; check hashes; what-ifs"
    )
    add_config_arguments(rep)
    add_broker_arguments(rep)
    rep.add_argument("--journal", help="a journal file (brokerfl journal export, simulate --journal): no broker needed")
    rep.add_argument(
        "--check", action="store_true", help="exit non-zero if any recomputed version differs from the stored one"
    )
    rep.add_argument(
        "--strategy", help="what-if: aggregate the same updates with this strategy (e.g. median) and compare accuracies"
    )
    rep.add_argument(
        "--option",
        action="append",
        default=[],
        type=_strategy_option,
        metavar="KEY=VALUE",
        help="an option of the what-if strategy, e.g. f=2 (repeatable; the value is read as YAML)",
    )
    rep.add_argument(
        "--from-version",
        type=int,
        default=0,
        help="show the versions from this one on (the earlier ones are still recomputed: later ones build on them)",
    )
    rep.add_argument("--to-version", type=int, help="stop after this version (default: the newest)")
    rep.set_defaults(func=cmd_replay)

    journal = commands.add_parser("journal", help="the run's journal")
    journal_commands = journal.add_subparsers(dest="journal_command", required=True)
    export = journal_commands.add_parser("export", help="write the run's journal to a file")
    add_config_arguments(export)
    export.add_argument("file", help="the journal file to write (read by replay, accounting and inspect --journal)")
    add_broker_arguments(export)
    export.set_defaults(func=cmd_journal_export)

    ins = commands.add_parser("inspect", help="a run's queues, dead letters, newest versions; any message decoded")
    add_config_arguments(ins)
    add_broker_arguments(ins)
    ins.add_argument("--journal", help="inspect a journal file instead of the broker")
    ins.add_argument("--message", help="show one message of the journal, decoded (tensor names, shapes, dtypes, norms)")
    ins.add_argument("--update", help="the id of a ParameterUpdate to show or dump")
    ins.add_argument("--npz", help="with --update: write its tensors to this .npz file")
    ins.set_defaults(func=cmd_inspect)

    prov = commands.add_parser(
        "provision", help="broker users, permissions and credentials for a federation across organisations"
    )
    add_config_arguments(prov)
    prov.add_argument(
        "--out", required=True, help="directory for definitions.json, <user>.env files, rabbitmq.conf (and tls/)"
    )
    prov.add_argument(
        "--host",
        default="localhost",
        help="the broker's host name as participants reach it (and, with --tls, in its certificate)",
    )
    prov.add_argument("--port", type=int, help="the broker's port (default 5672, with --tls 5671)")
    prov.add_argument("--vhost", help="the run's virtual host (default: the run name)")
    prov.add_argument(
        "--tls",
        action="store_true",
        help="also issue a CA and certificates; credentials use amqps:// and certificate login",
    )
    prov.add_argument(
        "--broker-dir", help="where the broker sees --out (e.g. a container mount), for the paths in rabbitmq.conf"
    )
    prov.add_argument(
        "--ca-dir",
        help=(
            "with --tls: keep the CA here (made once, reused after; not under --out). Without it the CA's key is kept "
            "nowhere"
        ),
    )
    prov.add_argument(
        "--sign",
        action="append",
        default=[],
        type=_signing_request,
        metavar="[USER=]CSR",
        help=(
            "with --tls: a participant's certificate signing request (brokerfl keygen) to sign; its CN must be USER "
            "(default: the file's name, USER.csr), a user of the run (repeatable)"
        ),
    )
    prov.add_argument(
        "--password-login",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "with --tls: allow password (PLAIN) login beside certificate login on the TLS listener (default: off with "
            "--tls)"
        ),
    )
    prov.set_defaults(func=cmd_provision)

    keygen = commands.add_parser(
        "keygen", help="a participant's own private key and certificate signing request (for provision --tls --sign)"
    )
    keygen.add_argument(
        "--user", required=True, help="your broker user, as the operator named it (e.g. RUN-client-3): the request's CN"
    )
    keygen.add_argument(
        "--out", required=True, help="directory for USER.key (0600, stays here) and USER.csr (send it to the operator)"
    )
    keygen.add_argument(
        "--replace",
        action="store_true",
        help="make a new key even if USER.key exists (its certificate then stops working)",
    )
    keygen.set_defaults(func=cmd_keygen)

    add_operate_commands(commands)
    add_logs_command(commands)
    add_dashboard_commands(commands)

    ping = commands.add_parser("ping", help="check that the broker answers (container health checks)")
    add_broker_arguments(ping)
    ping.set_defaults(func=cmd_ping)
    return parser


# The allocator each command runs with (brokerfl.transports.memory; BROKERFL_MALLOC overrides it): the
# server's memory is what grows with a federation, so its peak RSS should be what it holds
# (lean: flat at about 4x the model above baseline, docs/benchmarks/server-memory.md); clients
# train on every round's critical path, so they stay tuned (speed).
ALLOCATOR = {"server": "lean"}


def allocator_for(args: argparse.Namespace) -> str:
    """The allocator setting a command line asks for (before BROKERFL_MALLOC). A client
    process hosting several logical clients runs lean: it is there to pack clients into a
    machine's memory, and with tuned its heap fragments as each logical client's gradients
    and update are freed (lean: 2.5x the model above baseline with 16 logical clients,
    docs/benchmarks/client-memory.md). One logical client per process stays tuned (speed)."""
    if args.command == "client" and len(getattr(args, "client_id", None) or ()) > 1:
        return "lean"
    return ALLOCATOR.get(args.command, "tuned")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # before any large buffer: bodies reuse freed pages instead of faulting (brokerfl.transports.memory)
        tune_allocator(allocator_for(args))
        configure_logging(getattr(args, "log_level", "info"))  # ping has no --log-level
    except ValueError as exc:  # BROKERFL_MALLOC or BROKERFL_LOG_FORMAT names no setting
        print(f"brokerfl: {exc}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"brokerfl: config error: {exc}", file=sys.stderr)
        return 2
    except AppError as exc:  # a mistake in the app found at start (e.g. a model() with no parameters)
        print(f"brokerfl {args.command}: {exc}", file=sys.stderr)
        return 2
    except TransportError as exc:
        print(f"brokerfl {args.command}: {exc}", file=sys.stderr)
        return 3
    except ValueError as exc:  # e.g. a bad client id
        print(f"brokerfl {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
