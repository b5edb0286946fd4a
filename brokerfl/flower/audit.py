"""``brokerfl replay --check`` for a Flower run: the aggregates its ServerApp produced,
recomputed from the journal.

A Flower ServerApp aggregates in its own code, so brokerfl cannot re-run its strategy;
what it can check is the arithmetic of the weighted mean that FedAvg-style strategies
compute. For every exchange that returned ``train`` replies (a
:class:`~brokerfl.wire.message.FlowerExchange` record), the replies' arrays, weighted by
their ``num-examples`` metric, are averaged in the order the app got them, and compared
with the arrays the app sent next (its next requests that carry arrays of the same names
and shapes): the model it made of them. A strategy that is not a weighted mean (median,
Krum, a server optimiser) differs, and the check says by how much.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from brokerfl.flower import records
from brokerfl.transports.base import Delivery
from brokerfl.wire.codec import DecodeError
from brokerfl.wire.message import FlowerExchange, FlowerReply, FlowerRequest, from_wire

RTOL, ATOL = 1e-5, 1e-6  # float32 sums in another order than the strategy's


@dataclass
class AggregateCheck:
    call: int
    round: int
    replies: int
    max_abs_diff: float | None  # None: no later request carried the aggregate (the run's last)
    ok: bool
    problem: str = ""


def check_weighted_means(journal: Iterable[Delivery]) -> list[AggregateCheck]:
    """One row per train exchange of the journal, in order."""
    replies: dict[str, FlowerReply] = {}
    pending: list[tuple[FlowerExchange, dict[str, np.ndarray], int]] = []  # waiting for the next arrays sent
    rows: list[AggregateCheck] = []
    for delivery in journal:
        if delivery.problem or delivery.routing_key.startswith("dead."):
            continue
        kind = delivery.envelope.type
        if kind not in (FlowerReply.TYPE, FlowerExchange.TYPE, FlowerRequest.TYPE):
            continue
        try:
            message = from_wire(delivery.envelope, delivery.body)
        except DecodeError:
            continue
        if isinstance(message, FlowerReply):
            replies.setdefault(message.request_id, message)
        elif isinstance(message, FlowerExchange):
            used = [replies[r] for r in message.replied if r in replies]
            train = [r for r in used if r.message_type.split(".")[0] == "train" and r.error_code is None]
            if train:
                mean, problem = _weighted_mean(train)
                if mean is None:
                    rows.append(AggregateCheck(message.call, train[0].round, len(train), None, False, problem))
                else:
                    pending.append((message, mean, train[0].round))
            for rid in message.replied:  # memory: a reply is checked once
                replies.pop(rid, None)
        elif pending and isinstance(message, FlowerRequest):
            sent = _arrays(message.content)
            for exchange, mean, round_ in list(pending):
                if sent.keys() == mean.keys() and all(sent[k].shape == mean[k].shape for k in mean):
                    diff = max((float(np.max(np.abs(sent[k] - mean[k]), initial=0.0)) for k in mean), default=0.0)
                    ok = all(np.allclose(sent[k], mean[k], rtol=RTOL, atol=ATOL) for k in mean)
                    rows.append(AggregateCheck(exchange.call, round_, len(exchange.replied), diff, ok))
                    pending.remove((exchange, mean, round_))
    for exchange, _mean, round_ in pending:  # the last round's aggregate went to no node
        rows.append(AggregateCheck(exchange.call, round_, len(exchange.replied), None, True))
    return sorted(rows, key=lambda row: row.call)


def _arrays(content: dict) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, kind, items in content.get("records", []):
        if kind == records.ARRAYS:
            for key, array in items:
                if array["header"]:
                    out[f"{name}/{key}"] = np.asarray(array["values"], dtype=np.float64)
    return out


def _weighted_mean(replies: list[FlowerReply]) -> tuple[dict[str, np.ndarray] | None, str]:
    total = 0.0
    sums: dict[str, np.ndarray] = {}
    for reply in replies:
        weight = None
        for _name, kind, items in reply.content.get("records", []):
            if kind == records.METRICS:
                weight = dict(items).get("num-examples", weight)
        if not isinstance(weight, int | float) or isinstance(weight, bool) or weight <= 0:
            return None, f"a reply from client {reply.client_id} has no positive num-examples metric to weigh it by"
        arrays = _arrays(reply.content)
        if sums and arrays.keys() != sums.keys():
            return None, f"client {reply.client_id}'s arrays are not the others' (names differ)"
        for key, value in arrays.items():
            sums[key] = sums.get(key, 0.0) + weight * value
        total += weight
    return {key: value / total for key, value in sums.items()}, ""


def table(rows: list[AggregateCheck]) -> str:
    lines = ["exchange  round  replies  max |recomputed - sent|  check"]
    for row in rows:
        diff = "-" if row.max_abs_diff is None else f"{row.max_abs_diff:.3g}"
        verdict = (
            "ok"
            if row.ok and row.max_abs_diff is not None
            else "not sent (the run's last)"
            if row.ok
            else f"DIFF {row.problem}".strip()
        )
        lines.append(f"{row.call:>8}  {row.round:>5}  {row.replies:>7}  {diff:>23}  {verdict}")
    return "\n".join(lines)
