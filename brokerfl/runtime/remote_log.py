"""A process's log, published to its run: records copied from the process's log
(:class:`brokerfl.runtime.log.LogBuffer`) go out in batches, once a second, to the run's
logs exchange, which routes them into the run's logs stream (``brokerfl logs`` reads it:
:mod:`brokerfl.ops.remote_logs`).

Decision: shipping is a worker of timers only, beside the process's others on its I/O
loop, like the heartbeat. Its handler takes what the buffer holds (memory, no I/O) and
returns one :class:`LogRecords` message; its worker publishes it on the loop's thread, as
pika requires, to the logs exchange instead of the run's (the journal binds ``#`` on the
run's exchange and must not fill with log lines). Logging itself never waits for the
broker: records wait in the bounded buffer, and the oldest go (counted, and the count
travels with the next batch) when the broker is slower than the log.

The routing key names the site that publishes: ``server.log_records`` or
``client.<id>.log_records`` (``clients.log_records`` from a process that hosts several
logical clients). Where identity is enforced, each user's topic permission lets it publish
under its own key only, and the reader checks the key against the AMQP ``user_id`` too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from brokerfl.runtime.handler_table import Context, HandlerSet, Outbound, Started, compose
from brokerfl.runtime.log import LogBuffer, install_buffer
from brokerfl.runtime.worker import Worker
from brokerfl.transports.base import Transport
from brokerfl.transports.topology import CLIENTS, SERVER, RunTopology, client_dest
from brokerfl.wire.message import Message

SHIP_S = 1.0  # how often a process publishes what it logged
BATCH_RECORDS = 200  # at most this many records in one message (each at most a few KB)
MAX_BACKOFF_S = 60.0


@dataclass(kw_only=True)
class LogRecords(Message):
    """Records of one process's log (each a JSON object: time, level, event, role, client,
    key/values), oldest first; ``dropped``: records lost before this batch (its buffer was
    full)."""

    records: list[str] = field(default_factory=list)
    dropped: int = 0


@dataclass(kw_only=True)
class ShipLogs(Message):
    """Local timer message: time to publish what was logged."""

    LOCAL = True


@dataclass
class ShipperState:
    buffer: LogBuffer
    site: str  # the routing key's first words: server, client.<id> or clients
    batch: int = BATCH_RECORDS
    every_s: float = SHIP_S
    shipped: int = 0
    failures: int = 0  # publishing failed this many times in a row (e.g. no logs exchange on the broker)

    def next_in(self) -> float:
        """Seconds to the next batch: backs off while publishing fails, so a broker without
        the run's logs exchange (definitions from an older provision) costs a try a minute."""
        return min(MAX_BACKOFF_S, self.every_s * 2**self.failures) if self.failures else self.every_s


SHIPPING = HandlerSet("log shipping", needs=(ShipperState,))


@SHIPPING.on(Started)
def start_shipping(message: Started, ctx: Context[ShipperState]) -> None:
    ctx.set_timer("ship", ctx.state.every_s, ShipLogs())


@SHIPPING.on(ShipLogs)
def ship(message: ShipLogs, ctx: Context[ShipperState]) -> list[Outbound]:
    state = ctx.state
    out = batches(state)
    ctx.set_timer("ship", state.next_in(), ShipLogs())
    if out:
        lost = sum(len(o.message.records) for o in out if isinstance(o.message, LogRecords))

        def sent() -> None:
            state.failures = 0

        def not_sent(error: BaseException) -> None:  # counted with the next batch; stderr has them
            state.failures += 1
            state.buffer.lose(lost)

        ctx.once_sent(sent)
        ctx.unless_sent(not_sent)
    return out


def batches(state: ShipperState) -> list[Outbound]:
    """What the buffer holds, as LogRecords messages (none if it holds nothing)."""
    out: list[Outbound] = []
    while True:
        records, dropped = state.buffer.take(state.batch)
        if not records and not dropped:
            return out
        state.shipped += len(records)
        out.append(Outbound(state.site, LogRecords(records=records, dropped=dropped)))
        if len(records) < state.batch:
            return out


def site_of(role: str, client_ids: list[str]) -> str:
    """The routing key's site for a process of ``role`` (``server`` or ``client``)."""
    if role == SERVER:
        return SERVER
    return client_dest(client_ids[0]) if len(client_ids) == 1 else CLIENTS


def log_shipper(
    transport: Transport,
    topology: RunTopology,
    site: str,
    *,
    buffer: LogBuffer | None = None,
    every_s: float = SHIP_S,
) -> Worker:
    """A worker of timers only that publishes this process's log to the run's logs stream
    (run it among the process's background workers; :func:`flush` at the end). ``buffer``:
    the one the process's log is already copied into (else a new one, installed now)."""
    if buffer is None:
        buffer = LogBuffer()
        install_buffer(buffer)
    table = compose("log-shipper", SHIPPING)
    state = ShipperState(buffer, site, every_s=every_s)
    return Worker(transport, topology, None, table, state, name=f"{site}-log", exchange=topology.logs_exchange)


def flush(shipper: Worker) -> None:
    """Publish what is still buffered (the process's last lines), then stop copying."""
    try:
        if not shipper.stopped:
            shipper.publish(batches(shipper.state))
    except Exception as exc:  # the process ends anyway: its stderr has every line  # noqa: BLE001
        shipper.log.warning("the last log records could not be published", error=str(exc)[:300])
    finally:
        install_buffer(None)


def parse_record(text: Any) -> dict[str, Any] | None:
    """A record as a reader takes it: a JSON object, or None."""
    if not isinstance(text, str) or len(text) > 64_000:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


@dataclass(kw_only=True)
class LogMark(Message):
    """A reader's mark in the logs stream: where "up to now" ends (skipped by readers)."""


LOG_RECORDS_KEY = LogRecords.TYPE  # the routing key's last word of a batch of records
