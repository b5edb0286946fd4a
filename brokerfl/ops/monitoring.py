"""Prometheus metrics of a server or client process (``--metrics-port``, ``--metrics-addr``).

Counters and histograms follow Prometheus's conventions: per process, starting at zero
when the process starts (a restarted server counts from zero; ``metrics.jsonl`` keeps the
run's whole history). What is read from a worker or the server's state is read at scrape
time, from the HTTP server's thread; those reads are of counters, of lengths and of values
that are only ever replaced (no lock: a scrape must not wait for a round being stored).

Every ``brokerfl_*`` series carries a ``run`` label set by the process itself. The run is a
fact the process knows and the scraper does not (one scrape job may find the processes of
many runs by port or by service discovery), so it is not left to relabelling; ``job`` and
``instance`` stay the scraper's target labels. ``process_*`` series (memory, CPU, open
files) are the standard ones of ``prometheus_client``'s process collector, without ``run``,
so the usual dashboards and rules for them apply unchanged.

Label values that come from the wire (client ids, the app's metric names) are bounded in
count: at most :data:`MAX_CLIENTS_EXPORTED` clients and :data:`MAX_METRIC_NAMES` metric
names per source, so a federation of thousands or a chatty app cannot blow up the series.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from brokerfl.runtime.worker import DEAD_LETTER_KINDS

PREFIX = "brokerfl"
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
PHASE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DEFAULT_ADDR = "127.0.0.1"  # a process's metrics are for its host unless told otherwise (--metrics-addr)
MAX_CLIENTS_EXPORTED = 200  # per-client series: the first ones by id; brokerfl_clients{state} counts all
MAX_METRIC_NAMES = 40  # per source (server, federated): the app's train_* and evaluation's metrics
MAX_METRIC_NAME_CHARS = 64  # as brokerfl.wire.app_metrics allows
CLIENT_STATES = ("live", "training", "silent", "removed", "unable")
METRIC_SOURCES = ("server", "federated")

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
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


class MetricsServeError(ValueError):
    """The metrics endpoint cannot listen (port in use, no such address): one line for the CLI."""


def drop_kind(reason: str) -> str:
    return next((kind for pattern, kind in _DROP_KINDS if pattern.search(reason)), "other")


class WorkerCollector:
    """Messages handled, bytes in and out, dead letters by kind, of one or more workers."""

    def __init__(self, workers: Iterable[Any], role: str) -> None:
        self.workers = list(workers)
        self.role = role

    def collect(self) -> Iterator[Metric]:
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


def _retrying(read: Callable[[], Any]) -> Any:
    # The worker's thread may add a client while this thread iterates over them.
    for _ in range(5):
        try:
            return read()
        except RuntimeError:  # dictionary changed size during iteration: look again
            continue
    return read()


def client_state(state: Any, client_id: str, record: Any, live: set[str]) -> str:
    """One word for a client, as the server sees it (:data:`CLIENT_STATES`)."""
    if client_id in state.admin.removed:
        return "removed"
    if client_id in state.unable:
        return "unable"
    if client_id not in live:
        return "silent"
    return "training" if getattr(record, "training_s", None) is not None else "live"


class ServerCollector:
    """What the server's state holds: the round, live clients and each client's state,
    held and dropped updates, the model version, paused or finished."""

    def __init__(
        self,
        state: Any,
        live_clients: Callable[[Any], list[str]],
        held_updates: Callable[[Any], int],
        workers: Iterable[Any] = (),
    ) -> None:
        self.state = state
        self.live_clients = live_clients
        self.held_updates = held_updates
        self.workers = list(workers)  # the server's: what passed the run's exchange (the journal's estimate)

    def collect(self) -> Iterator[Metric]:
        state = self.state
        config = state.config  # replaced whole when the operator changes rounds or min clients
        live_ids = set(_retrying(lambda: self.live_clients(state)))
        gauges = (
            ("live_clients", "Clients the server counts as live (not removed)", len(live_ids)),
            (
                "min_clients",
                "Clients a round needs (the config's, or the operator's set-min-clients)",
                config.strategy.min_clients,
            ),
            ("held_updates", "Updates folded and held unacked, in no stored version yet", self.held_updates(state)),
            ("model_version", "The newest stored model version", state.model.version if state.model else 0),
            ("paused", "1 while an operator has paused the rounds", 1 if state.admin.paused else 0),
            ("finished", "1 once the run has finished (the server drains, then exits)", 1 if state.done else 0),
            ("round", "The current round (the open one, or the last one closed); 0 before the first", state.round),
            ("rounds_planned", "Rounds the run will have (the config's, or the operator's set-rounds)", config.rounds),
            ("round_open", "1 while a synchronous round is open", 1 if state.round_open else 0),
        )
        for name, help_text, value in gauges:
            gauge = GaugeMetricFamily(f"{PREFIX}_{name}", help_text)
            gauge.add_metric([], value)
            yield gauge
        yield from self._deadline(state, config)
        dropped = CounterMetricFamily(
            f"{PREFIX}_updates_dropped", "Updates acked without being folded, by reason", labels=["reason"]
        )
        for kind, count in sorted(Counter(drop_kind(reason) for _, reason in list(state.dropped)).items()):
            dropped.add_metric([kind], count)
        yield dropped
        # clients train aside, beating meanwhile: their heartbeats say so
        records = _retrying(lambda: list(state.clients.items()))
        training = GaugeMetricFamily(
            f"{PREFIX}_training_clients", "Clients whose last heartbeat says they are training"
        )
        training.add_metric([], sum(1 for _, record in records if getattr(record, "training_s", None) is not None))
        yield training
        yield from self._clients(state, records, live_ids)
        yield from self._journal(config)

    def _journal(self, config: Any) -> Iterator[Metric]:
        # RabbitMQ reports no byte size of a stream (its Prometheus plugin neither): what the
        # journal holds is estimated from what this server saw pass the run's exchange, which
        # the journal is bound to whole (its updates in, its tasks and records out).
        if not getattr(config, "journal", False) or not config.journal_max_bytes:
            return
        limit = GaugeMetricFamily(f"{PREFIX}_journal_max_bytes", "The journal's retention by size (journal_max_bytes)")
        limit.add_metric([], config.journal_max_bytes)
        estimate = GaugeMetricFamily(
            f"{PREFIX}_journal_bytes_estimate",
            "Message bytes this server process received and published on the run's exchange (all journalled); "
            "from zero when the process starts",
        )
        estimate.add_metric([], sum(w.bytes_in + w.bytes_out for w in self.workers))
        yield from (limit, estimate)

    @staticmethod
    def _deadline(state: Any, config: Any) -> Iterator[Metric]:
        deadline_s = getattr(config.strategy, "round_deadline_s", None)
        if not state.round_open or deadline_s is None:
            return
        left = state.round_started + deadline_s - time.monotonic()
        due = GaugeMetricFamily(
            f"{PREFIX}_round_deadline_timestamp_seconds", "When the open round is due to close (Unix time)"
        )
        due.add_metric([], time.time() + left)
        remaining = GaugeMetricFamily(
            f"{PREFIX}_round_time_left_seconds",
            "Seconds until the open round's deadline, by this process's clock (negative: past it)",
        )
        remaining.add_metric([], left)
        yield from (due, remaining)

    @staticmethod
    def _clients(state: Any, records: list[tuple[str, Any]], live_ids: set[str]) -> Iterator[Metric]:
        now_wall, now = time.time(), time.monotonic()
        counts: Counter[str] = Counter()
        kinds = {}
        for client_id, record in records:
            kinds[client_id] = client_state(state, client_id, record, live_ids)
            counts[kinds[client_id]] += 1
        counts["unable"] += len(set(state.unable) - set(kinds))  # failed at their start before ever seen
        by_state = GaugeMetricFamily(f"{PREFIX}_clients", "Clients the server knows, by state", labels=["state"])
        for kind in CLIENT_STATES:
            by_state.add_metric([kind], counts.get(kind, 0))
        seen = GaugeMetricFamily(
            f"{PREFIX}_client_last_seen_timestamp_seconds",
            f"When the server last heard from a client (Unix time); the first {MAX_CLIENTS_EXPORTED} clients by id "
            "only (brokerfl_clients counts all)",
            labels=["client"],
        )
        one_hot = GaugeMetricFamily(
            f"{PREFIX}_client_state",
            f"1 for a client's state ({', '.join(CLIENT_STATES)}); the first {MAX_CLIENTS_EXPORTED} clients by id only",
            labels=["client", "state"],
        )
        shown = sorted(records, key=lambda item: (len(item[0]), item[0]))[:MAX_CLIENTS_EXPORTED]
        for client_id, record in shown:
            seen.add_metric([client_id], now_wall - (now - record.last_seen))
            for kind in CLIENT_STATES:
                one_hot.add_metric([client_id, kind], 1 if kinds[client_id] == kind else 0)
        yield from (by_state, seen, one_hot)


class ModelMetrics:
    """The newest model version's metrics (``source="server"``: the server's evaluation and
    the clients' combined ``train_*``) and the newest federated evaluation's
    (``source="federated"``), from the records the server writes to ``metrics.jsonl``."""

    def __init__(self) -> None:
        self.latest: dict[str, tuple[int, dict[str, float]]] = {}  # source -> (model version, metrics)

    def update(self, record: dict[str, Any]) -> None:
        source = "federated" if record.get("evaluation") == "federated" else "server"
        values: dict[str, float] = {}
        named = {"accuracy": record.get("accuracy"), "loss": record.get("loss"), **(record.get("metrics") or {})}
        for name, value in named.items():
            if len(values) >= MAX_METRIC_NAMES:
                break
            if (
                isinstance(name, str)
                and len(name) <= MAX_METRIC_NAME_CHARS
                and _METRIC_NAME.fullmatch(name)
                and isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                values[name] = float(value)
        self.latest = {**self.latest, source: (int(record.get("model_version") or 0), values)}  # replaced whole

    def collect(self) -> Iterator[Metric]:
        latest = self.latest
        metric = GaugeMetricFamily(
            f"{PREFIX}_model_metric",
            f"The app's metrics of the newest model version (source=server) and of the newest federated evaluation "
            f"(source=federated); at most {MAX_METRIC_NAMES} names per source",
            labels=["source", "metric"],
        )
        version = GaugeMetricFamily(
            f"{PREFIX}_model_metric_version", "The model version brokerfl_model_metric describes", labels=["source"]
        )
        for source in METRIC_SOURCES:
            if source in latest:
                number, values = latest[source]
                version.add_metric([source], number)
                for name, value in values.items():
                    metric.add_metric([source, name], value)
        yield from (metric, version)


class RoundMetrics:
    """Fed by the server's per-version record (``state.on_round``): versions stored, updates
    folded, round durations and where the server's time went; the newest metrics."""

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
        self.model = ModelMetrics()
        registry.register(self.model)

    def __call__(self, record: dict[str, Any]) -> None:
        self.model.update(record)
        if record.get("evaluation") == "federated":  # a federated evaluation's line: no version stored
            return
        self.rounds.inc()
        self.folded.inc(record.get("num_updates") or 0)
        if record.get("duration_s") is not None:
            self.duration.observe(record["duration_s"])
        for phase, seconds in (record.get("server_s") or {}).items():
            self.phases.labels(phase=phase).observe(seconds)
        if record.get("client_train_s"):
            self.client_train.observe(record["client_train_s"])


