"""A run's journal: the stream that holds a copy of every message of the run; reading it
from the broker, and writing it to (and reading it from) a file that needs no broker.

A stream has no "end" a consumer could be told about, so a reader first publishes a mark
(an ``audit.journal_mark`` message with a fresh id) and reads from the first offset until
it meets that mark: everything journaled before the read began, and nothing after.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack

from brokerfl.message import Envelope, Message
from brokerfl.topology import AUDIT, RunTopology, routing_key
from brokerfl.transport import Delivery, Transport, TransportError


@dataclass(kw_only=True)
class JournalMark(Message):
    """Published by a journal reader so it knows where its read ends."""


def read_journal(transport: Transport, topology: RunTopology, *, timeout_s: float = 120.0, prefetch: int = 64) -> Iterator[Delivery]:
    """Yield the run's journaled messages in journal order, up to the moment of the call."""
    if not topology.journal:
        raise TransportError(f"run {topology.run!r} has no journal (journal: false)")
    from brokerfl.message import to_wire

    mark = JournalMark(run=topology.run, sender="journal-reader")
    envelope, body = to_wire(mark)
    transport.publish(topology.exchange, routing_key(AUDIT, JournalMark.TYPE), envelope, body)
    pending: deque[Delivery] = deque()
    tag = transport.consume(topology.journal_stream, pending.append, prefetch=prefetch, offset="first")
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if not pending:
                if time.monotonic() > deadline:
                    raise TransportError(f"the journal of run {topology.run!r} did not reach its end mark within {timeout_s:.0f} s")
                transport.poll(0.2)
                continue
            delivery = pending.popleft()
            transport.ack(delivery)
            if delivery.envelope.message_id == mark.message_id:
                return
            if delivery.envelope.type == JournalMark.TYPE:
                continue  # another reader's mark
            deadline = time.monotonic() + timeout_s  # progress: the deadline is for silence
            yield delivery
    finally:
        transport.cancel(tag)


# ---------------------------------------------------------------- journal files

FILE_FORMAT = "brokerfl-journal"
FILE_VERSION = 1


def write_journal_file(path: str | os.PathLike, run: str, deliveries: Iterable[Delivery]) -> int:
    """Write journaled messages to a file (a msgpack stream: a header map, then one
    ``[exchange, routing_key, type, message_id, sender, timestamp, headers, body]`` per
    message); returns how many. Bodies stay exactly as they travelled."""
    count = 0
    tmp = Path(f"{path}.tmp")
    with tmp.open("wb") as f:
        f.write(msgpack.packb({"format": FILE_FORMAT, "version": FILE_VERSION, "run": run}))
        for d in deliveries:
            e = d.envelope
            f.write(msgpack.packb([d.exchange, d.routing_key, e.type, e.message_id, e.sender, e.timestamp, e.headers, d.body], use_bin_type=True))
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
        for offset, record in enumerate(unpacker):
            try:
                exchange, key, type_, message_id, sender, timestamp, headers, body = record
            except (TypeError, ValueError):
                raise TransportError(f"{path}: record {offset} is malformed") from None
            yield Delivery("journal", exchange, key, Envelope(type_, message_id, sender, timestamp, headers), body, False, offset)


def journal_file_run(path: str | os.PathLike) -> str:
    with Path(path).open("rb") as f:
        header = next(msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 20))
    return header.get("run", "")
