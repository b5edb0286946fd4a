"""Reading a run's logs from its logs stream (``brokerfl logs``): every process publishes
its log records there (:mod:`brokerfl.runtime.remote_log`); the run's admin reads them from
anywhere.

Who wrote a record is the routing key it came under (``server.log_records``,
``client.<id>.log_records``), never what the record says of itself: the reader sets the
record's site (and a client's ``client``) from the key. Where identity is enforced, each
participant's topic permission lets it publish under its own key only, and the reader
checks the key against the AMQP ``user_id`` RabbitMQ validated as well (a batch that fails
the check is skipped and counted). Every string in a record came from a process of the
federation, a client's included: :func:`render` escapes control characters (a terminal
escape sequence in a client id or an error message is shown, not obeyed).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from brokerfl.runtime.identity import client_user, server_user
from brokerfl.runtime.remote_log import LogMark, LogRecords, parse_record
from brokerfl.transports.base import Delivery, Transport, TransportError
from brokerfl.transports.topology import CLIENTS, SERVER, RunTopology
from brokerfl.wire.codec import DecodeError
from brokerfl.wire.message import from_wire, to_wire

MARK_KEY = f"mark.{LogMark.TYPE}"
SHOWN_VALUE_CHARS = 300


def read_log_batches(
    transport: Transport, topology: RunTopology, *, follow: bool = False, timeout_s: float = 60.0
) -> Iterator[Delivery]:
    """The logs stream's deliveries from its first, up to now (a mark this reader publishes),
    or with ``follow`` on and on, until the caller stops."""
    mark = LogMark(run=topology.run, sender="logs-reader")
    transport.publish(topology.logs_exchange, MARK_KEY, *to_wire(mark))
    pending: deque[Delivery] = deque()
    tag = transport.consume(topology.logs_stream, pending.append, prefetch=256, offset="first")
    try:
        reached = False
        deadline = time.monotonic() + timeout_s
        while True:
            if not pending:
                if not reached and time.monotonic() > deadline:
                    raise TransportError(
                        f"the logs of run {topology.run!r} did not reach this reader's mark ({timeout_s:.0f} s without "
                        "a message)"
                    )
                transport.poll(0.2)
                continue
            delivery = pending.popleft()
            transport.ack(delivery)
            deadline = time.monotonic() + timeout_s
            if delivery.envelope.type == LogMark.TYPE:
                if delivery.envelope.message_id == mark.message_id:
                    reached = True
                    if not follow:
                        return
                continue  # another reader's mark
            yield delivery
    finally:
        transport.cancel(tag)


@dataclass
class Skipped:
    """Batches the reader passed over, by why (anyone who may publish to the logs exchange
    can put anything there)."""

    counts: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        return ", ".join(f"{n} {why}" for why, n in self.counts.most_common())


def site_of_key(routing_key: str) -> str | None:
    """``server``, ``client.<id>`` or ``clients`` from a batch's routing key (None: not a
    batch's key)."""
    suffix = f".{LogRecords.TYPE}"
    if not routing_key.endswith(suffix):
        return None
    site = routing_key[: -len(suffix)]
    if site in (SERVER, CLIENTS) or re.fullmatch(r"client\.[A-Za-z0-9_-]{1,64}", site):
        return site
    return None


def expected_user(run: str, site: str) -> str | None:
    """The broker user that may publish under ``site`` (None: no participant may, with
    identity enforced: a process hosting several clients has no user of its own)."""
    if site == SERVER:
        return server_user(run)
    if site.startswith("client."):
        return client_user(run, site.removeprefix("client."))
    return None


def records(
    deliveries: Iterable[Delivery], run: str, *, enforce_identity: bool, skipped: Skipped | None = None
) -> Iterator[dict[str, Any]]:
    """Each batch's records, with ``site`` set from the routing key (and a client's
    ``client``); a batch's count of dropped records as a warning record of its own."""
    skipped = skipped if skipped is not None else Skipped()
    for delivery in deliveries:
        site = site_of_key(delivery.routing_key)
        if site is None:
            skipped.counts["not under a site's key"] += 1
            continue
        if enforce_identity and delivery.envelope.user_id != expected_user(run, site):
            skipped.counts["published by another user than the site's"] += 1
            continue
        try:
            batch = from_wire(delivery.envelope, delivery.body)
        except DecodeError:
            skipped.counts["undecodable"] += 1
            continue
        if not isinstance(batch, LogRecords):
            skipped.counts["not log records"] += 1
            continue
        for text in batch.records:
            record = parse_record(text)
            if record is None:
                skipped.counts["unreadable records"] += 1
                continue
            yield attributed(record, site)
        if batch.dropped:
            yield attributed(
                {
                    "time": batch.timestamp,
                    "level": "warning",
                    "event": f"{batch.dropped} log records lost before these (the process logged faster than it "
                    "could publish)",
                },
                site,
            )


def attributed(record: dict[str, Any], site: str) -> dict[str, Any]:
    """``record`` with its site from the routing key, its claims of another overruled."""
    record["site"] = site
    if site == SERVER:
        record["role"] = SERVER
        record.pop("client", None)
    elif site.startswith("client."):
        record["client"] = site.removeprefix("client.")
    return record


def wanted(
    record: dict[str, Any], *, client: str | None = None, server: bool = False, since: float | None = None
) -> bool:
    if since is not None and not (isinstance(record.get("time"), int | float) and record["time"] >= since):
        return False
    if server and record.get("site") != SERVER:
        return False
    if client is not None:
        return record.get("site") == f"client.{client}" or (
            record.get("site") == CLIENTS and str(record.get("client", "")) == client
        )
    return True


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(value: Any, limit: int = SHOWN_VALUE_CHARS) -> str:
    """A value of a record as a terminal shows it safely: control characters (escape
    sequences, carriage returns, bidirectional overrides) written as ``\\xNN``/``\\uNNNN``,
    bounded; rich-style ``[markup]`` is plain text here (nothing renders it)."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return _UNPRINTABLE.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}", text
    )


_FIRST_KEYS = ("time", "level", "site", "event", "run", "role", "client", "exception")


def render(record: dict[str, Any]) -> str:
    """One record as the console format shows it: time, level, site, event, key=value."""
    stamp = record.get("time")
    when = datetime.fromtimestamp(stamp).strftime("%H:%M:%S") if isinstance(stamp, int | float) else "??:??:??"
    level = printable(record.get("level", "?"), 10)
    line = f"{when} [{level:<7}] {printable(record.get('site', '?'), 80):<10} {printable(record.get('event', ''))}"
    site = str(record.get("site", ""))
    hidden = (
        _FIRST_KEYS if site.startswith("client.") or site == SERVER else tuple(k for k in _FIRST_KEYS if k != "client")
    )
    rest = " ".join(f"{printable(k, 64)}={printable(v)}" for k, v in record.items() if k not in hidden)
    line = f"{line}  {rest}" if rest else line
    if record.get("exception"):
        line += "\n" + "\n".join(printable(part, 3000) for part in str(record["exception"]).splitlines())
    return line


def parse_since(text: str, now: float | None = None) -> float:
    """``30s``, ``10m``, ``2h``, ``1d`` ago, or an ISO time (``2026-01-31T12:00``, local
    unless it says its zone): unix seconds. ValueError if it is neither."""
    now = time.time() if now is None else now
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        return now - float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (30s, 10m, 2h, 1d) or an ISO time") from None
