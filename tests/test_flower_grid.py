"""The grid's durable execution and TTLs, unit by unit: a re-run ServerApp answered from
its journal (nothing sent again), one that diverges stopped with where, a reply used once,
an expired request answered with Flower's error on both sides."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import structlog

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from brokerfl.flower import node_id_of, records  # noqa: E402
from brokerfl.flower.grid import AGAIN, Diverged, GridPush, GridRecord, Journaled, flower_grid  # noqa: E402
from brokerfl.flower.node import MESSAGE_UNAVAILABLE, Node  # noqa: E402
from brokerfl.runtime.handler_table import Context  # noqa: E402
from brokerfl.wire.message import FlowerExchange, FlowerReply, FlowerRequest  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]
RUN = "grid-test"
NODES = {node_id_of(RUN, cid): cid for cid in ("0", "1")}


class Worker:
    """What a grid posts to, standing in for the server worker's table: publishing is
    instant, and what was posted is kept."""

    def __init__(self) -> None:
        self.posted: list = []

    def post(self, message) -> None:
        self.posted.append(message)
        if isinstance(message, GridPush):
            message.sent.set_result(len(message.requests))
        elif isinstance(message, GridRecord):
            message.sent.set_result(message.exchange.call)


def a_grid(journaled: Journaled | None = None):
    grid = flower_grid(RUN, NODES, journaled=journaled)
    worker = Worker()
    grid.attach(worker.post, threading.Event())
    return grid, worker


def train_message(grid, node: int, value: float = 1.0):
    content = RecordDict(
        {"arrays": ArrayRecord([np.full(3, value, dtype=np.float32)]), "config": ConfigRecord({"server-round": 1})}
    )
    return grid.create_message(content, "train", node, "1")


def reply_to(request: FlowerRequest, value: float) -> FlowerReply:
    content = records.pack(RecordDict({"arrays": ArrayRecord([np.full(3, value, dtype=np.float32)])}))
    return FlowerReply(
        run=RUN,
        client_id=request.client_id,
        node_id=request.node_id,
        request_id=request.request_id,
        reply_id=f"r-{request.seq}",
        message_type="train",
        group_id="1",
        content=content,
    )


def first_run() -> tuple[Journaled, list[FlowerRequest], list[FlowerReply]]:
    """A ServerApp's first exchange, as its journal holds it."""
    grid, worker = a_grid()
    nodes = grid.get_node_ids()
    messages = [train_message(grid, node) for node in nodes]
    ids = grid.push_messages(messages)
    (push,) = [m for m in worker.posted if isinstance(m, GridPush)]
    replies = [reply_to(request, float(i)) for i, request in enumerate(push.requests)]
    for reply in replies:
        assert grid.take_reply(reply) is None
    got = grid.pull_messages(ids)
    assert [m.metadata.reply_to_message_id for m in got] == ids
    (record,) = [m for m in worker.posted if isinstance(m, GridRecord)]
    journaled = Journaled()
    for message in [*push.requests, *replies, record.exchange]:
        journaled.add(message)
    return journaled, push.requests, replies


def test_a_re_run_is_answered_from_the_journal_and_sends_nothing():
    journaled, requests, _replies = first_run()
    grid, worker = a_grid(journaled)
    messages = [train_message(grid, node) for node in grid.get_node_ids()]
    ids = grid.push_messages(messages)
    assert ids == [r.request_id for r in requests]  # the same ids: made from the same number and hash
    got = grid.pull_messages(ids)
    assert [m.content["arrays"].to_numpy_ndarrays()[0][0] for m in got] == [0.0, 1.0]
    assert worker.posted == []  # nothing published again, nothing recorded again
    assert grid.replayed == 2


def test_a_re_run_that_asks_something_else_is_stopped_saying_where():
    journaled, _requests, _replies = first_run()
    grid, worker = a_grid(journaled)
    nodes = grid.get_node_ids()
    with pytest.raises(Diverged, match=r"request #1 .* is not the one its journal holds"):
        grid.push_messages([train_message(grid, nodes[0]), train_message(grid, nodes[1], value=2.0)])
    assert worker.posted == []


def test_a_reply_is_used_once_and_a_copy_of_it_is_not_a_second_reply():
    grid, worker = a_grid()
    (request_id,) = grid.push_messages([train_message(grid, grid.get_node_ids()[0])])
    (push,) = worker.posted
    reply = reply_to(push.requests[0], 1.0)
    assert grid.take_reply(reply) is None
    assert grid.take_reply(reply) == AGAIN  # the same message delivered again
    second = reply_to(push.requests[0], 2.0)
    second.message_id = "another"
    assert "duplicate" in grid.take_reply(second)
    stranger = reply_to(push.requests[0], 3.0)
    stranger.client_id = "1"
    stranger.message_id = "stranger"
    assert "to a request sent to client 0" in grid.take_reply(stranger)
    assert len(grid.pull_messages([request_id])) == 1
    assert grid.pull_messages([request_id]) == []  # taken: not returned twice


def test_a_request_whose_ttl_passes_is_answered_with_flowers_error():
    now = [1000.0]
    grid = flower_grid(RUN, NODES, wall=lambda: now[0])
    worker = Worker()
    grid.attach(worker.post, threading.Event())
    message = train_message(grid, grid.get_node_ids()[0])
    message.metadata.created_at = 1000.0
    message.metadata.ttl = 5.0
    now[0] = 1010.0
    (got,) = grid.send_and_receive([message], timeout=1.0)
    assert got.has_error() and got.error.code == MESSAGE_UNAVAILABLE
    (record,) = [m for m in worker.posted if isinstance(m, GridRecord)]
    assert isinstance(record.exchange, FlowerExchange) and record.exchange.expired == [got.metadata.reply_to_message_id]
    late = reply_to(worker.posted[0].requests[0], 1.0)
    assert grid.take_reply(late).startswith("late")


def test_a_node_does_not_run_a_request_whose_ttl_passed():
    from brokerfl.handlers.workflows.flower_client import FlowerNodeState, handle_request

    node = Node(run=RUN, client_id="0", node_id=node_id_of(RUN, "0"), node_config={}, run_config={})
    called = []
    state = FlowerNodeState(config=None, client_id="0", node=node, client_app=lambda m, c: called.append(m))
    request = FlowerRequest(
        run=RUN,
        client_id="0",
        node_id=node.node_id,
        request_id="q1",
        message_type="train",
        ttl=5.0,
        created_at=1000.0,
        content=records.pack(RecordDict()),
    )
    ctx = Context(role="client.0", run=RUN, state=state, log=structlog.get_logger(), wall=lambda: 1010.0)
    (out,) = handle_request(request, ctx)
    assert out.message.error_code == MESSAGE_UNAVAILABLE and not called and not ctx.aside_requests
