"""A node of a Flower app (config ``flower_app``): each logical client hosts one.

A :class:`~brokerfl.wire.message.FlowerRequest` is held unacked while the ClientApp
handles it beside the worker's I/O loop (work aside: minutes of training do not silence
the connection); its reply is published, confirmed, and only then is the request acked.
A request delivered again whose reply the node already sent (its process was killed in
between) gets the same reply, without running the app twice (:mod:`brokerfl.flower.node`).
A request whose TTL passed before the node took it is answered with Flower's
``MESSAGE_UNAVAILABLE`` error, unrun; a ClientApp that raises is answered with
``CLIENT_APP_RAISED_EXCEPTION`` and the node goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brokerfl.config import ConfigError, RunConfig
from brokerfl.flower import node_id_of
from brokerfl.flower.app_dir import FlowerAppError, node_config
from brokerfl.flower.node import MESSAGE_UNAVAILABLE, UNKNOWN, Node, to_flower_request
from brokerfl.flower.records import RecordsError
from brokerfl.handlers.workflows.flower_server import flower_app_of
from brokerfl.runtime.handler_table import Context, HandlerSet, Rejected, to_server
from brokerfl.wire.message import Exit, FlowerReply, FlowerRequest, Message
from brokerfl.wire.names import bounded

CLIENT = HandlerSet("flower node")
HANDLERS = (CLIENT,)


@dataclass(kw_only=True)
class NodeReplied(Message):
    """The ClientApp's work on a request is done (a LOCAL message): its reply (an error
    reply if the app, or the node's own machinery, failed)."""

    LOCAL = True

    request_id: str
    reply: FlowerReply


@dataclass
class FlowerNodeState:
    config: RunConfig
    client_id: str
    node: Node
    client_app: Any


def make_state(config: RunConfig, client_id: str) -> FlowerNodeState:
    app = flower_app_of(config)
    try:
        client_app = app.load_client_app()
    except FlowerAppError as exc:
        raise ConfigError(str(exc)) from None
    ids = config.client_ids()
    extra = {**config.flower_node_config.get("*", {}), **config.flower_node_config.get(client_id, {})}
    state_dir = config.client_state_dir
    node = Node(
        run=config.run,
        client_id=client_id,
        node_id=node_id_of(config.run, client_id),
        node_config=node_config(ids.index(client_id), len(ids), extra),
        run_config=dict(app.run_config),
        state_file=Path(state_dir) / config.run / f"{client_id}.flower-context" if state_dir else None,
    )
    try:
        node.load()
    except ValueError as exc:  # a context file it cannot read: say so before the run, not in the middle
        raise ConfigError(str(exc)) from None
    return FlowerNodeState(config, client_id, node, client_app)


@CLIENT.on(FlowerRequest)
def handle_request(request: FlowerRequest, ctx: Context[FlowerNodeState]):
    state = ctx.state
    node = state.node
    if request.client_id != state.client_id or request.node_id != node.node_id:
        raise Rejected(f"addressed to node {request.node_id} (client {request.client_id}), not to this one")
    again = node.answered(request)
    if again is not None:  # delivered again after its reply went out: the same reply, the app not run twice
        ctx.log.info("request delivered again: its reply is sent again", request=request.request_id)
        return [to_server(again)]
    if request.ttl > 0 and request.created_at + request.ttl < ctx.wall():  # the same answer whenever it comes
        return [
            to_server(
                node.error_reply(request, MESSAGE_UNAVAILABLE, "the message's TTL passed before the node took it")
            )
        ]
    try:
        message = to_flower_request(request)
    except RecordsError as exc:
        raise Rejected(str(exc)) from None
    app = state.client_app
    request.content = {}  # the Flower message holds the records now: one copy, not two
    ctx.hold(request.request_id)
    ctx.run_aside(
        f"flower:{request.request_id}",
        lambda cancelled: node.handle(app, request, message),
        lambda reply, error: NodeReplied(
            request_id=request.request_id,
            reply=reply
            if error is None
            else node.error_reply(request, UNKNOWN, bounded(f"the node failed: {type(error).__name__}: {error}", 1000)),
        ),
    )
    return []


@CLIENT.on(NodeReplied)
def send_reply(done: NodeReplied, ctx: Context[FlowerNodeState]):
    ctx.commit(done.request_id)
    if done.reply.error_code is not None:
        ctx.log.warning("the ClientApp failed", request=done.request_id, reason=bounded(done.reply.error_reason, 300))
    return [to_server(done.reply)]


@CLIENT.on(Exit)
def exit_node(message: Exit, ctx: Context[FlowerNodeState]):
    ctx.log.info("exit", reason=bounded(message.reason, 300))
    ctx.stop()
    return []
