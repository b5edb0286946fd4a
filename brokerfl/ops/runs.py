"""The runs on a broker, as things: each run's state (waiting, training, paused, finished,
aborted, crashed), round, version and newest score, read from the broker alone.

Read by ``brokerfl runs`` and the dashboard (``brokerfl.ops.dashboard``) through
:func:`list_runs`, one :class:`RunSummary` per run.

Design: AMQP cannot list queues, and the management plugin is not enabled on brokers in
general, so the broker keeps a *registry*: the stream ``brokerfl.runs`` (one per vhost,
bounded by size and age), bound to every run's exchange for the routing keys ``runs.#``.
A server appends small :class:`~brokerfl.runtime.operator_commands.RunRecord` messages
(``handlers/workflows/run_records.py``): ``started``, each change of state (``training``,
``paused``, resumed), at most one ``progress`` per stored version, and its end
(``finished`` or ``aborted``, with the reason); ``brokerfl delete-run`` appends ``deleted``,
after which the run is no longer listed. A reader takes the stream from its first offset
and folds it into one summary per run.

Why a stream: it keeps its history for any number of readers without anyone consuming it
away (a queue would be emptied by the first reader), and it is declared once per vhost, so
listing needs no name of a run. Why through the run's exchange: the server publishes it as
it publishes everything else (confirmed before the message that caused it is acked), and the
rights a provisioned run already has decide who may: the server's topic permissions allow
``runs.*``, a client's do not; only the run's admin may read the stream.

Trust: with identity enforced RabbitMQ checks every message's ``user_id`` against its
connection's user, so a record is counted for run R only if its publisher is R's server or
admin user (``<R>-server``, ``<R>-admin``) when any record of R came from one of them, else
only from the user that published R's first record (unprovisioned runs: all one user),
unless its name makes it another run's participant. Without identity the registry is as
trustworthy as the one user every process shares.

"Crashed" is decided live, not recorded (a killed server records nothing): a run whose
newest record is not its end and whose server queue has no consumer.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from brokerfl.runtime.identity import admin_user, server_user
from brokerfl.runtime.operator_commands import RunRecord
from brokerfl.transports.base import Delivery, Transport, TransportError
from brokerfl.transports.topology import REGISTRY_STREAM, RunTopology
from brokerfl.wire.codec import DecodeError
from brokerfl.wire.message import from_wire
from brokerfl.wire.names import bounded

RUN_STATES = ("waiting", "training", "paused", "finished", "aborted", "crashed")
ENDED = ("finished", "aborted")
STREAM_OFFSET_HEADER = "x-stream-offset"  # the broker's: where a stream delivery sits
QUIET_S = 0.2  # past the registry's last known offset, this long without a delivery ends the read


@dataclass(frozen=True)
class RunSummary:
    run: str
    state: str  # one of RUN_STATES
    reason: str | None = None  # why it was aborted or crashed (attacker-controllable text: escape it)
    round: int | None = None  # the open (or last) round
    rounds: int | None = None  # the planned rounds
    model_version: int | None = None
    metric_name: str | None = None  # the run's target metric (e.g. accuracy), else None
    metric_value: float | None = None  # its newest value
    started_at: float | None = None  # unix seconds
    finished_at: float | None = None  # unix seconds
    dropped_updates: int | None = None  # the run's, as its newest record says
    updated_at: float | None = None  # unix seconds of its newest record

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Run:
    """A run's summary while the registry is folded."""

    run: str
    state: str = "waiting"
    reason: str | None = None
    round: int | None = None
    rounds: int | None = None
    model_version: int | None = None
    metric_name: str | None = None
    metric_value: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    dropped_updates: int | None = None
    updated_at: float | None = None
    users: set[str] = field(default_factory=set)

    def summary(self) -> RunSummary:
        values = {k: v for k, v in vars(self).items() if k != "users"}
        return RunSummary(**values)


