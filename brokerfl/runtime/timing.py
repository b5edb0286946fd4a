"""Where a process spends its time, by phase (decode, handle, encode, publish, ...).

One cumulative table per process; a role takes differences between two snapshots, e.g.
the server reports each round's phases in metrics.jsonl.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Timings:
    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)

    def since(self, snapshot: dict[str, float]) -> dict[str, float]:
        return {name: round(total - snapshot.get(name, 0.0), 6) for name, total in self.seconds.items()}


timings = Timings()
