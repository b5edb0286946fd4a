"""Swarm peers: client processes that can each hold the aggregator role (``workflow: swarm``).

A peer is its client workers plus one aggregator candidate: a worker on the run's
aggregation queue (single active consumer) running ``handlers/workflows/swarm.py`` over a
:class:`BrokerModelStore` (the versions live on the broker, not on any peer's disk). The
peer runs until its clients have been told to exit and, if it held the role, until its
aggregator has finished. ``brokerfl client`` runs a peer when the config says swarm;
``brokerfl simulate`` runs every peer in one process.

Leaving: nobody leaves an update behind. An update can reach the aggregation queue after
the aggregator that finished the run has drained and stopped (a restarted peer answers a
task from before the run ended). Nobody would ever take it, and accounting would call it
lost. So a peer whose clients have exited keeps a candidate consuming (a fresh one if its
own held the role and stopped after its drain) and asks the broker about the queue every
``SETTLE_S``; it stops the candidate and leaves after ``QUIET_LOOKS`` answers in a row
found no message waiting. A waiting message is taken by the active consumer: this peer's
candidate (it takes the role, finds the run finished in the stored versions and records
every leftover update as dropped, "late: the run is finished", during its drain; then a
fresh candidate looks again) or another peer's, which is still there and leaves the same
way later. The last to leave is the only consumer, so nothing that waits can miss it.

Why not "stop, then ask whether anyone still consumes": RabbitMQ's answer about a quorum
queue cannot carry that. It counts only the active consumer of a single-active-consumer
queue; a consumer that stopped while deliveries were on their way to it still counts
(and holds them) until the broker has processed its channel's end; and when the queue
does not reply within 250 ms (a loaded broker) the answer is 0 messages and 0 consumers.
Asked while our own candidate consumes, a valid answer counts at least one consumer, so
an answer of 0 consumers is no answer and is asked again; and a candidate stops only after
looks that found nothing waiting. A message that reaches the queue after those looks
comes from a client still running, whose peer is still there to take it.

Fencing: the role belongs to the queue's active consumer. A holder whose consumer is
subscribed anew (its connection or channel was lost, or it re-subscribed for prefetch)
lines up behind the other candidates, one of which the broker made active and gave the
updates the holder had not acked. Its state still says it holds the role and its timers
would close a round and store a version the new holder stores too. So a peer checks
after every poll, before its timers fire (:meth:`Peer.fence`): such a holder stops (what
it holds goes back) and a fresh candidate takes its place, which takes the role again,
from the stored versions, if no one else holds it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import structlog

from brokerfl.assembly.roles import client_worker, coordinator_table, prepared, topology_for, workflow_module
from brokerfl.config import RunConfig
from brokerfl.runtime.worker import Worker
from brokerfl.storage.broker_store import BrokerModelStore
from brokerfl.storage.metrics_log import MetricsLog, plot_curve
from brokerfl.storage.model_refs import ModelCache
from brokerfl.transports.base import Transport

log = structlog.get_logger("brokerfl.assembly.swarm_peers")

# A leaving peer asks the broker about the aggregation queue this often, and leaves after
# QUIET_LOOKS answers in a row found nothing waiting while its candidate consumed.
SETTLE_S = 0.5
QUIET_LOOKS = 3
UNANSWERED_LOOKS = 20  # answers in a row without our own consumer before it subscribes again


def aggregator_worker(
    transport: Transport,
    store_transport: Transport,
    config: RunConfig,
    metrics: MetricsLog,
    *,
    name: str,
    journal: bool | None = None,
) -> Worker:
    if journal is not None:
        config = config.model_copy(update={"journal": journal})
    topology = topology_for(config)
    if config.identity.enforce:  # a peer is a client user: provisioning declared the queues
        topology.check(transport)
    else:
        topology.declare(transport)
    module = workflow_module(config, "server_handlers")  # brokerfl.handlers.workflows.swarm
    table = coordinator_table(config, module)
    state = prepared(table, module.make_state(config, BrokerModelStore(store_transport, topology), metrics))
    return Worker(
        transport, topology, topology.server_queue, table, state, name=name, prefetch=max(2 * config.clients, 16)
    )


class Peer:
    """One peer's client workers and aggregator candidate, and its way out (see the module
    docstring). ``new_candidate()`` builds a fresh (unstarted) aggregator candidate;
    ``transport`` asks the broker about the aggregation queue. Call :meth:`fence` after
    every poll, before the workers' timers fire, and :meth:`tick` after them; the peer is
    finished when :attr:`done`."""

    def __init__(
        self, clients: list[Worker], new_candidate: Callable[[], Worker], transport: Transport, *, clock=time.monotonic
    ) -> None:
        self.clients, self.new_candidate, self.transport, self.clock = clients, new_candidate, transport, clock
        self.candidate = new_candidate()
        self.holders: list[Worker] = []  # candidates of this peer that took the role
        self.retired: list[Worker] = []  # candidates replaced by a new one (after a drain, or fenced)
        self.sweeps = 0  # fresh candidates started to look for leftovers after the clients exited
        self.done = False
        self._next_look: float | None = None  # leaving: when to ask the broker next
        self._quiet = 0  # leaving: answers in a row that found nothing waiting
        self._unanswered = 0  # leaving: answers in a row that counted no consumer

    @property
    def workers(self) -> list[Worker]:
        return [*self.clients, self.candidate]

    def start(self) -> None:
        for worker in self.workers:
            worker.start()

    def fence(self) -> None:
        """Give the role up if the holder's consumer was subscribed anew (see the module
        docstring); call it after every poll, before the workers' timers fire."""
        candidate = self.candidate
        if candidate.state.active and candidate not in self.holders:
            self.holders.append(candidate)
        if self.done or candidate.stopped or not candidate.state.active or not candidate.resubscribed:
            return
        log.warning(
            "aggregator role given up: its consumer was subscribed anew",
            role=candidate.name,
            round=candidate.state.round,
        )
        self._replace_candidate()

    def _replace_candidate(self) -> None:
        candidate = self.candidate
        if not candidate.stopped:
            candidate.stop()  # what it held unacked goes back to the queue
        self.retired.append(candidate)
        self.candidate = self.new_candidate()
        self.candidate.start()

    def tick(self) -> None:
        if self.done:
            return
        self.fence()
        if not all(c.stopped for c in self.clients):
            return
        candidate = self.candidate
        if candidate.state.active and not candidate.stopped:
            self._next_look, self._quiet = None, 0
            return  # it runs the run, or drains after it: it stops itself
        if candidate.stopped:  # a holder that finished: a fresh candidate looks for leftovers
            self.sweeps += 1
            self._replace_candidate()
            self._next_look, self._quiet = None, 0
        now = self.clock()
        if self._next_look is None:
            self._next_look = now + SETTLE_S  # deliveries on their way to the candidate arrive meanwhile
            return
        if now < self._next_look:
            return
        self._next_look = now + SETTLE_S
        info = self.transport.queue_info(candidate.queue)
        if info.consumers == 0:
            # not an answer: our candidate consumes (RabbitMQ says 0 and 0 when the queue
            # is slow to reply); if it keeps saying so, our candidate's consumer may be gone
            # (its transport gave it up): a fresh candidate subscribes again
            self._unanswered += 1
            if self._unanswered >= UNANSWERED_LOOKS:
                self._unanswered = self._quiet = 0
                self._replace_candidate()
            return
        self._unanswered = 0
        if info.messages_ready > 0:
            self._quiet = 0  # the active consumer takes them: ours (it then holds the role) or another peer's
            return
        self._quiet += 1
        if self._quiet >= QUIET_LOOKS:
            candidate.stop()
            self.done = True

    def next_check_in(self) -> float | None:
        """When :meth:`tick` next has something to look at while no message arrives."""
        if self.done or self._next_look is None:
            return None
        return max(0.0, self._next_look - self.clock())

    @property
    def failure(self) -> str | None:
        return next((h.state.failure for h in self.holders if h.state.failure), None)


