"""Accounting: proof that every update is in exactly one model version, or was dropped
with a recorded reason.

Inputs are what the run left behind: the journal (every ParameterUpdate sent, every
UpdateDropped record, every dead letter with its reason, the RunFinished record of where
the run ended) and the stored model versions (each lists the updates folded into it). An
update published after the run ended (a client still training when an operator aborted,
a late or forged one) has no server to take it: it counts in a category of its own, with
its sender, instead of as lost. Tests and users run the same check
(``brokerfl accounting``). The operator's admin commands are reported (with the server's
replies), not counted: an abort's unfinished round is in the UpdateDropped records.

A secure round's updates are its masked vectors (SecureMasked), which its version lists;
its SecureRound record says which clients dropped out before sending one, and at which
stage (no update came of them, so none is counted).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from brokerfl.runtime.operator_commands import AdminCommand, AdminReply
from brokerfl.storage.journal import Skipped
from brokerfl.transports.base import REASON_HEADER, Delivery
from brokerfl.wire.message import (
    MESSAGE_TYPES,
    FlowerExchange,
    FlowerReply,
    ModelVersionStored,
    ParameterUpdate,
    RunFinished,
    SecureMasked,
    SecureRound,
    TrainFailed,
    UpdateDropped,
)
from brokerfl.wire.names import bounded


@dataclass
class Accounting:
    sent: dict[str, str] = field(default_factory=dict)  # update id -> client (sender)
    users: dict[str, str] = field(default_factory=dict)  # update id -> broker user that published it (user_id)
    folded_into: defaultdict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    dropped: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dead: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    versions: int = 0
    skipped: Skipped = field(default_factory=Skipped)
    admin: list[str] = field(default_factory=list)  # the operator's commands and the replies, in order
    admin_users: dict[str, str] = field(default_factory=dict)  # admin command id -> broker user that published it
    first_version_record: int | None = None  # the first ModelVersionStored in the journal (0 unless retention cut it)
    ended: str | None = None  # the reason of the run's first RunFinished record, once the journal has one
    after_end: dict[str, str] = field(
        default_factory=dict
    )  # update id -> who published it (:func:`who`), of updates journaled after it
    train_failures: dict[str, TrainFailed] = field(
        default_factory=dict
    )  # clients' TrainFailed reports, by message id (a retried publish once)
    # A Flower app's replies count as updates, and the ServerApp's exchanges as versions: a
    # reply is "folded" into the exchange that handed it to the app (FlowerExchange records)
    flower_replies: dict[str, str] = field(default_factory=dict)  # request id -> its first reply's message id
    flower_used: list[tuple[int, str]] = field(default_factory=list)  # (exchange, request id), in journal order
    secure_rounds: list[SecureRound] = field(default_factory=list)  # the servers' records of secure rounds

    @property
    def cut_at(self) -> int | None:
        """The version at which retention cut the journal's start (its first version record,
        when that is not version 0), or None: the journal holds the whole run."""
        first = self.first_version_record
        return first if first is not None and first > 0 else None

    @property
    def counted_twice(self) -> dict[str, list[int]]:
        return {uid: vs for uid, vs in self.folded_into.items() if len(vs) > 1}

    @property
    def unaccounted(self) -> list[str]:
        return sorted(
            uid
            for uid in self.sent
            if uid not in self.folded_into
            and uid not in self.dropped
            and uid not in self.dead
            and uid not in self.after_end
        )

    @property
    def only_after_end(self) -> list[str]:
        """Updates published after the run ended that no server recorded otherwise."""
        return [
            uid
            for uid in self.after_end
            if uid not in self.folded_into and uid not in self.dropped and uid not in self.dead
        ]

    @property
    def unknown_folded(self) -> list[str]:
        """Ids in model versions that no journaled update carries. Versions up to a retention
        cut (:attr:`cut_at`) are not checked: their updates went with the journal's start."""
        cut = self.cut_at if self.cut_at is not None else -1
        if self.cut_at is not None:
            # The cut can also take part of the next version's updates: a version's record is
            # journaled after the next round's task went out (evaluation off the critical
            # path), so updates of a later version can precede it. The journal's start is
            # where its oldest kept update is; only versions past that one must be whole.
            kept = [min(versions) for uid, versions in self.folded_into.items() if uid in self.sent]
            cut = max(cut, min(kept, default=cut))
        return sorted(uid for uid, versions in self.folded_into.items() if uid not in self.sent and max(versions) > cut)

    @property
    def ok(self) -> bool:
        """Nothing counted twice or lost in what the journal holds (see also :attr:`cut_at`)."""
        return not self.counted_twice and not self.unaccounted and not self.unknown_folded

    @property
    def flower(self) -> bool:
        return bool(self.flower_replies or self.flower_used)

    def summary(self) -> str:
        if self.flower:
            return self._flower_summary()
        folded_once, only_dropped, only_dead = self._fates()
        lines = [
            f"updates sent: {len(self.sent)} over {self.versions} model versions",
            f"  folded into exactly one version: {folded_once}",
            f"  dropped with a recorded reason: {only_dropped}",
            f"  dead-lettered with a reason: {only_dead}",
            f"  published after the run ended: {len(self.only_after_end)}"
            + _from_publishers(self.after_end[u] for u in self.only_after_end),
            f"  counted twice: {len(self.counted_twice)}",
            f"  unaccounted for: {len(self.unaccounted)}",
        ]
        if self.unknown_folded:
            lines.append(f"  folded but not in the journal: {len(self.unknown_folded)}")
        for reason, count in self._drop_reasons():
            lines.append(f"    dropped as {reason}: {count}")
        lines.extend(self._failure_lines())
        lines.extend(self._secure_lines())
        if self.admin:
            lines.append(f"admin commands: {len(self.admin)}")
            lines.extend(f"  {line}" for line in self.admin[-20:])
        by_user: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])  # user -> [sent, folded]
        for uid in self.sent:
            counts = by_user[self.users.get(uid) or "(no user_id)"]
            counts[0] += 1
            counts[1] += uid in self.folded_into
        for user, (sent, folded) in sorted(by_user.items()):
            lines.append(f"  published by {user}: {sent} updates, {folded} folded")
        for uid in self.unaccounted[:10]:
            lines.append(f"  UNACCOUNTED {uid} from {who(self.users.get(uid, ''), self.sent[uid])}")
        for uid, versions in list(self.counted_twice.items())[:10]:
            lines.append(f"  COUNTED TWICE {uid} in versions {versions}")
        lines.append(self.skipped.summary())
        if self.cut_at is not None:
            lines.append(
                f"the journal's start was cut by retention at version {self.cut_at}: the updates of versions up to "
                f"{self.cut_at} are not in it and cannot be checked (raise journal_max_bytes / journal_max_age to keep "
                "whole runs)"
            )
            lines.append(
                f"PARTIAL: every update after version {self.cut_at} is accounted for exactly once"
                if self.ok
                else "FAILED"
            )
        else:
            lines.append("OK: every update is accounted for exactly once" if self.ok else "FAILED")
        return "\n".join(lines)

    def _flower_summary(self) -> str:
        used_once, only_dropped, only_dead = self._fates()
        lines = [
            f"Flower replies sent: {len(self.sent)} over {self.versions} exchanges with the ServerApp",
            f"  used by the ServerApp exactly once: {used_once}",
            f"  not used, with a recorded reason: {only_dropped}",
            f"  dead-lettered with a reason: {only_dead}",
            f"  published after the run ended: {len(self.only_after_end)}",
            f"  used twice: {len(self.counted_twice)}",
            f"  unaccounted for: {len(self.unaccounted)}",
        ]
        for reason, count in self._drop_reasons():
            lines.append(f"    not used: {reason}: {count}")
        for uid in self.unaccounted[:10]:
            lines.append(f"  UNACCOUNTED {uid} from {who(self.users.get(uid, ''), self.sent[uid])}")
        lines.append(self.skipped.summary())
        lines.append("OK: every reply is accounted for exactly once" if self.ok else "FAILED")
        return "\n".join(lines)

    def _fates(self) -> tuple[int, int, int]:
        """Of the updates sent: (folded into exactly one version, only dropped on record, only
        dead-lettered)."""
        once = sum(1 for uid in self.sent if len(self.folded_into.get(uid, ())) == 1)
        dropped = sum(1 for uid in self.sent if uid not in self.folded_into and uid in self.dropped)
        dead = sum(
            1 for uid in self.sent if uid not in self.folded_into and uid not in self.dropped and uid in self.dead
        )
        return once, dropped, dead

    def _drop_reasons(self) -> list[tuple[str, int]]:
        """How many updates dropped and never folded, by their first reason's kind (its text
        before a colon), sorted."""
        reasons: defaultdict[str, int] = defaultdict(int)
        for uid, why in self.dropped.items():
            if uid not in self.folded_into:
                reasons[why[0].split(":")[0]] += 1
        return sorted(reasons.items())

    def _secure_lines(self) -> list[str]:
        """Secure rounds: how each ended, and the clients that dropped out before sending a
        masked vector (no update came of them), by stage."""
        if not self.secure_rounds:
            return []
        dropped = [r for r in self.secure_rounds if r.version is None]
        lines = [f"secure rounds: {len(self.secure_rounds)}, {len(dropped)} dropped"]
        for record in dropped[-5:]:
            lines.append(f"  round {record.round} dropped: {bounded(record.dropped, 200)}")
        stages: defaultdict[str, int] = defaultdict(int)
        for record in self.secure_rounds:
            for client, why in record.dropouts.items():
                if client not in record.masked:
                    stages[why.split(":")[0]] += 1
        for stage, count in sorted(stages.items()):
            lines.append(f"  clients out before sending a masked vector, at {bounded(stage, 60)}: {count}")
        return lines

    def _failure_lines(self) -> list[str]:
        """Trainings the clients reported failed: no update came of them (not counted above)."""
        by_client: defaultdict[str, list[TrainFailed]] = defaultdict(list)
        for failure in self.train_failures.values():
            by_client[failure.client_id].append(failure)
        lines = [
            f"training failures: {len(self.train_failures)}"
            + (f" (clients {', '.join(sorted(by_client))})" if by_client else "")
        ]
        for client, failures in sorted(by_client.items()):
            last = failures[-1]
            lines.append(f"  client {client}: {len(failures)}, last in round {last.round}: {bounded(last.error, 120)}")
        return lines