def list_runs(transport: Transport, *, timeout: float = 2.0) -> list[RunSummary]:
    """Every run the broker knows of, newest first; [] if the broker has no registry.
    TransportError if it cannot be read (e.g. a user without the right to read it)."""
    records = read_registry(transport, timeout=timeout)
    summaries = fold(records)
    return sorted(
        (live_state(transport, s) for s in summaries),
        key=lambda s: s.started_at or s.updated_at or 0.0,
        reverse=True,
    )


def run_summary(transport: Transport, run: str, *, timeout: float = 2.0) -> RunSummary | None:
    """One run's summary (None if the registry knows no such run, or has none)."""
    return next((s for s in list_runs(transport, timeout=timeout) if s.run == run), None)


def read_registry(transport: Transport, *, timeout: float = 2.0) -> list[RunRecord]:
    """The registry's readable records, oldest first (others are skipped). The end of a
    stream is not told to a reader: the offset of the newest chunk's first record is learnt
    first (a consumer from ``last``), then the stream is read from ``first`` to past it,
    until the deliveries stop for a moment. An empty registry costs ``timeout``."""
    try:
        transport.queue_info(REGISTRY_STREAM)
    except TransportError as exc:
        if "no queue" in str(exc):
            return []
        raise
    last = _newest_offset(transport, timeout)
    if last is None:
        return []
    records: list[RunRecord] = []
    for delivery in _read_from_first(transport, last, timeout):
        record = _record(delivery)
        if record is not None:
            records.append(record)
    return records


def _offset(delivery: Delivery) -> int | None:
    offset = delivery.envelope.headers.get(STREAM_OFFSET_HEADER)
    return offset if isinstance(offset, int) and not isinstance(offset, bool) else None


def _collect(transport: Transport, offset: Any, stop: Any, timeout: float) -> list[Delivery]:
    """Deliveries of the registry from ``offset`` until ``stop(deliveries)`` says so and
    none came for QUIET_S, or nothing came for ``timeout``."""
    got: list[Delivery] = []
    tag = transport.consume(REGISTRY_STREAM, got.append, prefetch=500, offset=offset)
    try:
        seen, silent_since = 0, time.monotonic()
        while True:
            transport.poll(0.05)
            for delivery in got[seen:]:
                transport.ack(delivery)
            now = time.monotonic()
            if len(got) > seen:
                seen, silent_since = len(got), now
            elif (stop(got) and now - silent_since >= QUIET_S) or now - silent_since >= timeout:
                return got
    finally:
        transport.cancel(tag)


def _newest_offset(transport: Transport, timeout: float) -> int | None:
    offsets = [o for d in _collect(transport, "last", lambda got: bool(got), timeout) if (o := _offset(d)) is not None]
    return max(offsets) if offsets else None


def _read_from_first(transport: Transport, last: int, timeout: float) -> list[Delivery]:
    def past_last(got: list[Delivery]) -> bool:
        return bool(got) and (_offset(got[-1]) or 0) >= last

    return _collect(transport, "first", past_last, timeout)


def _record(delivery: Delivery) -> RunRecord | None:
    if delivery.problem or delivery.envelope.type != RunRecord.TYPE:
        return None
    try:
        message = from_wire(delivery.envelope, delivery.body)
    except (DecodeError, ValueError, TypeError):
        return None
    return message if isinstance(message, RunRecord) else None


def trusted_users(run: str, users: Iterable[str]) -> set[str]:
    """Whose records count for ``run``, of the ``users`` that published them (in order):
    its server and admin users if any of them did, else the first publisher, unless that is
    another run's participant by its name (a provisioned server inventing a run)."""
    users = list(users)
    try:
        named = {server_user(run), admin_user(run)}
    except ValueError:  # not a run name: nobody's records count
        return set()
    if named & set(users):
        return named
    first = users[:1]
    if first and (first[0].endswith(("-server", "-admin")) or "-client-" in first[0]):
        return set()
    return set(first)


