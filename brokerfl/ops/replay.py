"""Replay: recompute a run's model versions from its journal, and what-ifs.

The journal holds every ParameterUpdate and, for every stored version, a
ModelVersionStored record naming the updates folded into it, in fold order, and its hash
(version 0's record holds the initial parameters). Replay walks the journal once: updates
wait in memory until the version that folds them (or a record that drops them) comes by,
so memory stays about one round of updates however long the run.

``check`` compares each recomputed version's hash with the recorded one. A what-if
strategy aggregates the same updates of each version its own way (chained on its own
previous model), and both models are evaluated on the run's test split.

A secure round's version (``secure_aggregation``) names masked vectors, not updates: replay
unmasks their sum as the server did, from what the journal holds of the round (the public
keys, the masked vectors, the revealed shares, and the SecureRound record of who took part
in each stage), and the strategy folds that sum. No update can be replayed alone, so a
what-if is refused.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brokerfl.config import RunConfig
from brokerfl.storage.journal import Skipped
from brokerfl.storage.store import parameters_hash
from brokerfl.transports.base import Delivery
from brokerfl.wire.message import (
    ModelVersionStored,
    ParameterUpdate,
    SecureKeys,
    SecureMasked,
    SecureReveal,
    SecureRound,
    UpdateDropped,
)

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
    what_if: dict[str, float] | None = (
        None  # the target metric (brokerfl.wire.app_metrics) and loss of the what-if model
    )
    problem: str = ""
    users: list[str] = field(default_factory=list)  # who published its updates (AMQP user_id), in fold order

    @property
    def ok(self) -> bool:
        return not self.problem and self.stored_hash == self.replayed_hash


@dataclass
class ReplayResult:
    rows: list[ReplayRow]
    seconds: float
    updates_read: int
    skipped: Skipped = field(default_factory=Skipped)
    target: str = "accuracy"  # the app's target metric, the what-if's first column

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def first_diff(self) -> ReplayRow | None:
        return next((row for row in self.rows if not row.ok), None)

    def table(self, what_if: str | None = None) -> str:
        head = f"{'version':>7} {'updates':>7}  {'stored hash':<16} {'replayed hash':<16} result"
        target = self.target
        short = "acc" if target == "accuracy" else target[:12]
        if what_if:
            head += f"   {target[:12]:>8} {'loss':>8}   {what_if + ' ' + short:>12} {what_if + ' loss':>12}"
        lines = [head]
        for row in self.rows:
            line = (
                f"{row.version:>7} {row.num_updates:>7}  {row.stored_hash[:16]:<16} {row.replayed_hash[:16]:<16} "
                f"{'OK' if row.ok else 'DIFF'}"
            )
            if what_if and row.what_if is not None:
                score, loss = row.stored_metrics.get(target, float("nan")), row.stored_metrics.get("loss", float("nan"))
                line += f"   {score:>8.4f} {loss:>8.4f}   {row.what_if[target]:>12.4f} {row.what_if['loss']:>12.4f}"
            if row.problem:
                line += f"  ({row.problem})"
            if any(row.users):
                line += "  from " + _publishers(row.users)
            lines.append(line)
        bad = sum(not row.ok for row in self.rows)
        lines.append(f"{len(self.rows)} versions, {bad} DIFF; {self.updates_read} updates read in {self.seconds:.2f} s")
        lines.append(self.skipped.summary())
        return "\n".join(lines)


def _publishers(users: list[str]) -> str:
    """``acme-client-0, acme-client-1 x2``: each publishing user once, with its count."""
    counts: dict[str, int] = {}
    for user in users:
        counts[user or "?"] = counts.get(user or "?", 0) + 1
    return ", ".join(user + (f" x{n}" if n > 1 else "") for user, n in counts.items())


def replay(
    journal: Iterable[Delivery],
    config: RunConfig,
    *,
    what_if: str | None = None,
    what_if_options: dict[str, Any] | None = None,
    from_version: int = 0,
    to_version: int | None = None,
) -> ReplayResult:
    """Recompute versions ``from_version``..``to_version`` of the journaled run."""
    from brokerfl.handlers.strategies.base import strategy_for_run

    started = time.perf_counter()
    if what_if and config.secure_aggregation is not None:
        raise ReplayError(
            "a what-if needs each update, and under secure_aggregation the journal holds only masked ones, whose sum "
            "alone can be unmasked"
        )
    original = strategy_for_run(config)  # stateful strategies carry their state from version to version
    alternative = strategy_for_run(config, what_if, what_if_options or {}) if what_if else None
    scorer = _test_scorer(config) if alternative is not None else None

    pending: dict[str, ParameterUpdate] = {}
    history: dict[int, dict[str, np.ndarray]] = {}
    alt_model: dict[str, np.ndarray] | None = None
    rows: list[ReplayRow] = []
    updates_read = 0
    skipped = Skipped()
    recorded: dict[int, str] = {}  # version -> the hash its first record named
    # A version record can reach the journal before the journal's copy of an update it
    # names: a client's publish goes to the server's queue and the journal stream, and the
    # server may fold it and record the version before the stream has appended the copy
    # (seen after a broker restart). Such a record waits for its updates, and records are
    # replayed in version order (the server journals a version's record after it sent the
    # next round's task); at the end of the journal whatever still waits is replayed as it
    # is (a missing update or version is a DIFF).
    waiting: list[ModelVersionStored] = []  # by version
    past_range = False
    # A drop record names the update it dropped; for a duplicate of an update already folded
    # (a copy redelivered after a reconnect) it can precede the record of the version that
    # holds the first copy. Dropped updates are set aside (the newest few) instead of
    # forgotten, and a version record takes back the ones it names.
    set_aside: dict[str, ParameterUpdate] = {}
    set_aside_max = 16
    secure = SecureRounds()

    def replay_record(record: ModelVersionStored) -> None:
        nonlocal alt_model
        if not history and record.version != 0:
            raise ReplayError(
                f"the journal begins after version 0 (its first version record is v{record.version}): "
                "retention removed the start of the run; raise journal_max_bytes / journal_max_age to replay runs this "
                "size"
            )
        row, model = _replay_version(record, original, pending, history, config, secure)
        row.users = [pending[uid].user_id for uid in record.update_ids if uid in pending]
        history[record.version] = model
        for old in [v for v in history if v < record.version - HISTORY]:
            del history[old]
        if alternative is not None and record.version > 0 and not row.problem:
            alt_model = alternative.replay_version(
                record.version - 1, alt_model, row_updates(record, pending, history, config), history
            )
            row.what_if = scorer(alt_model)
        elif record.version == 0:
            alt_model = model  # the what-if chain starts from the same initial model
        for uid in record.update_ids:
            if isinstance(done := pending.pop(uid, None), SecureMasked):
                secure.forget(done.session)
        if record.version >= from_version:
            rows.append(row)

    def replay_ready(*, all_of_them: bool = False) -> None:
        while waiting and (
            all_of_them
            or (_next_in_order(waiting[0], history) and all(uid in pending for uid in waiting[0].update_ids))
        ):
            replay_record(waiting.pop(0))

    for delivery in journal:
        kind = delivery.envelope.type
        if delivery.routing_key.startswith("dead."):
            continue  # a dead letter was never folded
        if kind in (ParameterUpdate.TYPE, SecureMasked.TYPE):
            update = skipped.message(delivery, MESSAGE_OF[kind])
            if update is None or update.message_id in pending:
                continue  # the first copy of an id is the one a version names (the server dedupes the same way)
            pending[update.message_id] = update
            updates_read += 1
        elif kind in (SecureKeys.TYPE, SecureReveal.TYPE) and delivery.routing_key.startswith("server."):
            if (message := skipped.message(delivery, MESSAGE_OF[kind])) is not None:
                secure.take(message)
        elif kind == SecureRound.TYPE:
            if (round_record := skipped.record(delivery, SecureRound)) is not None:
                secure.take(round_record)
        elif kind == UpdateDropped.TYPE:
            dropped = skipped.record(delivery, UpdateDropped)
            if (
                dropped is not None
                and dropped.update_id in pending
                and not any(dropped.update_id in r.update_ids for r in waiting)
            ):
                set_aside[dropped.update_id] = pending.pop(dropped.update_id)
                while len(set_aside) > set_aside_max:
                    del set_aside[next(iter(set_aside))]
        elif kind == ModelVersionStored.TYPE and not past_range:
            record = skipped.record(delivery, ModelVersionStored)
            if record is None:
                continue
            if record.version in recorded:
                if recorded[record.version] != record.sha256:
                    skipped.add("second record of a version, with another hash")
                continue  # the same record again: journaled once more by a process that resumed
            recorded[record.version] = record.sha256
            if to_version is not None and record.version > to_version:
                past_range = True
            else:
                for uid in record.update_ids:
                    if uid in set_aside and uid not in pending:
                        pending[uid] = set_aside.pop(uid)
                set_aside_max = max(set_aside_max, 2 * len(record.update_ids))
                waiting.append(record)
                waiting.sort(key=lambda r: r.version)
        replay_ready()
        if past_range and not waiting:
            break
    replay_ready(all_of_them=True)
    if not rows:
        raise ReplayError("the journal holds no model version records in that range (was the run's journal on?)")
    return ReplayResult(
        rows,
        time.perf_counter() - started,
        updates_read,
        skipped,
        target=_target_name(config) if alternative is not None else "accuracy",
    )


MESSAGE_OF = {m.TYPE: m for m in (ParameterUpdate, SecureMasked, SecureKeys, SecureReveal)}


@dataclass
class SecureRounds:
    """What the journal holds of secure rounds not yet replayed, by session: the clients'
    keys and reveals (first copies) and the server's SecureRound record."""

    keys: dict[str, dict[str, SecureKeys]] = field(default_factory=dict)
    reveals: dict[str, dict[str, SecureReveal]] = field(default_factory=dict)
    rounds: dict[str, SecureRound] = field(default_factory=dict)

    def take(self, message: SecureKeys | SecureReveal | SecureRound) -> None:
        if isinstance(message, SecureRound):
            if message.version is not None:
                self.rounds.setdefault(message.session, message)
            return
        into = self.keys if isinstance(message, SecureKeys) else self.reveals
        into.setdefault(message.session, {}).setdefault(message.client_id, message)

    def forget(self, session: str) -> None:
        for held in (self.keys, self.reveals, self.rounds):
            held.pop(session, None)

    def sum_of(self, masked: list[SecureMasked], parent: dict[str, np.ndarray], config: RunConfig):
        """The round's unmasked sum, as the server computed it (its own functions)."""
        from brokerfl.handlers.secure import protocol, quantise
        from brokerfl.handlers.secure.run_settings import settings_for
        from brokerfl.handlers.strategies.base import SecureSum

        session = masked[0].session
        record = self.rounds.get(session)
        if record is None:
            raise ReplayError(f"no SecureRound record of session {session[:12]} in the journal")
        keys, reveals = self.keys.get(session, {}), self.reveals.get(session, {})
        missing = [c for c in record.keys if c not in keys] + [c for c in record.revealed if c not in reveals]
        if missing:
            raise ReplayError(f"secure round {session[:12]}: the journal lacks messages of clients {missing[:5]}")
        settings = settings_for(config)
        try:
            total = protocol.unmask(
                session=session,
                settings=settings,
                keys={c: (keys[c].c_pk, keys[c].s_pk, keys[c].seed_commitment) for c in record.keys},
                shared=set(record.shared),
                masked={m.client_id: m.vector for m in masked},
                revealed={c: (reveals[c].seed_shares, reveals[c].key_shares) for c in record.revealed},
            )
            delta_sum, weight, _ = quantise.decode_sum(total, parent, settings.quantisation)
        except (protocol.ProtocolError, quantise.QuantiseError) as exc:
            raise ReplayError(f"secure round {session[:12]}: {exc}") from None
        return [SecureSum(delta_sum, float(weight), len(masked))]


