"""Federated evaluation: the clients score a stored model version on their own data.

When the server holds no test data (the app has no ``load_server_test``: the usual
cross-silo case), or ``federated_evaluation: always``, then after every ``evaluate_every``
rounds (and after the last) the server broadcasts an EvaluateTask with the new version to
the live clients. Each answers with an EvaluateResult (on its partition's test split, else
its training data). When all have answered, or at the round deadline, the sample-weighted
mean loss and accuracy go to ``metrics.jsonl`` as a line with ``"evaluation":
"federated"`` (and so into the curve). An evaluation still open when the next one is due
is closed with the answers it has; the run finishes only after the last one.

Results are acked as they are counted: an evaluation lost with a crashed server is not
redone (it changes no model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from brokerfl.handlers.workflows.scoring import score_stored
from brokerfl.runtime.handler_table import Context, Outbound, to_clients
from brokerfl.storage.model_refs import task_model_fields
from brokerfl.transports.base import bounded
from brokerfl.wire.app_metrics import Reducer, combine
from brokerfl.wire.message import EvaluateResult, EvaluateTask, Message


@dataclass(kw_only=True)
class EvaluationDeadline(Message):
    """Local timer message: stop waiting for evaluation ``task_id``."""

    LOCAL = True
    task_id: str = ""


@dataclass
class OpenEvaluation:
    task_id: str
    round: int
    model_version: int
    participants: set[str]
    started: float  # time.monotonic()
    results: dict[str, EvaluateResult] = field(default_factory=dict)
    then: Callable[[Context], list[Outbound] | None] | None = None  # what follows its close (e.g. finishing the run)


def wanted(state: Any) -> bool:
    mode = state.config.federated_evaluation
    return mode == "always" or (mode == "auto" and state.evaluate is None)


def due(state: Any, round_: int) -> bool:
    return wanted(state) and (round_ % state.config.evaluate_every == 0 or round_ >= state.config.rounds)


def request(
    ctx: Context, model: Any, participants: list[str], *, then: Callable[[Context], list[Outbound] | None] | None = None
) -> list[Outbound]:
    """The EvaluateTask for ``model`` (a stored ModelVersion) if one is due, else [] (and
    ``then`` is left to the caller)."""
    state = ctx.state
    if not participants or not due(state, model.round):
        return []
    out = close(ctx) if state.evaluation is not None else []
    task = EvaluateTask(
        round=model.round,
        model_version=model.version,
        participants=sorted(participants),
        **task_model_fields(state.config, state.store, model),
        base_fingerprint=state.app.base_fingerprint() if getattr(state, "app", None) is not None else "",
    )
    state.evaluation = OpenEvaluation(
        task.message_id, model.round, model.version, set(participants), time.monotonic(), then=then
    )
    ctx.set_timer("evaluation", state.config.strategy.round_deadline_s, EvaluationDeadline(task_id=task.message_id))
    return [*out, to_clients(task)]


def collect(result: EvaluateResult, ctx: Context) -> list[Outbound] | None:
    """Count one client's result; close the evaluation when every participant answered."""
    open_ = ctx.state.evaluation
    if open_ is None or result.task_id != open_.task_id or result.client_id not in open_.participants:
        ctx.log.info("evaluation result for no open evaluation; ignored", client=result.client_id, task=result.task_id)
        return None
    if result.error:  # the client's app could not evaluate: no scores to wait for
        ctx.log.error(
            "client evaluation failed",
            client=result.client_id,
            app=ctx.state.config.app,
            function="evaluate()",
            error=bounded(result.error, 300),
            model_version=open_.model_version,
        )
        open_.participants.discard(result.client_id)
        return close(ctx) if set(open_.results) >= open_.participants else None
    if result.num_samples < 1 or not (
        0.0 <= result.accuracy <= 1.0 or math.isnan(result.accuracy)
    ):  # NaN: the app returns no accuracy
        ctx.log.warning(
            "evaluation result out of range; ignored",
            client=result.client_id,
            num_samples=result.num_samples,
            accuracy=result.accuracy,
        )
        return None
    open_.results[result.client_id] = result
    if set(open_.results) >= open_.participants:
        return close(ctx)
    return None


def deadline(message: EvaluationDeadline, ctx: Context) -> list[Outbound] | None:
    open_ = ctx.state.evaluation
    if open_ is None or message.task_id != open_.task_id:
        return None
    ctx.log.warning(
        "evaluation deadline: closing without every answer", answered=len(open_.results), of=len(open_.participants)
    )
    return close(ctx)


def weighted_metrics(results: list[EvaluateResult], reducers: Mapping[str, Reducer] | None = None) -> dict[str, float]:
    """Every metric of the clients' results combined (brokerfl.wire.app_metrics: the
    sample-weighted mean unless the app names a reducer), and the total sample count. A
    result from a client that sends no ``metrics`` counts with its loss and accuracy."""
    entries = [(r.metrics or {"loss": r.loss, "accuracy": r.accuracy}, r.num_samples) for r in results]
    return {**combine(entries, reducers), "num_samples": sum(r.num_samples for r in results)}


# Each client's own scores ride in the line up to this many clients (a non-IID federation is
# judged client by client; past this a line would weigh megabytes and every round's kept).
CLIENT_METRICS_MAX = 1000


def client_metrics(results: list[EvaluateResult]) -> dict[str, dict[str, float]]:
    """Each client's scores (its app's metrics and sample count), by client id; {} for more
    than :data:`CLIENT_METRICS_MAX` clients."""
    if len(results) > CLIENT_METRICS_MAX:
        return {}
    return {
        r.client_id: {**(r.metrics or {"loss": r.loss, "accuracy": r.accuracy}), "num_samples": r.num_samples}
        for r in results
    }


def _number(value: float | None) -> float | None:
    """A metric for the line's top-level accuracy/loss: None when the app has none."""
    return None if value is None or math.isnan(value) else value


def close(ctx: Context) -> list[Outbound]:
    state = ctx.state
    open_, state.evaluation = state.evaluation, None
    ctx.cancel_timer("evaluation")
    results = [open_.results[c] for c in sorted(open_.results)]
    if getattr(state, "unscored", None):  # the version's own metrics line (server test data) comes first
        score_stored(ctx)
    if results:
        scores = weighted_metrics(results, getattr(getattr(state, "app", None), "reducers", None))
        metrics = {name: value for name, value in scores.items() if name != "num_samples"}
        record = {
            "round": open_.round,
            "model_version": open_.model_version,
            "evaluation": "federated",
            "accuracy": _number(metrics.get("accuracy")),
            "loss": _number(metrics.get("loss")),
            "num_samples": scores["num_samples"],
            "num_clients": len(results),
            "num_updates": None,
            "duration_s": round(time.monotonic() - open_.started, 4),
            "metrics": metrics,
            "client_metrics": client_metrics(results),
        }
        state.metrics.append(record)
        for callback in state.on_round:
            callback(record)
        ctx.log.info(
            "federated evaluation",
            round=open_.round,
            model_version=open_.model_version,
            clients=len(results),
            metrics={name: round(value, 4) for name, value in list(metrics.items())[:8]},
        )
    else:
        ctx.log.warning("federated evaluation got no answers", round=open_.round, model_version=open_.model_version)
    return (open_.then(ctx) or []) if open_.then is not None else []
