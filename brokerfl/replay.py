"""Replay: recompute a run's model versions from its journal, and what-ifs.

The journal holds every ParameterUpdate and, for every stored version, a
ModelVersionStored record naming the updates folded into it, in fold order, and its hash
(version 0's record holds the initial parameters). Replay walks the journal once: updates
wait in memory until the version that folds them (or a record that drops them) comes by,
so memory stays about one round of updates however long the run.

``check`` compares each recomputed version's hash with the recorded one. A what-if
strategy aggregates the same updates of each version its own way (chained on its own
previous model), and both models are evaluated on the run's test split.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brokerfl.config import RunConfig
from brokerfl.message import ModelVersionStored, ParameterUpdate, UpdateDropped, from_wire
from brokerfl.store import parameters_hash
from brokerfl.transport import Delivery

HISTORY = 16  # recent versions' parameters kept for strategies that need a base version


class ReplayError(RuntimeError):
    pass


@dataclass
class ReplayRow:
    version: int
    round: int
    num_updates: int
    stored_hash: str
    replayed_hash: str
    stored_metrics: dict[str, float] = field(default_factory=dict)
    what_if: dict[str, float] | None = None  # accuracy and loss of the what-if model
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem and self.stored_hash == self.replayed_hash


@dataclass
class ReplayResult:
    rows: list[ReplayRow]
    seconds: float
    updates_read: int

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def first_diff(self) -> ReplayRow | None:
        return next((row for row in self.rows if not row.ok), None)

    def table(self, what_if: str | None = None) -> str:
        head = f"{'version':>7} {'updates':>7}  {'stored hash':<16} {'replayed hash':<16} result"
        if what_if:
            head += f"   {'accuracy':>8} {'loss':>8}   {what_if + ' acc':>12} {what_if + ' loss':>12}"
        lines = [head]
        for row in self.rows:
            line = f"{row.version:>7} {row.num_updates:>7}  {row.stored_hash[:16]:<16} {row.replayed_hash[:16]:<16} {'OK' if row.ok else 'DIFF'}"
            if what_if and row.what_if is not None:
                acc, loss = row.stored_metrics.get("accuracy", float("nan")), row.stored_metrics.get("loss", float("nan"))
                line += f"   {acc:>8.4f} {loss:>8.4f}   {row.what_if['accuracy']:>12.4f} {row.what_if['loss']:>12.4f}"
            if row.problem:
                line += f"  ({row.problem})"
            lines.append(line)
        bad = sum(not row.ok for row in self.rows)
        lines.append(f"{len(self.rows)} versions, {bad} DIFF; {self.updates_read} updates read in {self.seconds:.2f} s")
        return "\n".join(lines)


def replay(
    journal: Iterable[Delivery],
    config: RunConfig,
    *,
    what_if: str | None = None,
    from_version: int = 0,
    to_version: int | None = None,
) -> ReplayResult:
    """Recompute versions ``from_version``..``to_version`` of the journaled run."""
    from handlers.strategy import load_strategy

    started = time.perf_counter()
    strategy_settings = {"fraction": config.strategy.fraction, "clients_per_round": config.strategy.clients_per_round}
    original = load_strategy(config.strategy.name, **strategy_settings, **config.strategy.options)
    alternative = load_strategy(what_if, **strategy_settings) if what_if else None
    scorer = _test_scorer(config) if alternative is not None else None

    pending: dict[str, ParameterUpdate] = {}
    history: dict[int, dict[str, np.ndarray]] = {}
    alt_model: dict[str, np.ndarray] | None = None
    rows: list[ReplayRow] = []
    updates_read = 0
    for delivery in journal:
        kind = delivery.envelope.type
        if delivery.routing_key.startswith("dead."):
            continue  # a dead letter was never folded
        if kind == ParameterUpdate.TYPE:
            update = from_wire(delivery.envelope, delivery.body)
            pending[update.message_id] = update
            updates_read += 1
        elif kind == UpdateDropped.TYPE:
            pending.pop(from_wire(delivery.envelope, delivery.body).update_id, None)
        elif kind == ModelVersionStored.TYPE:
            record = from_wire(delivery.envelope, delivery.body)
            if not history and record.version != 0:
                raise ReplayError(
                    f"the journal begins after version 0 (its first version record is v{record.version}): "
                    "retention removed the start of the run; raise journal_max_bytes / journal_max_age to replay runs this size"
                )
            if to_version is not None and record.version > to_version:
                break
            row, model = _replay_version(record, original, pending, history)
            history[record.version] = model
            for old in [v for v in history if v < record.version - HISTORY]:
                del history[old]
            if alternative is not None and record.version > 0 and not row.problem:
                alt_model = alternative.replay_version(record.version - 1, alt_model, row_updates(record, pending), history)
                row.what_if = scorer(alt_model)
            elif record.version == 0:
                alt_model = model  # the what-if chain starts from the same initial model
            for uid in record.update_ids:
                pending.pop(uid, None)
            if record.version >= from_version:
                rows.append(row)
    if not rows:
        raise ReplayError("the journal holds no model version records in that range (was the run's journal on?)")
    return ReplayResult(rows, time.perf_counter() - started, updates_read)


def row_updates(record: ModelVersionStored, pending: dict[str, ParameterUpdate]) -> list[ParameterUpdate]:
    return [pending[uid] for uid in record.update_ids]


def _replay_version(record: ModelVersionStored, strategy: Any, pending: dict[str, ParameterUpdate], history: dict[int, Any]):
    row = ReplayRow(record.version, record.round, len(record.update_ids), record.sha256, "", dict(record.metrics))
    if record.version == 0:
        model = dict(record.parameters)
        if not model:
            row.problem = "version 0's record holds no parameters"
        row.replayed_hash = parameters_hash(model)
        return row, model
    parent = history.get(record.version - 1)
    missing = [uid for uid in record.update_ids if uid not in pending]
    if parent is None or missing:
        row.problem = f"version {record.version - 1} not replayed" if parent is None else f"{len(missing)} update(s) not in the journal, e.g. {missing[0]}"
        return row, parent if parent is not None else {}
    model = strategy.replay_version(record.version - 1, parent, row_updates(record, pending), history)
    row.replayed_hash = parameters_hash(model)
    return row, model


def _test_scorer(config: RunConfig):
    from handlers.datasets import load_dataset
    from handlers.trainer import evaluate

    data = load_dataset(config.data.dataset, test_fraction=config.data.test_fraction, seed=config.seed)

    def score(parameters: dict[str, np.ndarray]) -> dict[str, float]:
        result = evaluate(parameters, data.x_test, data.y_test, hidden=config.model.hidden, num_classes=data.num_classes)
        return {"accuracy": result["accuracy"], "loss": result["loss"]}

    return score