class RunLabelled:
    """Every family of ``inner`` with a ``run`` label added to each of its samples."""

    def __init__(self, inner: CollectorRegistry, run: str) -> None:
        self.inner = inner
        self.run = run

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [sample._replace(labels={**sample.labels, "run": self.run}) for sample in family.samples]
            yield family


class ProcessMetrics:
    """A process's ``/metrics`` endpoint: ``brokerfl_*`` series labelled with the run, and
    ``process_*``. It listens from the start (a port in use stops the process before it
    connects); the server's or clients' collectors are added once they exist."""

    def __init__(self, role: str, run: str, port: int, addr: str = DEFAULT_ADDR) -> None:
        self.role = role
        self.registry = CollectorRegistry()
        self.brokerfl = CollectorRegistry()  # the brokerfl_* families, before the run label
        self.registry.register(RunLabelled(self.brokerfl, run))
        ProcessCollector(registry=self.registry)  # process_* from /proc (Linux); nothing elsewhere
        self._active = 0  # brokerfl_server_active: 1 once this server holds the role
        if role == "server":
            self.brokerfl.register(_ServerRole(self))
        try:
            self._httpd, _ = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:  # EADDRINUSE, EACCES, an address not of this host, a name that resolves to none
            why = exc.strerror or str(exc)
            raise MetricsServeError(f"cannot serve metrics on {addr}:{port}: {why}") from None

    @property
    def address(self) -> tuple[str, int]:
        """The address and port the endpoint listens on."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        """Stop listening (the process's end does it too)."""
        self._httpd.shutdown()
        self._httpd.server_close()

    def server_role_taken(self) -> None:
        self._active = 1

    def attach_server(
        self, worker: Any, live_clients: Callable[[Any], list[str]], held_updates: Callable[[Any], int]
    ) -> None:
        self.brokerfl.register(WorkerCollector([worker], "server"))
        if hasattr(worker.state, "clients"):  # a brokerfl server's state (a Flower ServerApp's keeps no rounds here)
            self.brokerfl.register(ServerCollector(worker.state, live_clients, held_updates, [worker]))
        worker.state.on_round.append(RoundMetrics(self.brokerfl))

    def attach_clients(self, workers: list[Any]) -> None:
        self.brokerfl.register(WorkerCollector(workers, "client"))


class _ServerRole:
    def __init__(self, metrics: ProcessMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        active = GaugeMetricFamily(
            f"{PREFIX}_server_active", "1 for the server that holds the run's server role, 0 for a standby"
        )
        active.add_metric([], self.metrics._active)
        yield active


def serve_server_metrics(
    port: int,
    worker: Any,
    live_clients: Callable[[Any], list[str]],
    held_updates: Callable[[Any], int],
    *,
    addr: str = DEFAULT_ADDR,
) -> CollectorRegistry:
    """Expose a server worker's metrics on ``http://addr:port/metrics`` (in one step, for a
    server in a process of its own that holds the role); ``live_clients`` and
    ``held_updates`` read the server's state (the handler set's own functions)."""
    metrics = ProcessMetrics("server", worker.state.config.run, port, addr)
    metrics.server_role_taken()
    metrics.attach_server(worker, live_clients, held_updates)
    return metrics.registry


def serve_client_metrics(port: int, workers: list[Any], *, run: str, addr: str = DEFAULT_ADDR) -> CollectorRegistry:
    """Expose the metrics of a client process's logical clients (summed) on ``port``."""
    metrics = ProcessMetrics("client", run, port, addr)
    metrics.attach_clients(workers)
    return metrics.registry
