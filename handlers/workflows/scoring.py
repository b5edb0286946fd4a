"""Scoring a stored version off the critical path, then recording it.

The server stores a version and sends the next round's task first; then it evaluates the
version on its test data on a thread aside (the :class:`ScoreStored` timer, due at once,
polled every ``SCORE_POLL_S``) while the clients train and their updates come in. Only when
the score is in are the version's journal record and metrics line written. Versions are
scored in order: storing the next one, or finishing the run, first scores any still waiting
(:func:`score_stored`). Used by ``handlers/workflows/server_state.py`` (storing a version)
and ``handlers/workflows/lifecycle.py`` (whose set handles the timer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brokerfl.runtime.handler_table import Context, Outbound
from brokerfl.runtime.threads import process_thread
from brokerfl.runtime.timing import timings
from brokerfl.storage.store import ModelVersion
from brokerfl.transports.base import bounded
from brokerfl.transports.topology import AUDIT
from brokerfl.wire.message import Message, ModelVersionStored


@dataclass(kw_only=True)
class ScoreStored(Message):
    """Local timer message: evaluate the stored versions that wait for their score."""

    LOCAL = True


@dataclass
class Unscored:
    """A stored version whose evaluation, journal record and metrics line are still to come."""

    model: ModelVersion
    parameters: dict[str, np.ndarray]  # its own reference: a store may drop an old version's
    record: dict[str, Any]  # its metrics line, accuracy and loss to fill in
    scores: dict[str, float] | None = None  # already evaluated (``scores_in_store``)
    running: Future[tuple[dict[str, float], float]] | None = None  # its evaluation, on the scoring thread
    summary: dict[str, Any] = field(default_factory=dict)  # for its round's log line: sampled, dropped


SCORE_POLL_S = 0.02  # how often the server looks whether an evaluation running aside has finished


def score_when_due(message: ScoreStored, ctx: Context) -> None:
    """The ``score`` timer, due at once: it fires after the handler that stored the version
    returned, so after the next round's task is published. It starts the evaluation on a
    thread of its own (torch and numpy release the GIL), so the server goes on receiving
    and folding updates meanwhile, and looks again every ``SCORE_POLL_S`` until it is done."""
    state = ctx.state
    for waiting in state.unscored:
        if waiting.scores is None and waiting.running is None and state.evaluate is not None:
            waiting.running = process_thread("evaluate").submit(_timed, state.evaluate, waiting.parameters)
    score_stored(ctx, wait=False)
    if state.unscored:
        ctx.set_timer("score", SCORE_POLL_S, ScoreStored())


def score_stored(ctx: Context, *, wait: bool = True) -> None:
    """Record the stored versions waiting for their score (oldest first): evaluate each on
    the server's test data (or take the evaluation running aside: wait for it, or with
    ``wait=False`` stop at the first one still running), then journal its record and write
    its metrics line."""
    state = ctx.state
    while state.unscored:
        waiting = state.unscored[0]
        scores = waiting.scores
        model, record = waiting.model, waiting.record
        if scores is None and waiting.running is not None:
            if not (wait or waiting.running.done()):
                return
            try:
                scores, seconds = waiting.running.result()
                timings.seconds["evaluate"] += seconds
            except Exception as exc:  # noqa: BLE001 - a scoring failure is recorded, not fatal
                record["evaluation_error"] = _evaluation_failed(ctx, exc, model.version)
        elif scores is None and state.evaluate is not None:
            with timings.phase("evaluate"):
                scores, error = evaluate_safely(ctx, state.evaluate, waiting.parameters, version=model.version)
            if error is not None:
                record["evaluation_error"] = error
        state.unscored.pop(0)
        if scores is not None:
            kept = {name: value for name, value in scores.items() if name != "num_samples"}
            model.metrics.update(kept)
            record.update(accuracy=kept.get("accuracy"), loss=kept.get("loss"))
            record.setdefault("metrics", {}).update(kept)
            if waiting.scores is None:  # evaluated after the version was stored: the store learns them now
                state.store.put_scores(model.version, kept)
        journal_version(ctx, model)
        state.metrics.append(record)
        for callback in state.on_round:
            callback(record)
        target = getattr(state.app, "target", None)
        shown = (
            {}
            if target is None or target.name in ("accuracy", "loss")
            else {"target": f"{target.name} {_rounded(record.get('metrics', {}).get(target.name))}"}
        )
        # the round's one summary line: what an operator follows
        sampled = waiting.summary.get("sampled")
        ctx.log.info(
            f"round {model.round} closed: model version {model.version} stored",
            round=model.round,
            model_version=model.version,
            updates=f"{len(model.update_ids)}/{sampled}" if sampled else len(model.update_ids),
            dropped=waiting.summary.get("dropped", 0),
            duration_s=record.get("duration_s"),
            accuracy=_rounded(record["accuracy"]),
            loss=_rounded(record["loss"]),
            **shown,
        )
    ctx.cancel_timer("score")


EVALUATION_ERROR_CHARS = 500  # of a failed server evaluation's error, in its metrics line


def evaluate_safely(
    ctx: Context, evaluate: Callable[[Any], dict[str, float]], parameters: dict[str, np.ndarray], *, version: int
) -> tuple[dict[str, float] | None, str | None]:
    """``(scores, None)``, or ``(None, error)`` when the app's evaluation raised: a scoring
    failure is logged and recorded (the metrics line's ``evaluation_error``), not fatal."""
    try:
        return evaluate(parameters), None
    except Exception as exc:  # noqa: BLE001 - a scoring failure is recorded, not fatal
        return None, _evaluation_failed(ctx, exc, version)


def _evaluation_failed(ctx: Context, error: BaseException, version: int) -> str:
    text = bounded(f"{type(error).__name__}: {error}", EVALUATION_ERROR_CHARS)
    ctx.log.error(
        "server evaluation failed: the version is recorded without its scores, training goes on",
        model_version=version,
        error=text,
        exc_info=error,
    )
    return text


def _timed(
    evaluate: Callable[[Any], dict[str, float]], parameters: dict[str, np.ndarray]
) -> tuple[dict[str, float], float]:
    start = time.perf_counter()
    scores = evaluate(parameters)
    return scores, time.perf_counter() - start  # added to timings on the server's own thread


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def journal_version(ctx: Context, model: ModelVersion, *, with_parameters: bool = False) -> None:
    """Record the version in the journal (what replay and inspect read)."""
    if not ctx.state.config.journal:
        return
    record = ModelVersionStored(
        round=model.round,
        model_version=model.version,
        version=model.version,
        parent=model.parent,
        strategy=model.strategy,
        update_ids=list(model.update_ids),
        sha256=model.sha256,
        metrics={k: v for k, v in model.metrics.items() if v is not None},  # a version killed before its score has none
        parameters=model.parameters if with_parameters else {},
    )
    ctx.send(Outbound(AUDIT, record))
