"""A run's journal: the stream that holds a copy of every message of the run; reading it
from the broker, and writing it to (and reading it from) a file that needs no broker.

A stream has no "end" a consumer could be told about, so a reader first publishes a mark
(an ``audit.journal_mark`` message with a fresh id) and reads from the first offset until
it meets that mark: everything journaled before the read began, and nothing after.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import msgpack

from brokerfl.transports.base import Delivery, Transport, TransportError, envelope_problem, safe_headers
from brokerfl.transports.stream_reader import StreamReader
from brokerfl.transports.topology import AUDIT, RunTopology, routing_key
from brokerfl.wire.codec import DecodeError
from brokerfl.wire.message import Envelope, Message, from_wire
from brokerfl.wire.names import bounded

M = TypeVar("M", bound=Message)


@dataclass(kw_only=True)
class JournalMark(Message):
    """Published by a journal reader so it knows where its read ends."""


def expected_journal_bytes(model_bytes: int, *, rounds: int, participants: int) -> int:
    """What a synchronous run journals, roughly: each round's broadcast TrainTask and its
    ``participants`` updates (a model each), plus version 0's record. Joins, heartbeats
    (one small message per client process and beat) and records are small beside a model
    and not counted."""
    return model_bytes * ((participants + 1) * rounds + 1)


def retention_warning(model_bytes: int, *, rounds: int, participants: int, max_bytes: int | None) -> str | None:
    """Why the journal's retention will cut this run's start (None if it will not):
    replay and accounting then cannot see its first versions."""
    expected = expected_journal_bytes(model_bytes, rounds=rounds, participants=participants)
    if max_bytes is None or expected <= max_bytes:
        return None
    return (
        f"the journal will hold about {expected / 1024**3:.2f} GiB ({model_bytes / 1024**2:.1f} MiB model x "
        f"({participants} updates + 1 task) x {rounds} rounds), more than journal_max_bytes "
        f"({max_bytes / 1024**3:.2f} GiB): retention will cut the run's start, and replay and accounting "
        "will not cover it; raise journal_max_bytes to keep the whole run"
    )


def read_journal(
    transport: Transport, topology: RunTopology, *, timeout_s: float = 120.0, prefetch: int = 64
) -> Iterator[Delivery]:
    """Yield the run's journaled messages in journal order, up to the moment of the call."""
    if not topology.journal:
        raise TransportError(f"run {topology.run!r} has no journal (journal: false)")
    from brokerfl.wire.message import to_wire

    mark = JournalMark(run=topology.run, sender="journal-reader")
    envelope, body = to_wire(mark)
    transport.publish(topology.exchange, routing_key(AUDIT, JournalMark.TYPE), envelope, body)
    with StreamReader(
        transport,
        topology.journal_stream,
        offset="first",
        prefetch=prefetch,
        silence_s=timeout_s,
        poll_s=0.2,
        what=lambda silence: (
            f"the journal of run {topology.run!r} did not reach its end mark ({silence:.0f} s without a message)"
        ),
    ) as reader:
        for delivery in reader:
            if delivery.envelope.message_id == mark.message_id:
                return
            if delivery.envelope.type == JournalMark.TYPE:
                continue  # another reader's mark
            yield delivery


# ---------------------------------------------------------------- what readers skip


@dataclass
class Skipped:
    """Journal records a reader passed over because they are not valid messages of the run
    (anyone who may publish to the run's exchange can put anything in its journal), by why.

    Decision: a reader never fails on the journal's content; it skips such a record, counts
    it, and says so in its output. Records the server itself writes (version records, drop
    records) count only from ``audit.*`` routing keys, where the server publishes them; a
    second copy of a record (same message id: a publisher's retry after a lost confirm) is
    read once."""

    counts: Counter[str] = field(default_factory=Counter)
    seen: set[str] = field(default_factory=set)  # message ids of the server's records already read

    def add(self, why: str) -> None:
        self.counts[why] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "skipped journal records: 0"
        parts = ", ".join(f"{n} {why}" for why, n in self.counts.most_common())
        return f"skipped journal records (not valid messages of the run): {self.total} ({parts})"

    def record(self, delivery: Delivery, cls: type[M]) -> M | None:
        """``delivery`` decoded as a ``cls`` record of the server, or None (counted)."""
        if not delivery.routing_key.startswith(f"{AUDIT}."):
            self.add(f"{cls.TYPE} not on an {AUDIT}.* key")
            return None
        message = self.message(delivery, cls)
        if message is None:
            return None
        if message.message_id in self.seen:
            self.add(f"repeated {cls.TYPE}")
            return None
        self.seen.add(message.message_id)
        return message

    def message(self, delivery: Delivery, cls: type[M]) -> M | None:
        """``delivery`` decoded as a ``cls``, or None (counted)."""
        if delivery.problem or envelope_problem(delivery.envelope):
            self.add("unreadable envelope")
            return None
        try:
            message = from_wire(delivery.envelope, delivery.body)
        except DecodeError:
            self.add(f"undecodable {bounded(delivery.envelope.type, 40)}")
            return None
        if not isinstance(message, cls):  # pragma: no cover - from_wire picks the class by type
            self.add(f"not a {cls.TYPE}")
            return None
        return message


