"""Reading a run's journal: the stream that holds a copy of every message of the run.

A stream has no "end" a consumer could be told about, so a reader first publishes a mark
(an ``audit.journal_mark`` message with a fresh id) and reads from the first offset until
it meets that mark: everything journaled before the read began, and nothing after.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from brokerfl.message import Message
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