def _next_in_order(record: ModelVersionStored, history: dict[int, Any]) -> bool:
    """Whether ``record`` is the version after the last one replayed (version 0 first)."""
    return record.version == (max(history) + 1 if history else 0)


def row_updates(
    record: ModelVersionStored,
    pending: dict[str, ParameterUpdate],
    history: dict[int, Any] | None = None,
    config: RunConfig | None = None,
) -> list[ParameterUpdate]:
    """The updates a version holds, as the server folded them: a compressed one decompressed
    against the version it was trained on (the server's own function, so bit for bit)."""
    updates = [pending[uid] for uid in record.update_ids]
    if not any(getattr(u, "compression", "") for u in updates):  # a secure round's masked vectors: none
        return updates
    from brokerfl.handlers.workflows.server_state import decompressed

    out = []
    for update in updates:
        if update.compression:
            base = (history or {}).get(update.model_version)
            if base is None:
                raise ReplayError(
                    f"update {update.message_id} is compressed against version {update.model_version}, which was not "
                    "replayed"
                )
            update = dataclasses.replace(update, parameters=decompressed(update, base, config), compression="")
        out.append(update)
    return out


def _replay_version(
    record: ModelVersionStored,
    strategy: Any,
    pending: dict[str, ParameterUpdate],
    history: dict[int, Any],
    config: RunConfig | None = None,
    secure: SecureRounds | None = None,
):
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
        row.problem = (
            f"version {record.version - 1} not replayed"
            if parent is None
            else f"{len(missing)} update(s) not in the journal, e.g. {missing[0]}"
        )
        return row, parent if parent is not None else {}
    updates = row_updates(record, pending, history, config)
    if updates and isinstance(updates[0], SecureMasked):
        try:
            updates = (secure or SecureRounds()).sum_of(updates, parent, config)
        except ReplayError as exc:
            row.problem = str(exc)
            return row, parent
    model = strategy.replay_version(record.version - 1, parent, updates, history)
    row.replayed_hash = parameters_hash(model)
    return row, model


def _target_name(config: RunConfig) -> str:
    from brokerfl.app import load_app

    return load_app(config).target.name


def _test_scorer(config: RunConfig):
    """The app's evaluation on the server's test data: its target metric and loss (NaN
    without test data, or for a metric the app does not return)."""
    from brokerfl.app import load_app

    app = load_app(config)
    evaluate = app.evaluator(app.load_server_test(config.seed))
    target = app.target.name

    def score(parameters: dict[str, np.ndarray]) -> dict[str, float]:
        if evaluate is None:
            return {target: float("nan"), "loss": float("nan")}
        result = evaluate(parameters)
        return {target: result[target], "loss": result.get("loss", float("nan"))}

    return score
