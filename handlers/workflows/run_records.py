"""The server's records in the broker's run registry (:mod:`brokerfl.ops.runs`): what a
server says of its run as it goes, so that ``brokerfl runs`` and ``brokerfl status`` know a
run's state and end after its server is gone.

Records are small and few: the start, each change of state (training, paused, resumed),
at most one ``progress`` per stored version (its round and target metric), and the end
(``finished`` or ``aborted``, with the reason). They go out like every message a handler
returns (confirmed before the message that caused them is acked), through the run's
exchange with the routing key ``runs.run_record``.
"""

from __future__ import annotations

import math
from typing import Any

from brokerfl.runtime.handler_table import Outbound
from brokerfl.runtime.operator_commands import RunRecord
from brokerfl.transports.base import bounded
from brokerfl.transports.topology import RUNS

MAX_REASON_CHARS = 1000


def dropped_updates(state: Any) -> int:
    """The run's dropped updates: those of this process, and those counted in the stored
    version it resumed from (``ModelVersion.dropped_updates``)."""
    return int(getattr(state, "dropped_before", 0)) + len(getattr(state, "dropped", ()))


def run_record(state: Any, event: str, *, reason: str = "", model: Any = None) -> Outbound:
    """A registry record of ``state``'s run (``model``: the version it is about; default the
    newest)."""
    if event == "training" and getattr(getattr(state, "admin", None), "paused", False):
        event = "paused"  # begun while paused (a restarted server): no round starts until resume
    model = model if model is not None else state.model
    app = getattr(state, "app", None)
    name = app.target.name if app is not None and getattr(app, "target", None) is not None else ""
    value = (model.metrics or {}).get(name) if model is not None and name else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        value = None
    return Outbound(
        RUNS,
        RunRecord(
            event=event,
            round=int(getattr(state, "round", 0)),
            model_version=model.version if model is not None else 0,
            rounds=state.config.rounds,
            reason=bounded(reason, MAX_REASON_CHARS) if reason else "",
            metric_name=name,
            metric_value=None if value is None else float(value),
            dropped_updates=dropped_updates(state),
        ),
    )