def _from_publishers(publishers: Iterable[str]) -> str:
    counts: defaultdict[str, int] = defaultdict(int)
    for publisher in publishers:
        counts[publisher] += 1
    if not counts:
        return ""
    shown = sorted(counts.items(), key=lambda kv: -kv[1])[:5]
    return (
        ", from "
        + ", ".join(f"{publisher} ({n})" for publisher, n in shown)
        + (f" and {len(counts) - 5} more" if len(counts) > 5 else "")
    )


def account(
    journal: Iterable[Delivery], versions: Iterable[Mapping[str, Any]], *, run: str | None = None
) -> Accounting:
    """Check a journal (in order) against stored model versions' metadata. With ``run``,
    a dead letter of an update counts only if a client of the run did not publish it: only
    the server consumes updates, so a client's ``dead.parameter_update`` is a forgery (one
    that would pass another client's lost update off as dead-lettered with a reason)."""
    result = Accounting()
    skipped = result.skipped
    clients = f"{run}-client-" if run is not None else None  # brokerfl.runtime.identity.client_user's names
    for delivery in journal:
        kind, key = delivery.envelope.type, delivery.routing_key
        if key.startswith("dead."):
            if kind in UPDATES and clients is not None and delivery.envelope.user_id.startswith(clients):
                skipped.add("dead letter of an update published by a client (only the server dead-letters updates)")
            elif kind in UPDATES and not delivery.problem:
                result.dead[delivery.envelope.message_id].append(str(delivery.envelope.headers.get(REASON_HEADER, "")))
        elif kind in UPDATES:
            # Only updates that decode are updates of the run; the server dead-letters the rest.
            update = skipped.message(delivery, UPDATES[kind])
            if update is not None:
                result.sent.setdefault(update.message_id, update.sender)
                result.users.setdefault(update.message_id, delivery.envelope.user_id)
                if result.ended is not None:
                    result.after_end.setdefault(update.message_id, who(delivery.envelope.user_id, update.sender))
        elif kind == FlowerReply.TYPE and key.startswith("server."):  # as nodes send them
            reply = skipped.message(delivery, FlowerReply)
            if reply is not None:
                result.sent.setdefault(reply.message_id, reply.client_id)
                result.users.setdefault(reply.message_id, delivery.envelope.user_id)
                result.flower_replies.setdefault(reply.request_id, reply.message_id)
                if result.ended is not None:
                    result.after_end.setdefault(reply.message_id, who(delivery.envelope.user_id, reply.client_id))
        elif kind == FlowerExchange.TYPE and key.startswith("audit."):
            exchange = skipped.record(delivery, FlowerExchange)
            if exchange is not None:
                result.versions += 1
                result.flower_used += [(exchange.call, rid) for rid in exchange.replied]
        elif kind == SecureRound.TYPE and key.startswith("audit.") and not delivery.problem:
            secure_round = skipped.record(delivery, SecureRound)
            if secure_round is not None:
                result.secure_rounds.append(secure_round)
        elif kind == RunFinished.TYPE and result.ended is None and not delivery.problem:
            record = skipped.record(delivery, RunFinished)
            if record is not None:
                result.ended = record.reason or "finished"
        elif kind == UpdateDropped.TYPE:
            record = skipped.record(delivery, UpdateDropped)
            if record is not None:
                result.dropped[record.update_id].append(record.reason)
        elif kind == TrainFailed.TYPE and key.startswith("server."):  # as clients send it
            failure = skipped.message(delivery, TrainFailed)
            if failure is not None:
                result.train_failures.setdefault(failure.message_id, failure)
        elif kind == AdminReply.TYPE and not delivery.problem:
            reply = skipped.record(delivery, AdminReply)
            if reply is not None:
                user = reply.user or result.admin_users.get(reply.command_id, "")
                result.admin.append(
                    f"{reply.command} by {who(user, reply.by)} at round {reply.round}: "
                    f"{'ok' if reply.ok else 'refused'}: {reply.text}"
                )
        elif _is_admin_command(kind) and not delivery.problem:  # who published it, as the broker validated it
            result.admin_users[delivery.envelope.message_id] = delivery.envelope.user_id
        elif kind == ModelVersionStored.TYPE and result.first_version_record is None and not delivery.problem:
            record = skipped.record(delivery, ModelVersionStored)
            if record is not None:
                result.first_version_record = record.version
        elif delivery.problem:
            skipped.add("unreadable envelope")
    for call, request_id in result.flower_used:
        reply_id = result.flower_replies.get(request_id)
        if reply_id is not None:  # else: its reply is not in the journal (cut), as an unknown fold
            result.folded_into[reply_id].append(call)
        else:
            result.folded_into[f"reply to {request_id}"].append(call)
    for meta in versions:
        result.versions += 1
        for uid in meta["update_ids"]:
            result.folded_into[uid].append(meta["version"])
    return result


