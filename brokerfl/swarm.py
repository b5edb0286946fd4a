"""Swarm peers: client processes that can each hold the aggregator role (``workflow: swarm``).

A peer is its client workers plus one aggregator candidate: a worker on the run's
aggregation queue (single active consumer) running ``handlers/workflows/swarm.py`` over a
:class:`BrokerModelStore` (the versions live on the broker, not on any peer's disk). The
peer runs until its clients have been told to exit and, if it held the role, until its
aggregator has finished. ``brokerfl client`` runs a peer when the config says swarm;
``brokerfl simulate`` runs every peer in one process.
"""

from __future__ import annotations

import importlib
import time
from pathlib import Path
from typing import Callable

from brokerfl.broker_store import BrokerModelStore
from brokerfl.model_refs import ModelCache
from brokerfl.config import RunConfig
from brokerfl.metrics import MetricsLog, plot_curve
from brokerfl.roles import client_worker, topology_for
from brokerfl.transport import Transport
from brokerfl.worker import Worker

SWARM_HANDLERS = "handlers.workflows.swarm"


def aggregator_worker(transport: Transport, store_transport: Transport, config: RunConfig, metrics: MetricsLog, *, name: str, journal: bool | None = None) -> Worker:
    if journal is not None:
        config = config.model_copy(update={"journal": journal})
    topology = topology_for(config)
    topology.declare(transport)
    module = importlib.import_module(SWARM_HANDLERS)
    state = module.make_state(config, BrokerModelStore(store_transport, topology), metrics)
    return Worker(transport, topology, topology.server_queue, module.table, state, name=name, prefetch=max(2 * config.clients, 16))


def peer_done(clients: list[Worker], aggregator: Worker) -> bool:
    """Clients have exited; a candidate that never held the role has nothing to finish."""
    if not all(c.stopped for c in clients):
        return False
    if not aggregator.state.active and not aggregator.stopped:
        aggregator.stop()
    return aggregator.stopped


def run_peer(connect: Callable[[], Transport], config: RunConfig, client_ids: list[str], out: Path, *, poll_s: float = 0.5) -> int:
    """One peer process over RabbitMQ: ``connect()`` opens a connection (two are used: the
    workers', and the model store's, which reads the models stream while a handler runs)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    with connect() as transport, connect() as store_transport:
        models = ModelCache(store_transport, topology_for(config))  # one copy of each version for all these clients
        clients = [client_worker(transport, config, cid, models=models) for cid in client_ids]
        aggregator = aggregator_worker(transport, store_transport, config, metrics, name=f"aggregator.{'+'.join(client_ids)}")
        workers = [*clients, aggregator]
        for worker in workers:
            worker.start()
        while not peer_done(clients, aggregator):
            timers = [t for w in workers if not w.stopped and (t := w.next_timer_in()) is not None]
            transport.poll(max(0.0, min([poll_s, *timers])))
            for worker in workers:
                if not worker.stopped:
                    worker.fire_due_timers()
    state = aggregator.state
    if state.active and metrics.path and metrics.path.exists():
        from brokerfl.metrics import read_metrics

        plot_curve(read_metrics(metrics.path), out / "curve.png", title=f"{config.run}: swarm, {config.clients} clients")
    return 1 if state.active and state.failure else 0


def simulate_swarm(config: RunConfig, out: Path | None, broker, *, journal: bool, progress_bar=None):
    """Every peer (one client each) in this process on ``broker``; returns (records, the
    state of the last aggregator that held the role, its store)."""
    from brokerfl.transports.local import LocalTransport

    metrics = MetricsLog(out / "metrics.jsonl" if out else None)
    peers = []
    for cid in config.client_ids():
        client = client_worker(LocalTransport(broker), config, cid, journal=journal)
        aggregator = aggregator_worker(LocalTransport(broker), LocalTransport(broker), config, metrics, name=f"aggregator.{cid}", journal=journal)
        if progress_bar:
            aggregator.state.on_round.append(progress_bar.update)
        peers.append(([client], aggregator))
    workers = [w for clients, aggregator in peers for w in (*clients, aggregator)]
    for worker in workers:
        worker.start()
    try:
        while not all(peer_done(clients, aggregator) for clients, aggregator in peers):
            if sum(w.step(0.0) for w in workers):
                continue
            timers = [t for w in workers if not w.stopped and (t := w.next_timer_in()) is not None]
            if not timers:
                raise RuntimeError("the swarm stalled: no message is in flight and no one waits for one")
            time.sleep(max(0.0, min(timers)))
    finally:
        for worker in workers:
            worker.transport.close()
    holders = [aggregator for _, aggregator in peers if aggregator.state.active]
    last = max(holders, key=lambda a: a.state.model.version if a.state.model else -1)
    if out is not None and metrics.records:
        plot_curve(metrics.records, out / "curve.png", title=f"{config.run}: swarm, {config.clients} clients")
    return metrics.records, last.state, last.state.store
