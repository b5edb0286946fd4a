"""Seeing from outside which swarm peer holds an update of a round it has not stored.

Fault tests and ``benchmarks/swarm.py`` kill the aggregating peer at that moment. The
journal shows every update sent, every version stored (and by whom: its sender) and every
drop; an update of an unstored round that was not dropped, while the aggregation queue has
nothing ready, has been delivered and is held unacked until its round is stored. The holder
is the sender of the newest stored version.
"""

from __future__ import annotations

from typing import NamedTuple

from brokerfl.storage.journal import read_journal
from brokerfl.transports.base import Transport
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.message import ModelVersionStored, ParameterUpdate, UpdateDropped, from_wire


class HeldUpdate(NamedTuple):
    update_id: str
    round: int
    holder: str  # the aggregating worker's name, "aggregator.<peer's client id>"

    @property
    def peer(self) -> str:
        """The client id of the peer whose process holds the update."""
        return self.holder.removeprefix("aggregator.")


def held_update(transport: Transport, topology: RunTopology, min_round: int = 2) -> HeldUpdate | None:
    """The first update of an unstored round >= ``min_round`` that the aggregating peer holds
    unacked, else None (see the module docstring)."""
    updates: dict[str, int] = {}
    stored: set[int] = set()
    dropped: set[str] = set()
    holder = None
    for delivery in read_journal(transport, topology):
        if delivery.envelope.type not in (ParameterUpdate.TYPE, ModelVersionStored.TYPE, UpdateDropped.TYPE):
            continue
        message = from_wire(delivery.envelope, delivery.body)
        if isinstance(message, ParameterUpdate):
            updates[message.message_id] = message.round
        elif isinstance(message, ModelVersionStored):
            stored.add(message.round)
            holder = message.sender
        else:
            dropped.add(message.update_id)
    held = [(uid, r) for uid, r in updates.items() if uid not in dropped and r not in stored and r >= min_round]
    if not held or holder is None or transport.queue_info(topology.server_queue).messages_ready:
        return None
    return HeldUpdate(*held[0], holder)