UPDATES = {ParameterUpdate.TYPE: ParameterUpdate, SecureMasked.TYPE: SecureMasked}  # what a version folds


def who(user: str, claim: str) -> str:
    """A publisher as RabbitMQ validated it (``user_id``), and what it claims (``sender``)
    beside it only where the two differ: the claim is anyone's to write."""
    user, claim = bounded(user or "", 64), bounded(claim or "", 120)
    if not user:
        return f"user ? (claims {claim})" if claim else "user ?"
    return f"user {user}" + (f" (claims {claim})" if claim and claim != user else "")


def _is_admin_command(kind: str) -> bool:
    cls = MESSAGE_TYPES.get(kind)
    return cls is not None and issubclass(cls, AdminCommand)


def account_run(transport: Any, topology: Any, store: Any) -> Accounting:
    """Read a run's journal over ``transport`` and check it against ``store``'s versions."""
    from brokerfl.storage.journal import read_journal

    versions = (store.metadata(v) for v in store.versions())
    # swarm: the aggregator is a peer, whose user is a client's
    return account(read_journal(transport, topology), versions, run=None if topology.swarm else topology.run)


def account_journal(journal: Iterable[Delivery], *, run: str | None = None) -> Accounting:
    """Check a journal alone (a file from ``simulate --journal`` or ``brokerfl journal
    export``): the versions are its ModelVersionStored records, as ``replay`` reads them.
    ``run``: as for :func:`account` (None: a swarm's, or a file whose run is not known)."""
    versions: dict[int, dict[str, Any]] = {}
    skipped = Skipped()

    def noting_versions() -> Iterator[Delivery]:
        for delivery in journal:
            if (
                delivery.envelope.type == ModelVersionStored.TYPE
                and not delivery.problem
                and not delivery.routing_key.startswith("dead.")
            ):
                record = skipped.record(delivery, ModelVersionStored)
                if record is not None:
                    versions.setdefault(
                        record.version, {"version": record.version, "update_ids": list(record.update_ids)}
                    )
            yield delivery

    def noted_versions() -> Iterator[dict[str, Any]]:  # read by account() after the whole journal
        for version in sorted(versions):
            yield versions[version]

    result = account(noting_versions(), noted_versions(), run=run)
    result.skipped.counts.update(skipped.counts)  # version records that are not the server's
    return result