def fold(records: Iterable[RunRecord]) -> list[RunSummary]:
    """One summary per run from its records, oldest first (live state not applied: see
    :func:`live_state`)."""
    records = list(records)
    publishers: dict[str, list[str]] = {}
    for record in records:
        publishers.setdefault(record.run, []).append(record.user_id)
    trust = {run: trusted_users(run, users) for run, users in publishers.items()}
    runs: dict[str, _Run] = {}
    for record in records:
        if record.user_id not in trust.get(record.run, set()):
            continue  # forged, or another run's server writing about this one
        if record.event == "deleted":
            runs.pop(record.run, None)
            continue
        run = runs.get(record.run)
        if run is None:
            run = runs[record.run] = _Run(record.run, started_at=record.timestamp)
        _apply(run, record)
    return [run.summary() for run in runs.values()]


def _apply(run: _Run, record: RunRecord) -> None:
    event = record.event
    run.updated_at = record.timestamp
    run.round = record.round
    run.model_version = record.model_version
    if record.rounds is not None:
        run.rounds = record.rounds
    if record.dropped_updates is not None:
        run.dropped_updates = record.dropped_updates
    if record.metric_name:
        if record.metric_name != run.metric_name:
            run.metric_value = None
        run.metric_name = bounded(record.metric_name, 64)
        if record.metric_value is not None:
            run.metric_value = record.metric_value
    if event == "started":
        run.state, run.reason, run.finished_at = "waiting", None, None
    elif event in ("waiting", "training", "paused"):
        run.state = event
    elif event in ENDED:
        run.state, run.finished_at = event, record.timestamp
        run.reason = bounded(record.reason, 1000) or None
    # "progress" (and an event this version does not know) changes no state


def live_state(transport: Transport, summary: RunSummary) -> RunSummary:
    """A run that has not ended is ``crashed`` if no server consumes its server queue (or
    the queue is gone)."""
    if summary.state in ENDED:
        return summary
    queue = RunTopology(summary.run).server_queue
    try:
        consumers = transport.queue_info(queue).consumers
    except TransportError as exc:
        if "no queue" not in str(exc):
            raise
        return _crashed(summary, f"its server queue {queue} is gone")
    if consumers:
        return summary
    return _crashed(summary, f"no server consumes {queue} (its last record said {summary.state})")


def _crashed(summary: RunSummary, reason: str) -> RunSummary:
    values = summary.as_dict()
    values.update(state="crashed", reason=reason)
    return RunSummary(**values)


# ---------------------------------------------------------------- recording from outside a server


def record_deleted(transport: Transport, run: str, *, sender: str) -> None:
    """Say in the registry that ``run`` was deleted (``brokerfl delete-run``): straight to
    the stream (the run's exchange goes with the run); nothing if the broker has none."""
    from brokerfl.transports.base import UnroutableError
    from brokerfl.wire.message import to_wire

    envelope, body = to_wire(RunRecord(event="deleted", run=run, sender=sender))
    try:
        transport.publish("", REGISTRY_STREAM, envelope, body)
    except UnroutableError:
        pass  # no registry: nothing lists the run anyway


def silence_text(view: dict[str, Any], run: str) -> str:
    """Why a status has no server's view: the run's end as it recorded it, no server yet,
    no server now, or a busy one."""
    summary, silence = view.get("run"), view.get("silence")
    if summary and summary["state"] in ("finished", "aborted"):
        when = ""
        if summary.get("finished_at"):
            when = " at " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(summary["finished_at"]))
        reason = f" ({summary['reason']})" if summary.get("reason") else ""
        return (
            f"run {run} {summary['state']} at model version {summary['model_version']}, round {summary['round']} of "
            f"{summary['rounds']}{when}{reason}: queue depths only"
        )
    if silence == "absent":
        return f"no server of run {run} has started on this broker yet: queue depths only"
    if silence == "stopped":
        last = f" (its last record: {summary['state']}, round {summary['round']})" if summary else ""
        return f"no server of run {run} consumes its queue: stopped, crashed or still starting{last}; queue depths only"
    return "the server did not answer in time (busy): queue depths only"