def run_peer(
    connect: Callable[[], Transport], config: RunConfig, client_ids: list[str], out: Path, *, poll_s: float = 0.5
) -> int:
    """One peer process over RabbitMQ: ``connect()`` opens a connection (two are used: the
    workers', and the model store's, which reads the models stream while a handler runs)."""
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    with connect() as transport, connect() as store_transport:
        models = ModelCache(store_transport, topology_for(config))  # one copy of each version for all these clients
        clients = [client_worker(transport, config, cid, models=models) for cid in client_ids]
        name = f"aggregator.{'+'.join(client_ids)}"
        peer = Peer(
            clients, lambda: aggregator_worker(transport, store_transport, config, metrics, name=name), transport
        )
        peer.start()
        while not peer.done:
            live = [w for w in peer.workers if not w.stopped]
            waits = [t for w in live if (t := w.next_timer_in()) is not None]
            if (check := peer.next_check_in()) is not None:
                waits.append(check)
            transport.poll(max(0.0, min([poll_s, *waits])))
            peer.fence()  # before a timer of a holder that lost the role acts on it
            for worker in peer.workers:
                if not worker.stopped:
                    worker.fire_due_timers()
            peer.tick()
    if peer.holders and metrics.path and metrics.path.exists():
        from brokerfl.storage.metrics_log import read_metrics

        plot_curve(
            read_metrics(metrics.path), out / "curve.png", title=f"{config.run}: swarm, {config.clients} clients"
        )
    return 1 if peer.failure else 0


