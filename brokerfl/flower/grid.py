"""Flower's ``Grid`` over a brokerfl server worker, with durable execution.

A Flower ``ServerApp`` is imperative: its ``main(grid, context)`` loops over exchanges
with the nodes (``send_and_receive``, or ``push_messages`` then ``pull_messages``). It runs
as the server worker's driver (:meth:`brokerfl.runtime.handler_table.Context.drive`), on a
thread of its own, and this grid is its only way out: it asks the worker's table to send
(:class:`GridPush`, :class:`GridRecord`, posted LOCAL messages that handlers turn into
messages the worker publishes with confirms) and takes the replies the table's
``FlowerReply`` handler hands it (:meth:`BrokerGrid.take_reply`).

Decision: a killed ServerApp resumes by durable execution, not by a snapshot of its
memory (which brokerfl cannot take of arbitrary user code). The restarted process runs
the ServerApp again from the start, with the same seeds, and the grid answers what the
journal already holds:

- every request the app pushes is numbered (``seq``) and hashed (what it asks, to whom);
  a re-issued request whose number is in the journal must have the journaled hash, else
  the app diverged (changed code, unseeded randomness, the wall clock) and the run stops
  with :class:`Diverged` saying where. A matching one is not sent again: the node has it,
  or answered it;
- every reply a node sent is in the journal, and is used once: a second reply to one
  request (a node killed after replying, its request redelivered) is dropped;
- every ``pull_messages`` / ``send_and_receive`` that returned replies left a
  :class:`~brokerfl.wire.message.FlowerExchange` record saying which, so the re-run gets
  exactly those, even where a timeout cut the first run's wait short.

Past the journal's end the run goes on live. Replies are returned in the order of their
requests, never in arrival order, so an uninterrupted and a resumed run aggregate the same
replies in the same order: bit for bit the same model.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from brokerfl.flower import flower_message, records, run_id_of
from brokerfl.runtime.handler_table import Post
from brokerfl.wire.message import FlowerExchange, FlowerReply, FlowerRequest, Message
from brokerfl.wire.names import bounded

AGAIN = "again"  # take_reply: a reply it already has, delivered again (not a second reply)
WAIT_SLICE_S = 0.5  # a waiting ServerApp looks at its cancel event at least this often
MESSAGE_UNAVAILABLE = 3  # flwr.common.constant.ErrorCode: the request expired before a reply came
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the ServerApp's own node id


class GridClosed(BaseException):
    """Raised inside the ServerApp when the run ends under it (aborted, or its server
    stopping). A BaseException, so that an app's ``except Exception`` does not take it for
    a failed round and go on."""


class Diverged(RuntimeError):
    """A restarted ServerApp asked something other than what its journal holds."""


@dataclass(kw_only=True)
class GridPush(Message):
    """The ServerApp's requests, for the worker to publish (a LOCAL message)."""

    LOCAL = True

    requests: list[FlowerRequest] = field(default_factory=list)
    sent: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass(kw_only=True)
class GridRecord(Message):
    """What an exchange returned to the ServerApp, for the journal (a LOCAL message), and
    the replies' metrics for ``metrics.jsonl``."""

    LOCAL = True

    exchange: FlowerExchange
    metrics: list[dict[str, Any]] = field(default_factory=list)
    sent: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class Journaled:
    """What a run's journal holds of its Flower exchanges (read at a server's start)."""

    requests: dict[int, FlowerRequest] = field(default_factory=dict)  # by seq, content dropped
    replies: dict[str, FlowerReply] = field(default_factory=dict)  # by request id: the first
    exchanges: dict[int, FlowerExchange] = field(default_factory=dict)  # by call
    finished: str | None = None  # the run's RunFinished reason, if it has one

    def add(self, message: Message) -> None:
        if isinstance(message, FlowerRequest):
            message.content = {}
            self.requests.setdefault(message.seq, message)
        elif isinstance(message, FlowerReply):
            self.replies.setdefault(message.request_id, message)
        elif isinstance(message, FlowerExchange):
            self.exchanges.setdefault(message.call, message)


@dataclass
class _Sent:
    seq: int
    client_id: str
    node_id: int
    message_type: str
    group_id: str
    created_at: float
    ttl: float


