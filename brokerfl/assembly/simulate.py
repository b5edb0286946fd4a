"""``brokerfl simulate``: a whole federation in one process on the local transport.

The server and every client are the same workers that run over RabbitMQ, each with its own
connection to one in-process :class:`LocalBroker`. A single thread steps them in turn
(clients train one after another), which also makes a simulation deterministic: the same
config and seed give the same model versions, hash for hash.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brokerfl.app import base_of, curve_settings
from brokerfl.assembly.roles import client_worker, server_worker, topology_for
from brokerfl.config import RunConfig
from brokerfl.runtime import identity
from brokerfl.storage.broker_store import BrokerModelStore
from brokerfl.storage.metrics_log import MetricsLog, plot_curve, read_metrics
from brokerfl.storage.model_file import FINAL_MODEL, write_model_file
from brokerfl.storage.model_refs import ModelCache
from brokerfl.storage.store import DirectoryModelStore, ModelStore
from brokerfl.storage.tracking import Tracker, open_tracking
from brokerfl.transports.local import LocalBroker, LocalTransport


class SimulationError(RuntimeError):
    pass


@dataclass
class SimulationResult:
    records: list[dict[str, Any]]
    server_state: Any
    duration_s: float
    out_dir: Path | None
    broker: LocalBroker | None = None
    store: ModelStore | None = None


def simulate(
    config: RunConfig,
    out_dir: str | Path | None = None,
    *,
    store: ModelStore | None = None,
    progress: bool = False,
    broker: LocalBroker | None = None,
    journal: bool = False,
    keep_versions: bool = False,
) -> SimulationResult:
    """Run ``config`` to the end. ``journal`` keeps the run's journal stream in ``broker``
    (in memory: every message of the run) for accounting and replay. Each participant
    connects as its own user (:mod:`brokerfl.runtime.identity`) when ``identity.enforce`` is on.
    With ``out_dir``, the final model goes to ``OUT/final_model.npz`` (:mod:`brokerfl.storage.model_file`)
    and, with ``keep_versions``, every version to ``OUT/models`` as a server exports them.
    The config's ``tracking`` gets every metrics line, and at the end those files
    (:mod:`brokerfl.storage.tracking`)."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    # MLflow and TensorBoard, if the config asks: a missing package is said before the run
    tracker = open_tracking(config, out, resume=False)
    try:
        result = _simulate(config, out, store, progress, broker, journal, keep_versions, tracker)
    except Exception:  # (an interrupt does not wait for the trackers)
        if tracker is not None:
            # the lines the hook had: those of the rounds that ended
            lines = read_metrics(out / "metrics.jsonl") if out and (out / "metrics.jsonl").exists() else []
            tracker.finish(lines, failed=True)
        raise
    if tracker is not None:
        artifacts = [out / FINAL_MODEL, out / "metrics.jsonl", out / "curve.png"] if out is not None else []
        tracker.finish(result.records, artifacts, failed=bool(getattr(result.server_state, "failure", None)))
    return result