# ---------------------------------------------------------------- journal files

FILE_FORMAT = "brokerfl-journal"
FILE_VERSION = 1


def write_journal_file(
    path: str | os.PathLike, run: str, deliveries: Iterable[Delivery], skipped: Skipped | None = None
) -> int:
    """Write journaled messages to a file (a msgpack stream: a header map, then one
    ``[exchange, routing_key, type, message_id, sender, timestamp, headers, body]`` per
    message); returns how many. Bodies stay exactly as they travelled; headers of types
    msgpack cannot hold (decimals, timestamps) are left out, and records whose envelope is
    unreadable are skipped (counted in ``skipped``)."""
    count = 0
    skipped = skipped if skipped is not None else Skipped()
    tmp = Path(f"{path}.tmp")
    with tmp.open("wb") as f:
        f.write(msgpack.packb({"format": FILE_FORMAT, "version": FILE_VERSION, "run": run}))
        for d in deliveries:
            e = d.envelope
            if d.problem or envelope_problem(e):
                skipped.add("unreadable envelope")
                continue
            headers, _ = safe_headers(e.headers)
            f.write(
                msgpack.packb(
                    [d.exchange, d.routing_key, e.type, e.message_id, e.sender, e.timestamp, headers, d.body],
                    use_bin_type=True,
                )
            )
            count += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return count


def read_journal_file(path: str | os.PathLike) -> Iterator[Delivery]:
    """The messages of a journal file, in order, as deliveries (never unpickled: msgpack
    with bounded sizes; bodies are decoded later by the codec like any received body)."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as exc:
        raise TransportError(f"cannot read journal file {path}: {exc.strerror}") from None
    with f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=2**31 - 1, strict_map_key=True)
        try:
            header = next(unpacker)
        except (StopIteration, ValueError, msgpack.UnpackException) as exc:
            raise TransportError(f"{path} is not a brokerfl journal file ({type(exc).__name__})") from None
        if not (isinstance(header, dict) and header.get("format") == FILE_FORMAT):
            raise TransportError(f"{path} is not a brokerfl journal file")
        if header.get("version") != FILE_VERSION:
            raise TransportError(f"{path}: journal file version {header.get('version')!r} is not supported")
        offset = 0
        while True:
            try:
                record = next(unpacker)
            except StopIteration:
                return
            except (ValueError, msgpack.UnpackException) as exc:  # the rest of the file cannot be read
                yield _unreadable(offset, f"unreadable from record {offset} on ({type(exc).__name__})")
                return
            try:
                exchange, key, type_, message_id, sender, timestamp, headers, body = record
                if not (isinstance(exchange, str) and isinstance(key, str) and isinstance(body, bytes)):
                    raise TypeError
            except (TypeError, ValueError):
                yield _unreadable(offset, f"record {offset} is malformed")
            else:
                envelope = Envelope(type_, message_id, sender, timestamp, headers)
                yield Delivery(
                    "journal", exchange, key, envelope, body, False, offset, problem=envelope_problem(envelope)
                )
            offset += 1


def _unreadable(offset: int, problem: str) -> Delivery:
    """A journal file's record that could not be read, in its place, saying why."""
    return Delivery("journal", "", "", Envelope("", "", "", 0.0, {}), b"", False, offset, problem=problem)


def journal_file_run(path: str | os.PathLike) -> str:
    with Path(path).open("rb") as f:
        header = next(msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 20))
    return header.get("run", "")