class BrokerGrid:
    """Flower's ``Grid`` (an instance of it: :func:`flower_grid` makes the subclass), for
    the nodes ``nodes`` (node id -> client id) of run ``run``."""

    def __init__(
        self,
        run: str,
        nodes: dict[int, str],
        *,
        journaled: Journaled | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.run_name = run
        self.run_id = run_id_of(run)
        self.nodes = dict(nodes)
        self.journaled = journaled or Journaled()
        self.wall = wall
        self.changed = threading.Condition()
        self.sent: dict[str, _Sent] = {}  # request id -> what was asked
        self.replies: dict[str, FlowerReply] = {}  # request id -> its reply, until the app takes it
        self.taken: set[str] = set()  # request ids whose reply (or expiry) the app got
        self.expired: set[str] = set()  # of those, the ones it got an expiry error for
        self.seq = 0  # requests pushed so far
        self.calls = 0  # exchanges that returned something so far
        self.paused = False
        self.replayed = 0  # requests answered from the journal (resumed runs)
        self._post: Post | None = None
        self._cancelled: threading.Event | None = None
        self._run: Any = None
        self.owners = {r.request_id: r.client_id for r in self.journaled.requests.values()}  # request id -> client
        self.reply_ids: dict[str, str] = {}  # request id -> the message id of the reply used for it
        for reply in self.journaled.replies.values():
            self.replies[reply.request_id] = reply
            self.reply_ids[reply.request_id] = reply.message_id

    # ------------------------------------------------------------ the driver's side

    def attach(self, post: Post, cancelled: threading.Event) -> None:
        """Connect the grid to its worker (``post``) for a ServerApp about to run on this
        thread; ``cancelled`` ends its waits. Sets Flower's per-process task identity, which
        a ``Message`` the app creates takes its run and source node from (in Flower's
        deployment the ServerApp has a process of its own)."""
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = self.run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0
        self._post, self._cancelled = post, cancelled

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        if self._run is None:
            from flwr.supercore.run import Run

            self._run = Run.create_empty(self.run_id)
        return self._run

    def create_message(
        self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Any:
        from flwr.app import Message as FlowerMessage

        return FlowerMessage(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """Every node of the federation, in a fixed order. Decision: a node away still has
        its durable queue, so a request to it waits for it (as a client's tasks do); which
        nodes exist is the config's, so a re-run samples the same ones."""
        return sorted(self.nodes)

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        self._wait_unpaused()
        ids: list[str] = []
        new: list[FlowerRequest] = []
        for message in messages:
            request = self._request(message)
            ids.append(request.request_id)
            journaled = self.journaled.requests.get(request.seq)
            if journaled is not None:
                if journaled.digest != request.digest or journaled.client_id != request.client_id:
                    raise Diverged(
                        f"the ServerApp's request #{request.seq} ({request.message_type!r}, group "
                        f"{request.group_id!r}, to node {request.node_id}) is not the one its journal holds "
                        f"({journaled.message_type!r}, group {journaled.group_id!r}, to node {journaled.node_id}): "
                        "the app changed, or it depends on something other than its seeds (the clock, unseeded "
                        "randomness). A resumed run must re-issue the same requests; start a new run instead"
                    )
                request.request_id = journaled.request_id  # made from the same seq and digest anyway
                self.replayed += 1
            else:
                new.append(request)
            message.metadata.__dict__["_message_id"] = request.request_id  # as Flower's own grids set it
            with self.changed:
                self.owners[request.request_id] = request.client_id
            self.sent[request.request_id] = _Sent(
                request.seq,
                request.client_id,
                request.node_id,
                request.message_type,
                request.group_id,
                request.created_at,
                request.ttl,
            )
        if new:
            push = GridPush(requests=new)
            self._send(push, push.sent)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        asked = [i for i in message_ids if i in self.sent]
        return self._exchange(asked, deadline=None, wait=False)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        ids = self.push_messages(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._exchange(ids, deadline=deadline, wait=True)

    # ------------------------------------------------------------ the worker's side

    def take_reply(self, reply: FlowerReply) -> str | None:
        """Hand a node's reply to the app (on the worker's thread); the reason it is not
        used, if it is not (:data:`AGAIN`: the very message it has, delivered again)."""
        with self.changed:
            if self.reply_ids.get(reply.request_id) == reply.message_id:
                return AGAIN
            owner = self.owners.get(reply.request_id)
            if owner is None:
                return f"a reply to request {bounded(reply.request_id, 64)!r}, which this run never sent"
            if reply.client_id != owner:
                return f"a reply from client {reply.client_id} to a request sent to client {owner}"
            if reply.request_id in self.expired:
                return "late: its request's TTL had passed, and the ServerApp got an error for it"
            if reply.request_id in self.replies or reply.request_id in self.taken:
                return "duplicate: its request was already answered (the first reply is the one used)"
            self.replies[reply.request_id] = reply
            self.reply_ids[reply.request_id] = reply.message_id
            self.changed.notify_all()
        return None

    def close(self) -> list[FlowerReply]:
        """The run ends: the replies the ServerApp never asked for (they get a drop record)."""
        with self.changed:
            self.changed.notify_all()
            unclaimed = list(self.replies.values())
            self.replies.clear()
        return unclaimed

    def set_paused(self, paused: bool) -> None:
        with self.changed:
            self.paused = paused
            self.changed.notify_all()

    def outstanding(self) -> list[str]:
        """Client ids of requests not answered yet, in request order."""
        with self.changed:
            waiting = [s for rid, s in self.sent.items() if rid not in self.replies and rid not in self.taken]
        return [s.client_id for s in sorted(waiting, key=lambda s: s.seq)]

    # ------------------------------------------------------------ inside

    def _request(self, message: Any) -> FlowerRequest:
        meta = message.metadata
        if meta.reply_to_message_id:
            raise ValueError("push_messages takes requests, not replies (this message has a reply_to_message_id)")
        if meta.dst_node_id not in self.nodes:
            raise ValueError(f"node {meta.dst_node_id} is not a node of this federation (get_node_ids() lists them)")
        if not meta.ttl > 0:
            raise ValueError(f"a message's ttl must be positive, not {meta.ttl!r}")
        content = records.pack(message.content)
        digest = records.digest(
            message_type=meta.message_type, group_id=meta.group_id, node_id=meta.dst_node_id, content=content
        )
        seq = self.seq
        self.seq += 1
        request_id = hashlib.sha256(f"{self.run_name}\0{seq}\0{digest}".encode()).hexdigest()[:32]
        return FlowerRequest(
            run=self.run_name,
            round=_round_of(meta.group_id, content),
            client_id=self.nodes[meta.dst_node_id],
            node_id=meta.dst_node_id,
            request_id=request_id,
            message_type=meta.message_type,
            group_id=meta.group_id,
            ttl=float(meta.ttl),
            created_at=float(meta.created_at),
            seq=seq,
            digest=digest,
            content=content,
        )

    def _exchange(self, ids: list[str], *, deadline: float | None, wait: bool) -> list[Any]:
        call = self.calls
        journaled = self.journaled.exchanges.get(call)
        if journaled is not None:
            if set(journaled.request_ids) != set(ids):
                raise Diverged(
                    f"the ServerApp's exchange #{call} asks about {len(ids)} requests, the journal's about "
                    f"{len(journaled.request_ids)} others: the app changed, or it depends on something other than its "
                    "seeds; start a new run instead"
                )
            return self._returned(journaled, record=False)
        with self.changed:
            while True:
                self._check_open()
                waiting = [i for i in ids if i not in self.taken and i not in self.replies]
                expired = [i for i in waiting if self._expired(i)]
                if not wait or len(waiting) == len(expired):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                slice_s = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
                self.changed.wait(max(slice_s, 0.0))
            replied = [i for i in ids if i not in self.taken and i in self.replies]
        ordered = sorted(replied, key=lambda i: self.sent[i].seq if i in self.sent else 0)
        if not ordered and not expired:
            return []
        exchange = FlowerExchange(run=self.run_name, call=call, request_ids=list(ids), replied=ordered, expired=expired)
        return self._returned(exchange, record=True)

    def _returned(self, exchange: FlowerExchange, *, record: bool) -> list[Any]:
        with self.changed:
            replies = [self.replies.pop(i) for i in exchange.replied if i in self.replies]
        if len(replies) != len(exchange.replied):
            raise Diverged(
                f"exchange #{exchange.call} of the journal returned replies the journal does not hold: the journal "
                "is cut (retention) or is another run's"
            )
        messages = [to_flower_reply(self.run_id, reply) for reply in replies]
        messages += [self._expiry(i) for i in exchange.expired]
        if record:
            summary = reply_metrics(replies)
            grid_record = GridRecord(exchange=exchange, metrics=summary)
            self._send(grid_record, grid_record.sent)
        self.taken.update(exchange.replied)
        self.taken.update(exchange.expired)
        self.expired.update(exchange.expired)
        self.calls += 1
        return messages

    def _expired(self, request_id: str) -> bool:
        sent = self.sent.get(request_id)
        return sent is not None and sent.created_at + sent.ttl < self.wall()

    def _expiry(self, request_id: str) -> Any:
        from flwr.app import Error, Metadata

        sent = self.sent[request_id]
        metadata = Metadata(
            run_id=self.run_id,
            message_id=hashlib.sha256(f"expired\0{request_id}".encode()).hexdigest()[:32],
            src_node_id=sent.node_id,
            dst_node_id=SUPERLINK_NODE_ID,
            reply_to_message_id=request_id,
            group_id=sent.group_id,
            created_at=sent.created_at + sent.ttl,
            ttl=0.0,
            message_type=sent.message_type,
        )
        reason = f"no reply from node {sent.node_id} (client {sent.client_id}) within the message's TTL ({sent.ttl} s)"
        return flower_message(metadata, error=Error(MESSAGE_UNAVAILABLE, reason))

    def _send(self, message: Message, sent: concurrent.futures.Future) -> None:
        """Post ``message`` to the worker and wait until what it asks is published."""
        if self._post is None:
            raise RuntimeError("the grid is not attached to a worker")
        self._post(message)
        while True:
            self._check_open()
            try:
                sent.result(timeout=WAIT_SLICE_S)
                return
            except concurrent.futures.TimeoutError:
                continue

    def _wait_unpaused(self) -> None:
        with self.changed:
            while self.paused:
                self._check_open()
                self.changed.wait(WAIT_SLICE_S)

    def _check_open(self) -> None:
        if self._cancelled is not None and self._cancelled.is_set():
            raise GridClosed("the run ended while the ServerApp waited (aborted, or its server stopping)")


def flower_grid(*args: Any, **kwargs: Any) -> BrokerGrid:
    """A :class:`BrokerGrid` that is also an instance of Flower's ``Grid`` ABC (the class
    is made when flwr is imported, not when this module is)."""
    return _grid_class()(*args, **kwargs)


_GRID_CLASS: list[type] = []


def _grid_class() -> type:
    if not _GRID_CLASS:
        from flwr.serverapp import Grid

        _GRID_CLASS.append(type("BrokerFlowerGrid", (BrokerGrid, Grid), {"__doc__": BrokerGrid.__doc__}))
    return _GRID_CLASS[0]


def to_flower_reply(run_id: int, reply: FlowerReply) -> Any:
    """The Flower ``Message`` a reply is, as the ServerApp gets it."""
    from flwr.app import Error, Metadata

    metadata = Metadata(
        run_id=run_id,
        message_id=reply.reply_id,
        src_node_id=reply.node_id,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id=reply.request_id,
        group_id=reply.group_id,
        created_at=reply.created_at,
        ttl=reply.ttl,
        message_type=reply.message_type,
    )
    if reply.error_code is not None:
        return flower_message(metadata, error=Error(reply.error_code, reply.error_reason or None))
    return flower_message(metadata, content=records.unpack(reply.content))


def check_reply(reply: FlowerReply) -> None:
    """A reply's content as Flower will read it (:class:`records.RecordsError` if it is not),
    checked when it arrives, without building it: the ServerApp's pull builds it once."""
    if reply.error_code is None:
        records.check(reply.content)


def reply_metrics(replies: list[FlowerReply]) -> list[dict[str, Any]]:
    """One record per (group, message type) of these replies for ``metrics.jsonl``: the
    mean of every scalar metric the replies' MetricRecords hold, weighted by their
    ``num-examples`` where they say it (as Flower's strategies weigh them)."""
    groups: dict[tuple[int, str], list[FlowerReply]] = {}
    for reply in replies:
        groups.setdefault((reply.round, reply.message_type), []).append(reply)
    out = []
    for (round_, kind), members in groups.items():
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        errors = 0
        for reply in members:
            if reply.error_code is not None:
                errors += 1
                continue
            values = _scalar_metrics(reply.content)
            weight = float(values.get("num-examples", 1.0))
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + weight * value
                weights[key] = weights.get(key, 0.0) + weight
        metrics = {key: sums[key] / weights[key] for key in sums if key != "num-examples" and weights[key] > 0}
        started = min((reply.created_at for reply in members), default=0.0)
        out.append(
            {
                "round": round_,
                "flower": kind,
                "replies": len(members),
                "errors": errors,
                "metrics": metrics,
                "started": started,
            }
        )
    return out


def _scalar_metrics(content: dict[str, Any]) -> dict[str, float]:
    values: dict[str, float] = {}
    for _name, kind, items in content.get("records", []):
        if kind != records.METRICS:
            continue
        for key, value in items:
            if isinstance(value, int | float) and not isinstance(value, bool):
                values[key] = float(value)
    return values


def _round_of(group_id: str, content: dict[str, Any]) -> int:
    """The round a request belongs to, where it says: its group id if that is a number,
    else a config record's ``server-round`` (what Flower's strategies put there); else 0."""
    if group_id.isdigit() and len(group_id) < 18:
        return int(group_id)
    for _name, kind, items in content["records"]:
        if kind == records.CONFIG:
            for key, value in items:
                if key == "server-round" and type(value) is int and 0 <= value < 2**62:
                    return value
    return 0
