"""One worker thread per purpose and process, for work a handler overlaps with its own
(hashing a new version beside a broker round trip, evaluating beside the next round).

Handlers do no I/O; these threads only compute (hashlib, numpy and torch release the GIL).
A forked child has none of its parent's threads, so each is made again there."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_threads: dict[str, tuple[int, ThreadPoolExecutor]] = {}


def process_thread(purpose: str) -> ThreadPoolExecutor:
    """The process's one thread for ``purpose`` (its name says it: ``brokerfl-<purpose>``)."""
    made = _threads.get(purpose)
    if made is None or made[0] != os.getpid():
        made = _threads[purpose] = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"brokerfl-{purpose}"))
    return made[1]
