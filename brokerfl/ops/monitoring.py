"""Prometheus metrics of a server or client process (``--metrics-port``).

Counters and histograms follow Prometheus's conventions: per process, starting at zero
when the process starts (a restarted server counts from zero; ``metrics.jsonl`` keeps the
run's whole history). What is read from a worker or the server's state is read at scrape
time, from the HTTP server's thread; those reads are of counters and of lengths (no lock
is needed for values that are only ever replaced or appended to).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from brokerfl.runtime.worker import DEAD_LETTER_KINDS

PREFIX = "brokerfl"
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# A dropped update's reason, in a few words without ids (label values must stay few).
_DROP_KINDS = (
    (re.compile(r"^duplicate"), "duplicate"),
    (re.compile(r"^late"), "late"),
    (re.compile(r"^stale"), "stale"),
    (re.compile(r"not sampled"), "not_sampled"),
    (re.compile(r"already answered"), "already_answered"),
    (re.compile(r"too few answers|abandoned"), "round_abandoned"),
    (re.compile(r"^aborted"), "aborted"),
    (re.compile(r"staleness"), "too_stale"),
)


def drop_kind(reason: str) -> str:
    return next((kind for pattern, kind in _DROP_KINDS if pattern.search(reason)), "other")


class WorkerCollector:
    """Messages handled, bytes in and out, dead letters by kind, of one or more workers."""

    def __init__(self, workers: Iterable[Any], role: str) -> None:
        self.workers = list(workers)
        self.role = role

    def collect(self):
        handled = CounterMetricFamily(f"{PREFIX}_messages_handled", "Messages (and timers) handled", labels=["role"])
        handled.add_metric([self.role], sum(w.handled for w in self.workers))
        bytes_in = CounterMetricFamily(f"{PREFIX}_bytes_in", "Message body bytes received", labels=["role"])
        bytes_in.add_metric([self.role], sum(w.bytes_in for w in self.workers))
        bytes_out = CounterMetricFamily(f"{PREFIX}_bytes_out", "Message body bytes published", labels=["role"])
        bytes_out.add_metric([self.role], sum(w.bytes_out for w in self.workers))
        dead = CounterMetricFamily(
            f"{PREFIX}_dead_lettered", "Messages dead-lettered, by kind of reason", labels=["role", "kind"]
        )
        kinds: Counter[str] = Counter()
        for worker in self.workers:
            kinds.update(dict(worker.dead_letter_kinds))
        for kind in DEAD_LETTER_KINDS:
            dead.add_metric([self.role, kind], kinds.get(kind, 0))
        yield from (handled, bytes_in, bytes_out, dead)


class ServerCollector:
    """What the server's state holds: live clients, held updates, dropped updates by reason."""

    def __init__(
        self, state: Any, live_clients: Callable[[Any], list[str]], held_updates: Callable[[Any], int]
    ) -> None:
        self.state = state
        self.live_clients = live_clients
        self.held_updates = held_updates

    def _count_live(self) -> int:
        # The worker's thread may add a client while this thread iterates over them.
        for _ in range(5):
            try:
                return len(self.live_clients(self.state))
            except RuntimeError:  # dictionary changed size during iteration: look again
                continue
        return len(self.live_clients(self.state))

    def collect(self):
        state = self.state
        live = GaugeMetricFamily(f"{PREFIX}_live_clients", "Clients the server counts as live (not removed)")
        live.add_metric([], self._count_live())
        held = GaugeMetricFamily(f"{PREFIX}_held_updates", "Updates folded and held unacked, in no stored version yet")
        held.add_metric([], self.held_updates(state))
        dropped = CounterMetricFamily(
            f"{PREFIX}_updates_dropped", "Updates acked without being folded, by reason", labels=["reason"]
        )
        for kind, count in sorted(Counter(drop_kind(reason) for _, reason in list(state.dropped)).items()):
            dropped.add_metric([kind], count)
        version = GaugeMetricFamily(f"{PREFIX}_model_version", "The newest stored model version")
        version.add_metric([], state.model.version if state.model else 0)
        paused = GaugeMetricFamily(f"{PREFIX}_paused", "1 while an operator has paused the rounds")
        paused.add_metric([], 1 if state.admin.paused else 0)
        # clients train aside, beating meanwhile: their heartbeats say so
        training = GaugeMetricFamily(
            f"{PREFIX}_training_clients", "Clients whose last heartbeat says they are training"
        )
        training.add_metric(
            [], sum(1 for record in list(state.clients.values()) if getattr(record, "training_s", None) is not None)
        )
        yield from (live, held, dropped, version, paused, training)


class RoundMetrics:
    """Fed by the server's per-version record (``state.on_round``): versions stored, updates
    folded, round durations and where the server's time went."""

    def __init__(self, registry: CollectorRegistry) -> None:
        from prometheus_client import Counter as PromCounter

        self.rounds = PromCounter(
            f"{PREFIX}_rounds",
            "Model versions stored by this process (a round each, for synchronous strategies)",
            registry=registry,
        )
        self.folded = PromCounter(
            f"{PREFIX}_updates_folded", "Updates folded into stored model versions", registry=registry
        )
        self.duration = Histogram(
            f"{PREFIX}_round_duration_seconds",
            "Wall time of a round (start to stored version)",
            buckets=ROUND_BUCKETS,
            registry=registry,
        )
        self.phases = Histogram(
            f"{PREFIX}_server_phase_seconds",
            "Server time per round in each phase (brokerfl.runtime.timing)",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=registry,
        )
        self.client_train = Histogram(
            f"{PREFIX}_client_train_seconds",
            "Mean training time the round's clients reported",
            buckets=PHASE_BUCKETS,
            registry=registry,
        )

    def __call__(self, record: dict[str, Any]) -> None:
        self.rounds.inc()
        self.folded.inc(record.get("num_updates", 0))
        if record.get("duration_s") is not None:
            self.duration.observe(record["duration_s"])
        for phase, seconds in (record.get("server_s") or {}).items():
            self.phases.labels(phase=phase).observe(seconds)
        if record.get("client_train_s"):
            self.client_train.observe(record["client_train_s"])


def serve_server_metrics(
    port: int,
    worker: Any,
    live_clients: Callable[[Any], list[str]],
    held_updates: Callable[[Any], int],
    *,
    addr: str = "0.0.0.0",
) -> CollectorRegistry:
    """Expose a server worker's metrics on ``http://addr:port/metrics``; ``live_clients``
    and ``held_updates`` read the server's state (the handler set's own functions)."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector([worker], "server"))
    registry.register(ServerCollector(worker.state, live_clients, held_updates))
    worker.state.on_round.append(RoundMetrics(registry))
    start_http_server(port, addr=addr, registry=registry)
    return registry


def serve_client_metrics(port: int, workers: list[Any], *, addr: str = "0.0.0.0") -> CollectorRegistry:
    """Expose the metrics of a client process's logical clients (summed) on ``port``."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(workers, "client"))
    start_http_server(port, addr=addr, registry=registry)
    return registry