def _simulate(
    config: RunConfig,
    out: Path | None,
    store: ModelStore | None,
    progress: bool,
    broker: LocalBroker | None,
    journal: bool,
    keep_versions: bool,
    tracker: Tracker | None,
) -> SimulationResult:
    started = time.perf_counter()
    broker = broker or LocalBroker()
    # Clients in this process are alive by construction; liveness by heartbeat timing would
    # only make sampling depend on how fast this machine trains (and so not reproducible).
    config = config.model_copy(update={"liveness": config.liveness.model_copy(update={"timeout_s": float("inf")})})
    if config.workflow == "swarm":  # no server: every client process is also an aggregator candidate
        from brokerfl.assembly.swarm_peers import simulate_swarm

        records, state, store = simulate_swarm(config, out, broker, journal=journal)
        if state.failure:
            raise SimulationError(state.failure)
        if out is not None and state.model is not None:  # the last aggregator's last version
            write_model_file(
                out / FINAL_MODEL, state.model, run=config.run, app=config.app, base_fingerprint=base_of(config)
            )
        return SimulationResult(records, state, time.perf_counter() - started, out, broker, store)
    metrics = MetricsLog(out / "metrics.jsonl" if out else None)
    if config.identity.enforce:  # as the operator's definitions would: clients may declare nothing
        topology_for(config, journal=journal).declare_provisioned(LocalTransport(broker), config.client_ids())
    # versions live in the run's models stream, as over RabbitMQ: tasks may name them by reference
    export = DirectoryModelStore(out / "models") if keep_versions and out is not None else None
    store = store or BrokerModelStore(
        LocalTransport(broker, user=_user(config, None)), topology_for(config, journal=journal), export=export
    )
    server = server_worker(LocalTransport(broker, user=_user(config, None)), config, store, metrics, journal=journal)
    models = ModelCache(
        LocalTransport(broker), topology_for(config, journal=journal)
    )  # one copy of each version for every client
    clients = [
        client_worker(LocalTransport(broker, user=_user(config, cid)), config, cid, journal=journal, models=models)
        for cid in config.client_ids()
    ]
    bar = _ProgressBar(_planned_rounds(config), curve_settings(config)["target"]) if progress else None
    if bar:
        server.state.on_round.append(bar.update)
    if tracker is not None:  # each line as the round ends (a swarm's: at the run's end)
        server.state.on_round.append(tracker)
    try:
        for client in clients:
            client.start()
        server.start()
        _run(server, clients)
    finally:
        if bar:
            bar.close()
        for worker in [server, *clients]:
            worker.transport.close()
    state = server.state
    if export is not None:
        store.wait_for_export()
    if state.failure:
        raise SimulationError(state.failure)
    if out is not None and state.model is not None:
        write_model_file(
            out / FINAL_MODEL, state.model, run=config.run, app=config.app, base_fingerprint=base_of(config)
        )
    if out is not None and metrics.records:
        plot_curve(
            metrics.records,
            out / "curve.png",
            title=f"{config.run}: {config.strategy.name}, {config.clients} clients",
            **curve_settings(config),
        )
    return SimulationResult(metrics.records, state, time.perf_counter() - started, out, broker, store)


def _planned_rounds(config: RunConfig) -> int:
    """The rounds the progress bar counts to: a Flower app's ``num-server-rounds`` (its
    ServerApp decides; that key is the convention of Flower's templates), else the config's."""
    if config.flower_app is not None:
        from brokerfl.handlers.workflows.flower_server import flower_app_of

        rounds = flower_app_of(config).run_config.get("num-server-rounds")
        return rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else 0
    return config.rounds


def _user(config: RunConfig, client_id: str | None) -> str:
    """Each participant's broker user: the provisioned ones when identity is enforced."""
    if not config.identity.enforce:
        return "guest"
    return identity.server_user(config.run) if client_id is None else identity.client_user(config.run, client_id)


def _run(server, clients) -> None:
    while not server.stopped:
        progressed = server.step(0.0)
        for client in clients:
            progressed += client.step(0.0)
        if progressed:
            continue
        if server.next_timer_in() is None:
            raise SimulationError("the federation stalled: no message is in flight and the server waits for none")
        wait = min(t for w in [server, *clients] if (t := w.next_timer_in()) is not None)
        server.step(max(wait, 0.0))  # sleeps until the next timer (deadlines, heartbeats)
    # Clients stop on the server's Exit; deliver it.
    for client in clients:
        deadline = time.monotonic() + 10.0
        while not client.stopped and time.monotonic() < deadline:
            client.step(0.1)


class _ProgressBar:
    def __init__(self, rounds: int, target: str = "accuracy") -> None:
        self.target = target
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("", total=rounds)
        self._progress.start()

    def update(self, record: dict[str, Any]) -> None:
        metrics = record.get("metrics") or {}
        value = metrics.get(self.target, record.get(self.target))
        if value is None:  # a round without server test data: federated evaluation follows
            self._progress.update(self._task, completed=record["round"])
            return
        loss = metrics.get("loss", record.get("loss"))
        shown = f"{'acc' if self.target == 'accuracy' else self.target} {value:.4f}" + (
            "" if loss is None or self.target == "loss" else f"  loss {loss:.4f}"
        )
        self._progress.update(self._task, completed=record["round"], description=shown)

    def close(self) -> None:
        self._progress.stop()
