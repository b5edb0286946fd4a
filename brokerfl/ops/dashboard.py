"""``brokerfl dashboard``: a live web page of the runs on a broker, read from the broker alone.

One thread owns the broker connection (pika's is not thread-safe): every refresh it asks the
selected run's server for its status (``brokerfl status``'s view), reads what its journal
gained since the last refresh (model versions with their metrics, dead letters with their
reasons, admin replies and admin state), and now and then lists the runs. The HTTP handlers
only read the snapshot it leaves, and hand it jobs (select a run, an admin command, an
accounting) that it runs between refreshes.

Where the curves come from: the journal's version records (every model version since the
run's start, with its metrics) when the run keeps a journal, and the status replies (the
newest version's metrics) whatever it keeps: a run without a journal draws the versions the
page saw while it was open.

Everything from the wire (client ids, reasons, metric names, senders) is data to the page:
the page builds its DOM with ``textContent``, JSON is served as ``application/json``, and a
strict Content-Security-Policy forbids inline script. Admin commands are POST only, carry the
page's CSRF token in a header, and exist only when the dashboard was started with ``--admin``.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from brokerfl.config import RunConfig, load_config
from brokerfl.ops.inspection import dead_letter_origin
from brokerfl.ops.runs import RunSummary, list_runs, silence_text
from brokerfl.runtime.operator_commands import (
    AdminReply,
    AdminStateRecord,
    ask,
    client_id_order,
)
from brokerfl.storage.journal import JournalMark, Skipped
from brokerfl.transports.base import REASON_HEADER, Delivery, Transport, TransportError
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.message import ModelVersionStored, RunFinished
from brokerfl.wire.names import bounded, check_name

STATIC = Path(__file__).with_name("dashboard_static")
STATIC_FILES = {
    "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = {
    # no inline script or style, nothing from elsewhere: the page's own files only
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
KEPT_DEAD_LETTERS = 50  # the newest dead letters shown (all are counted)
KEPT_ADMIN_LOG = 50
DEAD_PEEK_EVERY_S = 10.0
MAX_CURVE_POINTS = 2000  # versions kept per run (the oldest go first)
RUNS_EVERY_S = 5.0  # how often the run list is asked for (it reads every run's state)
MAX_REQUEST_BYTES = 4096
GatherFn = Callable[..., dict[str, Any]]  # brokerfl.cli.operate.gather
AdminMessageFn = Callable[[str, list[str], argparse.Namespace], Any]  # brokerfl.cli.operate.admin_message


@dataclass
class RunWatch:
    """What the dashboard knows of one run: the newest status, and what the journal said so far."""

    config: RunConfig
    topology: RunTopology
    from_command_line: bool
    status_view: dict[str, Any] | None = None
    status_error: str | None = None
    last_status: dict[str, Any] | None = None  # the newest answer, shown (as such) once the server is gone
    last_status_at: float | None = None
    queued_dead: list[dict[str, Any]] = field(default_factory=list)  # in the dead-letter queue, not in the journal
    queued_dead_ready: int | None = None  # the queue's depth when it was last peeked at
    queued_dead_at: float = 0.0
    curve: dict[int, dict[str, Any]] = field(default_factory=dict)  # version -> {round, metrics}
    dead_letters: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT_DEAD_LETTERS))
    dead_by_kind: Counter[str] = field(default_factory=Counter)
    admin_log: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=KEPT_ADMIN_LOG))
    admin_state: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None
    journal_tag: str | None = None
    journal_note: str | None = None
    journal_records: int = 0
    pending: deque[Delivery] = field(default_factory=deque)
    skipped: Skipped = field(default_factory=Skipped)
    accounting: dict[str, Any] | None = None

    def add_point(self, version: int, round_: int | None, metrics: dict[str, Any], source: str) -> None:
        point = self.curve.setdefault(version, {"version": version, "round": round_, "metrics": {}, "source": source})
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                point["metrics"][bounded(name, 64)] = float(value)
        if round_ is not None and point["round"] is None:
            point["round"] = round_
        while len(self.curve) > MAX_CURVE_POINTS:
            del self.curve[min(self.curve)]


class Dashboard:
    """The broker's side of the page: one thread, one connection, a snapshot for the readers.

    ``connect()`` makes the broker connection (the command's, with its TLS options);
    ``gather`` and ``admin_message`` are ``brokerfl status``'s and ``brokerfl admin``'s
    (passed in: the command's layer is above this one)."""

    def __init__(
        self,
        connect: Callable[[], Transport],
        configs: Sequence[RunConfig],
        *,
        gather: GatherFn,
        admin_message: AdminMessageFn | None = None,
        amqp_url: str | None = None,
        interval: float = 1.0,
        status_timeout: float = 2.0,
        admin_timeout: float = 10.0,
        accounting: Callable[[RunConfig], str] | None = None,
        runs: Callable[[Transport], list[RunSummary]] | None = None,
    ) -> None:
        self.connect, self.gather, self.admin_message = connect, gather, admin_message
        self.amqp_url, self.interval = amqp_url, interval
        self.status_timeout, self.admin_timeout = status_timeout, admin_timeout
        self.accounting = accounting
        self.list_runs = runs or (lambda transport: list_runs(transport, timeout=2.0))
        self.admin = admin_message is not None
        self.configs = {c.run: c for c in configs}
        self.watches: dict[str, RunWatch] = {}
        self.selected: str | None = configs[0].run if configs else None
        self.runs: list[dict[str, Any]] = []
        self.runs_note: str | None = None
        self.broker_note: str | None = None
        self._runs_at = 0.0
        self._lock = threading.Lock()
        self._snapshot: dict[str, Any] = {}
        self._jobs: queue.Queue[tuple[Callable[[Transport], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._transport: Transport | None = None
        self.refreshes = 0

    # ------------------------------------------------------------ the owner thread

    def start(self) -> Dashboard:
        self._thread = threading.Thread(target=self._run, name="dashboard-broker", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, wait: bool = True) -> None:
        """Stop refreshing (``wait``: until the owner thread has closed its connection)."""
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                if self._transport is None:
                    self._transport = self.connect()
                    self.broker_note = None
                self._refresh(self._transport)
                self._do_jobs(self._transport, until=started + self.interval)
            except TransportError as exc:
                self.broker_note = f"broker: {bounded(str(exc), 300)}"
                self._drop_transport()
                self._publish()
                self._do_jobs(None, until=started + self.interval)
        self._drop_transport()

    def _drop_transport(self) -> None:
        if self._transport is not None:
            for watch in self.watches.values():
                _reset_journal(watch)  # its consumer is gone with the connection: read again from the start
            try:
                self._transport.close()
            except Exception:  # noqa: BLE001 - closing a broken connection: nothing to do about it
                pass
            self._transport = None

    def _do_jobs(self, transport: Transport | None, *, until: float) -> None:
        """Run the handlers' jobs until the next refresh is due."""
        while not self._stop.is_set():
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                job, future = self._jobs.get(timeout=min(left, 0.1))
            except queue.Empty:
                if transport is not None:
                    transport.poll(0)
                continue
            if transport is None:
                future.set_exception(TransportError(self.broker_note or "no broker connection"))
                continue
            try:
                future.set_result(job(transport))
            except Exception as exc:  # noqa: BLE001 - the job's error goes back to its HTTP request
                future.set_exception(exc)
            self._publish()

    def submit(self, job: Callable[[Transport], Any], timeout: float) -> Any:
        """Run ``job(transport)`` on the owner thread; its result (or its exception)."""
        future: Future[Any] = Future()
        self._jobs.put((job, future))
        return future.result(timeout=timeout)

    def _refresh(self, transport: Transport) -> None:
        now = time.monotonic()
        if now - self._runs_at >= RUNS_EVERY_S or not self._runs_at:
            self._runs_at = now
            self._list_runs(transport)
        if self.selected is not None:
            self._refresh_run(transport, self._watch(self.selected))
        self.refreshes += 1
        self._publish()

    def _list_runs(self, transport: Transport) -> None:
        try:
            self.runs = [_shown(summary.as_dict()) for summary in self.list_runs(transport)]
            self.runs_note = None
        except NotImplementedError:
            self.runs, self.runs_note = [], "run list not available"
        except TransportError as exc:
            self.runs, self.runs_note = [], f"run list not available: {bounded(str(exc), 200)}"
        if self.selected is None and self.runs:
            self.selected = str(self.runs[0]["run"])

    def _watch(self, run: str) -> RunWatch:
        watch = self.watches.get(run)
        if watch is None:
            from brokerfl.assembly.roles import topology_for

            config = self.configs.get(run) or load_config(None, {"run": run})
            watch = self.watches[run] = RunWatch(config, topology_for(config), run in self.configs)
        return watch

    def _refresh_run(self, transport: Transport, watch: RunWatch) -> None:
        try:
            view = self.gather(
                transport,
                watch.topology,
                watch.config.client_ids() if watch.from_command_line else [],
                timeout=self.status_timeout,
                amqp_url=self.amqp_url,
            )
            watch.status_view, watch.status_error = view, None
        except TransportError as exc:  # e.g. no server of the run has started yet
            watch.status_view, watch.status_error = None, bounded(str(exc), 300)
            return
        status = view.get("server")
        if status:
            watch.last_status, watch.last_status_at = status, time.time()
            if status.get("metrics_version") is not None and status.get("metrics"):
                watch.add_point(int(status["metrics_version"]), None, status["metrics"], "status")
            elif status.get("model_version") is not None:
                named = {k: status.get(k) for k in ("accuracy", "loss") if status.get(k) is not None}
                if named:
                    watch.add_point(int(status["model_version"]), None, named, "status")
        dead = view.get("queues", {}).get("dead letters")
        if dead is not None:
            self._peek_dead_letters(transport, watch, int(dead["ready"] or 0))
        if watch.topology.journal and "journal" in view.get("queues", {}):
            self._read_journal(transport, watch)
        elif not watch.topology.journal:
            watch.journal_note = "this run keeps no journal: curves from status replies only, no dead-letter reasons"

    # ------------------------------------------------------------ the dead-letter queue, peeked at

    def _peek_dead_letters(self, transport: Transport, watch: RunWatch, ready: int) -> None:
        """What the dead-letter queue holds now, without consuming it: its first messages
        taken and given back (requeued in place, in order). Only those the journal lacks are
        kept: every dead letter when the run keeps no journal, else the ones the broker
        dead-lettered itself (an expired request, a message rejected by a queue), which do
        not pass the run's exchange. Done again when the depth changes, else every
        :data:`DEAD_PEEK_EVERY_S`."""
        if ready == watch.queued_dead_ready and time.monotonic() - watch.queued_dead_at < DEAD_PEEK_EVERY_S:
            return
        watch.queued_dead_ready, watch.queued_dead_at = ready, time.monotonic()
        held: list[Delivery] = []
        try:
            while ready and len(held) < KEPT_DEAD_LETTERS and (d := transport.get(watch.topology.dead_queue)):
                held.append(d)
        finally:  # newest first: a broker that requeues at the head gets the order back too
            for d in reversed(held):
                transport.nack(d, requeue=True)
        rows = []
        for d in held:
            headers = d.envelope.headers
            ours = REASON_HEADER in headers
            if ours and watch.topology.journal:
                continue  # the journal's copy is shown, with its origin
            reason = (
                headers.get(REASON_HEADER)
                if ours
                else f"dead-lettered by the broker: {headers.get('x-first-death-reason', '?')} in queue "
                f"{headers.get('x-first-death-queue', '?')}"
            )
            rows.append(self._dead_row(d, watch, reason, "queue"))
        watch.queued_dead = rows[::-1]

    def _dead_row(self, d: Delivery, watch: RunWatch, reason: Any, where: str) -> dict[str, Any]:
        return {
            "kind": bounded(d.envelope.type, 64),
            "message_id": bounded(d.envelope.message_id, 64),
            "from": bounded(dead_letter_origin(d, watch.topology.run), 300),
            "reason": bounded(reason, 1000),
            "at": d.envelope.timestamp if isinstance(d.envelope.timestamp, float) else None,
            "where": where,
        }

    # ------------------------------------------------------------ the journal, as it grows

    def _read_journal(self, transport: Transport, watch: RunWatch) -> None:
        if watch.journal_tag is None:
            try:
                watch.journal_tag = transport.consume(
                    watch.topology.journal_stream, watch.pending.append, prefetch=64, offset="first"
                )
                watch.journal_note = None
            except TransportError as exc:
                watch.journal_note = f"journal not readable: {bounded(str(exc), 200)}"
                return
        transport.poll(0.05)
        budget = time.monotonic() + 0.5  # a long journal is read over several refreshes
        while watch.pending and time.monotonic() < budget:
            delivery = watch.pending.popleft()
            transport.ack(delivery)
            watch.journal_records += 1
            self._note(watch, delivery)
            if not watch.pending:
                transport.poll(0)

    def _note(self, watch: RunWatch, d: Delivery) -> None:
        if d.problem:
            watch.skipped.add("unreadable envelope")
            return
        kind = d.envelope.type
        if d.routing_key.startswith("dead."):
            watch.dead_by_kind[bounded(kind, 64)] += 1
            watch.dead_letters.append(self._dead_row(d, watch, d.envelope.headers.get(REASON_HEADER, "?"), "journal"))
        elif kind == ModelVersionStored.TYPE:
            record = watch.skipped.record(d, ModelVersionStored)
            if record is not None:
                watch.add_point(record.version, record.round, dict(record.metrics), "journal")
        elif kind == AdminReply.TYPE:
            reply = watch.skipped.message(d, AdminReply)
            if reply is not None:
                watch.admin_log.append(
                    {
                        "at": reply.timestamp,
                        "command": bounded(reply.command, 64),
                        "by": bounded(reply.by, 200),
                        "user": bounded(reply.user, 100),
                        "ok": bool(reply.ok),
                        "text": bounded(reply.text, 500),
                    }
                )
        elif kind == AdminStateRecord.TYPE:
            # the server's copy of its admin queue's record (the admin queue itself is the server's to read)
            state = watch.skipped.message(d, AdminStateRecord)
            if state is not None and (watch.admin_state is None or state.seq >= watch.admin_state["seq"]):
                watch.admin_state = {
                    "seq": state.seq,
                    "paused": state.paused,
                    "removed": [bounded(c, 64) for c in state.removed],
                    "min_clients": state.min_clients,
                    "rounds": state.rounds,
                }
        elif kind == RunFinished.TYPE:
            finished = watch.skipped.record(d, RunFinished)
            if finished is not None:
                watch.finished = {
                    "model_version": getattr(finished, "model_version", None),
                    "at": finished.timestamp,
                    "reason": bounded(getattr(finished, "reason", ""), 300),
                }
        elif kind == JournalMark.TYPE:
            pass  # a reader's end mark

    # ------------------------------------------------------------ the snapshot

    def _publish(self) -> None:
        snapshot = {
            "generated_at": time.time(),
            "refreshes": self.refreshes,
            "admin": self.admin,
            "broker": self.broker_note,
            "runs": self.runs,
            "runs_note": self.runs_note,
            "command_line_runs": list(self.configs),
            "selected": self.selected,
            "run": self._run_snapshot(self.watches.get(self.selected)) if self.selected else None,
        }
        plain = _plain(snapshot)  # a copy: the owner thread goes on changing what it holds
        with self._lock:
            self._snapshot = plain

    def _run_snapshot(self, watch: RunWatch | None) -> dict[str, Any] | None:
        if watch is None:
            return None
        view = watch.status_view or {}
        status = view.get("server")
        stale_s = None
        if status is None and watch.last_status is not None and watch.last_status_at is not None:
            status, stale_s = watch.last_status, round(time.time() - watch.last_status_at, 1)
        deadline = watch.config.strategy.round_deadline_s if watch.from_command_line else None
        round_info = None
        if status:
            time_left = status.get("round_time_left_s")
            if time_left is None and deadline and status.get("round_age_s") is not None:
                time_left = max(0.0, float(deadline) - float(status["round_age_s"]))
            round_info = {
                "round": status.get("round"),
                "rounds": status.get("rounds"),
                "open": status.get("round_open"),
                "age_s": status.get("round_age_s"),
                "time_left_s": time_left,
                "sampled": sorted(status.get("participants") or [], key=client_id_order),
                "training": status.get("still_training") or [],
                "answered": sorted(
                    set(status.get("participants") or [])
                    - set(status.get("still_training") or [])
                    - set(status.get("failed") or [])
                    - set(status.get("refused") or []),
                    key=client_id_order,
                ),
                "failed": status.get("failed") or [],
                "refused": status.get("refused") or [],
            }
        return {
            "run": watch.topology.run,
            "from_command_line": watch.from_command_line,
            "journal": watch.topology.journal,
            "status": status,
            "status_stale_s": stale_s,  # the status is the server's last answer, this old
            "status_error": watch.status_error
            or (
                None
                if view.get("server") or not watch.status_view
                else silence_text(watch.status_view, watch.topology.run).removesuffix(": queue depths only")
                + ("" if stale_s is None else f"; its last answer, {stale_s:.0f} s old, is shown")
            ),
            "round": round_info,
            "queues": view.get("queues") or {},
            "curve": [watch.curve[v] for v in sorted(watch.curve)],
            "dead_letters": watch.queued_dead + list(watch.dead_letters)[::-1],
            "dead_by_kind": dict(watch.dead_by_kind.most_common()),
            "dead_total": sum(watch.dead_by_kind.values()),
            "dead_queued": watch.queued_dead_ready,
            "admin_log": list(watch.admin_log)[::-1],
            "admin_state": watch.admin_state,
            "finished": watch.finished,
            "journal_records": watch.journal_records,
            "journal_note": watch.journal_note,
            "skipped": watch.skipped.summary() if watch.skipped.total else None,
            "accounting": watch.accounting,
        }

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot

    # ------------------------------------------------------------ what the page asks for

    def select(self, run: str) -> None:
        check_name("run name", run)
        known = {str(r.get("run")) for r in self.runs} | set(self.configs)
        if run not in known:
            raise ValueError(f"no run {run!r} on this broker")

        def job(transport: Transport) -> None:
            if self.selected and self.selected != run and self.selected in self.watches:
                self._forget_journal(transport, self.watches[self.selected])
            self.selected = run
            self._refresh_run(transport, self._watch(run))

        self.submit(job, timeout=30)

    def _forget_journal(self, transport: Transport, watch: RunWatch) -> None:
        """Stop reading a run no longer shown (its curve stays; reading starts over on return)."""
        if watch.journal_tag is not None:
            try:
                transport.cancel(watch.journal_tag)
            except TransportError:
                pass
        _reset_journal(watch)

    def run_admin(self, command: str, values: list[str], reason: str) -> dict[str, Any]:
        if self.admin_message is None:
            raise PermissionError("this dashboard is read-only (started without --admin)")
        message = self.admin_message(command, values, argparse.Namespace(reason=reason))
        run = self.selected
        if run is None:
            raise ValueError("no run selected")

        def job(transport: Transport) -> dict[str, Any]:
            reply = ask(transport, self._watch(run).topology, message, timeout=self.admin_timeout)
            if not isinstance(reply, AdminReply):
                return {
                    "ok": False,
                    "text": f"no reply from the server of run {run} within {self.admin_timeout:g} s: the command "
                    "expired unapplied, unless the server took it at the last moment",
                }
            return {"ok": bool(reply.ok), "text": bounded(reply.text, 500)}

        return self.submit(job, timeout=self.admin_timeout + 30)

    def run_accounting(self) -> dict[str, Any]:
        if self.accounting is None:
            raise PermissionError("accounting is not available here")
        run = self.selected
        if run is None:
            raise ValueError("no run selected")
        watch = self.watches.get(run) or self.submit(lambda _t: self._watch(run), timeout=30)
        started = time.time()
        text = self.accounting(watch.config)
        watch.accounting = {"at": started, "took_s": round(time.time() - started, 1), "text": text}
        return watch.accounting


def accounting_on_broker(connect: Callable[[RunConfig], Transport]) -> Callable[[RunConfig], str]:
    """``brokerfl accounting``'s summary of a run on the broker, on two connections of its
    own (the journal's and the models stream's) made by ``connect(config)`` per call."""

    def account(config: RunConfig) -> str:
        from brokerfl.assembly.roles import topology_for
        from brokerfl.storage.accounting import account_run
        from brokerfl.storage.broker_store import BrokerModelStore

        with connect(config) as transport, connect(config) as side:
            store = BrokerModelStore(side, topology_for(config), keep=1).refresh()
            return account_run(transport, topology_for(config), store).summary()

    return account


def _reset_journal(watch: RunWatch) -> None:
    """Forget what the journal said (the curve stays: its points are the same when read again)."""
    watch.journal_tag = None
    watch.pending.clear()
    watch.dead_letters.clear()
    watch.dead_by_kind.clear()
    watch.admin_log.clear()
    watch.journal_records = 0
    watch.skipped = Skipped()


def _plain(value: Any) -> Any:
    """``value`` copied as plain JSON values: NaN and infinities (which JSON cannot carry)
    become None, anything else unknown its text."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | deque):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    return str(value)


def _shown(summary: dict[str, Any]) -> dict[str, Any]:
    """A run summary fit for JSON: text bounded, numbers finite (JSON has no NaN)."""
    return {
        key: bounded(value, 300)
        if isinstance(value, str)
        else None
        if isinstance(value, float) and not math.isfinite(value)
        else value
        for key, value in summary.items()
    }


# ---------------------------------------------------------------- HTTP


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], dashboard: Dashboard) -> None:
        self.dashboard = dashboard
        self.token = secrets.token_urlsafe(32)
        super().__init__(address, DashboardHandler)
        host, port = self.server_address[:2]
        self.allowed_hosts = {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]", str(host))}
        self.any_host = str(host) not in ("127.0.0.1", "localhost", "::1")

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class DashboardHandler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "brokerfl-dashboard"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # no line per poll on the terminal

    # -------------------------------------------------------- responses

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any) -> None:
        self._send(status, json.dumps(_plain(value), allow_nan=False).encode(), "application/json")

    def _error(self, status: int, text: str) -> None:
        self._json(status, {"error": text})

    def _host_ok(self) -> bool:
        """A page served to another host name is a DNS rebinding attempt (a site whose name
        resolves to 127.0.0.1 reading this one): refused unless bound beyond loopback."""
        return self.server.any_host or self.headers.get("Host", "") in self.server.allowed_hosts

    # -------------------------------------------------------- GET

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "unknown Host")
            return
        path = self.path.split("?", 1)[0]
        if path == "/":
            html = (STATIC / "index.html").read_text().replace("{{csrf_token}}", self.server.token)
            self._send(HTTPStatus.OK, html.encode(), "text/html; charset=utf-8")
        elif path in STATIC_FILES:
            name, content_type = STATIC_FILES[path]
            self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), content_type)
        elif path == "/api/state":
            self._json(HTTPStatus.OK, self.server.dashboard.snapshot())
        elif path == "/favicon.ico":
            self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon")
        else:
            self._error(HTTPStatus.NOT_FOUND, "not found")

    do_HEAD = do_GET

    # -------------------------------------------------------- POST

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if not self._host_ok():
            self._error(HTTPStatus.FORBIDDEN, "unknown Host")
            return
        # the token travels in a header: a form or a cross-site request cannot set one
        if not secrets.compare_digest(self.headers.get("X-CSRF-Token", ""), self.server.token):
            self._error(HTTPStatus.FORBIDDEN, "missing or wrong CSRF token")
            return
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send application/json")
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            self._error(HTTPStatus.BAD_REQUEST, "bad request length")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise ValueError("a JSON object is expected")
        except ValueError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"bad JSON: {bounded(str(exc), 200)}")
            return
        dashboard = self.server.dashboard
        path = self.path.split("?", 1)[0]
        try:
            if path == "/api/select":
                dashboard.select(str(body.get("run", "")))
                self._json(HTTPStatus.OK, {"ok": True})
            elif path == "/api/admin":
                values = body.get("values") or []
                if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                    raise ValueError("values must be a list of strings")
                result = dashboard.run_admin(str(body.get("command", "")), values, str(body.get("reason", "")))
                self._json(HTTPStatus.OK, result)
            elif path == "/api/accounting":
                self._json(HTTPStatus.OK, dashboard.run_accounting())
            else:
                self._error(HTTPStatus.NOT_FOUND, "not found")
        except PermissionError as exc:
            self._error(HTTPStatus.FORBIDDEN, str(exc))
        except (ValueError, argparse.ArgumentTypeError) as exc:
            self._error(HTTPStatus.BAD_REQUEST, bounded(str(exc), 300))
        except (TransportError, TimeoutError) as exc:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, bounded(str(exc) or "the broker did not answer in time", 300))


def serve(dashboard: Dashboard, addr: str = "127.0.0.1", port: int = 8765) -> DashboardServer:
    """The HTTP server (not yet serving: call ``serve_forever``); OSError if the port is taken."""
    return DashboardServer((addr, port), dashboard)
