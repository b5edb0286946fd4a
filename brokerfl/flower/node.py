"""A Flower node hosted by a brokerfl client: its ``Context``, kept across restarts, and
the call of the ``ClientApp`` on one request.

Decision: a node's ``Context`` (its ``state`` records above all: a ClientApp keeps what
it learns across rounds there) lives in a file of the node's own site, never on the
broker: Flower promises that ``state`` "will never leave the system it's running from".
The file is written, atomically, after the ClientApp handled a request and before its
reply is published, together with that reply. A request delivered again (the process was
killed before its ack) whose reply the file holds gets that reply again, without running
the app twice on it; one killed before the file was written runs the app again on the
``state`` the previous request left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brokerfl.flower import flower_message, records, run_id_of
from brokerfl.flower.grid import SUPERLINK_NODE_ID
from brokerfl.storage.private_files import write_private
from brokerfl.wire.codec import DecodeError, decode, encode
from brokerfl.wire.message import FlowerReply, FlowerRequest, from_wire, to_wire
from brokerfl.wire.names import bounded

UNKNOWN = 0  # flwr.common.constant.ErrorCode
CLIENT_APP_RAISED_EXCEPTION = 2
MESSAGE_UNAVAILABLE = 3
ERROR_CHARS = 1000


@dataclass
class Node:
    """One node: its ids, its ``Context`` and the reply it last sent."""

    run: str
    client_id: str
    node_id: int
    node_config: dict[str, Any]
    run_config: dict[str, Any]
    state_file: Path | None = None  # None: in memory only (simulate: the process is the federation)
    context: Any = None
    last_reply: FlowerReply | None = None
    loaded: bool = field(default=False, repr=False)

    def load(self) -> None:
        """The Context (and last reply) its file holds, or a fresh one."""
        if self.loaded:
            return
        from flwr.app import Context, RecordDict

        state = RecordDict()
        if self.state_file is not None and self.state_file.exists():
            saved = _read(self.state_file)
            state = records.unpack(saved["state"])
            if saved.get("reply"):
                envelope, body = saved["reply"]
                self.last_reply = _reply_from(envelope, body)
        self.context = Context(
            run_id=run_id_of(self.run),
            node_id=self.node_id,
            node_config=dict(self.node_config),
            state=state,
            run_config=dict(self.run_config),
        )
        self.loaded = True

    def answered(self, request: FlowerRequest) -> FlowerReply | None:
        self.load()
        if self.last_reply is not None and self.last_reply.request_id == request.request_id:
            return self.last_reply
        return None

    def handle(self, app: Any, request: FlowerRequest, message: Any) -> FlowerReply:
        """Run the ClientApp on ``message`` (``request``'s Flower form); its reply, or a
        Flower ``Error`` reply if it raised. The Context and the reply are saved first."""
        self.load()
        try:
            out = app(message, self.context)
            if out.metadata.reply_to_message_id != request.request_id:
                raise ValueError("the ClientApp's reply does not reply to the message it was given")
            reply = self.reply_to(request, out)
        except Exception as exc:  # the app's failure is the server's to know, as a Flower Error
            reason = bounded(f"{type(exc).__name__}: {exc}", ERROR_CHARS)
            reply = self.error_reply(request, CLIENT_APP_RAISED_EXCEPTION, reason)
        self.save(reply)
        return reply

    def reply_to(self, request: FlowerRequest, out: Any) -> FlowerReply:
        """The ClientApp's reply ``out`` as a brokerfl message (its content, or its Error)."""
        reply = self._reply(request, ttl=float(out.metadata.ttl), created_at=float(out.metadata.created_at))
        if out.has_error():
            reply.error_code = int(out.error.code)
            reply.error_reason = bounded(out.error.reason or "", ERROR_CHARS)
        else:
            reply.content = records.pack(out.content)
        return reply

    def error_reply(self, request: FlowerRequest, code: int, reason: str) -> FlowerReply:
        """Flower's ``Error`` for ``request``, made by the node itself (the app did not reply)."""
        reply = self._reply(request, ttl=request.ttl, created_at=request.created_at)
        reply.error_code, reply.error_reason = code, reason
        return reply

    def _reply(self, request: FlowerRequest, *, ttl: float, created_at: float) -> FlowerReply:
        return FlowerReply(
            run=request.run,
            round=request.round,
            client_id=self.client_id,
            node_id=self.node_id,
            request_id=request.request_id,
            reply_id=_reply_id(request),
            message_type=request.message_type,
            group_id=request.group_id,
            ttl=ttl,
            created_at=created_at,
        )

    def save(self, reply: FlowerReply) -> None:
        self.last_reply = reply
        if self.state_file is None:
            return
        envelope, body = to_wire(reply)
        _write(
            self.state_file,
            {
                "node_id": self.node_id,
                "state": records.pack(self.context.state),
                "reply": [_envelope_fields(envelope), body],
            },
        )


def to_flower_request(request: FlowerRequest) -> Any:
    """The Flower ``Message`` a request is, as the ClientApp gets it (:class:`records.RecordsError`
    if its content is malformed)."""
    from flwr.app import Metadata

    metadata = Metadata(
        run_id=run_id_of(request.run),
        message_id=request.request_id,
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=request.node_id,
        reply_to_message_id="",
        group_id=request.group_id,
        created_at=request.created_at,
        ttl=request.ttl,
        message_type=request.message_type,
    )
    return flower_message(metadata, content=records.unpack(request.content))


def _reply_id(request: FlowerRequest) -> str:
    import hashlib

    return hashlib.sha256(f"reply\0{request.request_id}\0{request.node_id}".encode()).hexdigest()[:32]


def _envelope_fields(envelope: Any) -> dict[str, Any]:
    return {
        "type": envelope.type,
        "message_id": envelope.message_id,
        "sender": envelope.sender,
        "timestamp": envelope.timestamp,
        "headers": envelope.headers,
    }


def _reply_from(fields: dict[str, Any], body: bytes) -> FlowerReply:
    from brokerfl.wire.message import Envelope

    reply = from_wire(Envelope(**fields), body)
    if not isinstance(reply, FlowerReply):
        raise DecodeError("the node's file holds no reply")
    return reply


def _write(path: Path, payload: dict[str, Any]) -> None:
    """Atomically, readable by the node's own user only: a reader finds the old file or the
    new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, encode(payload))


def _read(path: Path) -> dict[str, Any]:
    try:
        saved = decode(path.read_bytes())
    except (OSError, DecodeError) as exc:
        raise ValueError(
            f"the node's context file {path} cannot be read ({exc}): move it away to start the node afresh"
        ) from None
    if not (isinstance(saved, dict) and "state" in saved):
        raise ValueError(f"the node's context file {path} is not one: move it away to start the node afresh")
    return saved