def simulate_swarm(config: RunConfig, out: Path | None, broker, *, journal: bool, progress_bar=None):
    """Every peer (one client each) in this process on ``broker``; returns (records, the
    state of the last aggregator that held the role, its store)."""
    metrics = MetricsLog(out / "metrics.jsonl" if out else None)
    if config.identity.enforce:  # as the operator's definitions would: peers may declare nothing
        from brokerfl.transports.local import LocalTransport

        topology_for(config, journal=journal).declare_provisioned(LocalTransport(broker), config.client_ids())
    peers = [
        simulated_peer(config, broker, cid, metrics, journal=journal, progress_bar=progress_bar)
        for cid in config.client_ids()
    ]
    for peer in peers:
        peer.start()
    try:
        run_peers(peers)
    finally:
        for peer in peers:
            for worker in [*peer.workers, *peer.retired, peer.transport]:
                (worker.transport if isinstance(worker, Worker) else worker).close()
    holders = [h for peer in peers for h in peer.holders]
    last = max(holders, key=lambda a: a.state.model.version if a.state.model else -1)
    if out is not None and metrics.records:
        plot_curve(metrics.records, out / "curve.png", title=f"{config.run}: swarm, {config.clients} clients")
    return metrics.records, last.state, last.state.store


def simulated_peer(
    config: RunConfig, broker, client_id: str, metrics: MetricsLog, *, journal: bool, progress_bar=None
) -> Peer:
    """A peer with one client on the in-process ``broker`` (each worker on its own transport)."""
    from brokerfl.transports.local import LocalTransport

    def new_candidate() -> Worker:
        aggregator = aggregator_worker(
            LocalTransport(broker),
            LocalTransport(broker),
            config,
            metrics,
            name=f"aggregator.{client_id}",
            journal=journal,
        )
        if progress_bar:
            aggregator.state.on_round.append(progress_bar.update)
        return aggregator

    return Peer(
        [client_worker(LocalTransport(broker), config, client_id, journal=journal)],
        new_candidate,
        LocalTransport(broker),
    )


def run_peers(peers: list[Peer], *, until: Callable[[], bool] | None = None, deadline_s: float | None = None) -> None:
    """Step in-process peers until every one is done (or ``until()``, or the deadline)."""
    finished = until if until is not None else (lambda: all(p.done for p in peers))
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    while not finished():
        if deadline is not None and time.monotonic() > deadline:
            return
        handled = sum(w.step(0.0) for p in peers if not p.done for w in p.workers if not w.stopped)
        for peer in peers:
            peer.tick()
        if handled:
            continue
        waits = [
            t for p in peers if not p.done for w in p.workers if not w.stopped and (t := w.next_timer_in()) is not None
        ]
        waits += [t for p in peers if (t := p.next_check_in()) is not None]
        if not waits:
            if all(p.done for p in peers):
                return
            raise RuntimeError("the swarm stalled: no message is in flight and no one waits for one")
        time.sleep(max(0.0, min(waits)))
