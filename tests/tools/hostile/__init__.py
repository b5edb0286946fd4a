"""Hostile input for a run's server queue, in three modules:

- :mod:`tests.tools.hostile.messages`: the seeded mix of hostile messages, each with what the
  server should do with it;
- :mod:`tests.tools.hostile.publisher`: an attacker's plain-pika connection that publishes them;
- :mod:`tests.tools.hostile.fire`: a federation run under fire, and what became of each message.

Beside them, :mod:`tests.tools.hostile.poisoning`: a client that poisons its own updates
(imported by name, as a client handler set, not from here).
"""

from tests.tools.hostile.fire import FireResult, run_under_fire
from tests.tools.hostile.messages import (
    CHUNK,
    CHUNK_BYTES,
    DEAD,
    DEAD_ANONYMOUS,
    IDENTITY,
    INVALID_CLIENT_IDS,
    REFUSED,
    HostileMessage,
    RawTimestamp,
    hostile_messages,
)
from tests.tools.hostile.publisher import HostilePublisher

__all__ = [
    "CHUNK",
    "CHUNK_BYTES",
    "DEAD",
    "DEAD_ANONYMOUS",
    "IDENTITY",
    "INVALID_CLIENT_IDS",
    "REFUSED",
    "FireResult",
    "HostileMessage",
    "HostilePublisher",
    "RawTimestamp",
    "hostile_messages",
    "run_under_fire",
]
