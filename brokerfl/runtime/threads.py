"""One worker thread per purpose and process, for work a handler overlaps with its own
(hashing a new version beside a broker round trip, evaluating beside the next round), and
lanes: a daemon thread per purpose that runs jobs in order (a client's app calls beside
its I/O loop).

Handlers do no I/O; these threads only compute (hashlib, numpy and torch release the GIL).
A forked child has none of its parent's threads, so each is made again there."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

_threads: dict[str, tuple[int, ThreadPoolExecutor]] = {}


def process_thread(purpose: str) -> ThreadPoolExecutor:
    """The process's one thread for ``purpose`` (its name says it: ``brokerfl-<purpose>``)."""
    made = _threads.get(purpose)
    if made is None or made[0] != os.getpid():
        made = _threads[purpose] = (
            os.getpid(),
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"brokerfl-{purpose}"),
        )
    return made[1]


class Lane:
    """One daemon thread that runs jobs one after the other, in order. Daemon: a process
    that is done (a client told to exit) does not wait for a job still running (an app's
    training cannot be interrupted, only asked to stop)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` after the jobs already submitted; it must handle its own exceptions."""
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            self._jobs.get()()


_lanes: dict[str, tuple[int, Lane]] = {}
_lanes_lock = threading.Lock()


def process_lane(purpose: str) -> Lane:
    """The process's one lane for ``purpose`` (its thread's name: ``brokerfl-<purpose>``)."""
    with _lanes_lock:
        made = _lanes.get(purpose)
        if made is None or made[0] != os.getpid():
            made = _lanes[purpose] = (os.getpid(), Lane(f"brokerfl-{purpose}"))
        return made[1]
