"""The runs on a broker, as things: each run's state (waiting, training, paused, finished,
aborted, crashed), round, version and newest score, read from the broker alone.

Interface fixed for the dashboard (``brokerfl.ops.dashboard``) and ``brokerfl runs``; the
implementation is ``list_runs``'s."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from brokerfl.transports.base import Transport

RUN_STATES = ("waiting", "training", "paused", "finished", "aborted", "crashed")


@dataclass(frozen=True)
class RunSummary:
    run: str
    state: str  # one of RUN_STATES
    reason: str | None = None  # why it was aborted or crashed (attacker-controllable text: escape it)
    round: int | None = None  # the open (or last) round
    rounds: int | None = None  # the planned rounds
    model_version: int | None = None
    metric_name: str | None = None  # the run's target metric (e.g. accuracy), else None
    metric_value: float | None = None  # its newest value
    started_at: float | None = None  # unix seconds
    finished_at: float | None = None  # unix seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_runs(transport: Transport, *, timeout: float = 2.0) -> list[RunSummary]:
    """Every run the broker knows of, newest first."""
    raise NotImplementedError("brokerfl.ops.runs.list_runs is being built")
