"""Typed messages, their registry, and how they turn into (envelope, body) and back.

A message type is a dataclass that subclasses :class:`Message`; subclassing registers it
under a snake_case type name (``ParameterUpdate`` -> ``parameter_update``), which is also
the last part of its routing key. The envelope (id, sender, run, round, model version,
timestamp, schema version) travels in the transport's properties and headers; the payload
fields travel in the msgpack body (see :mod:`brokerfl.wire.codec`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import socket
import sys
import time
import types
import typing
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from brokerfl.wire.app_metrics import wire_metrics_problem
from brokerfl.wire.codec import DEFAULT_LIMITS, DecodeError, Limits, decode, encode_parts
from brokerfl.wire.names import MAX_ID_CHARS, bounded, check_name

SCHEMA_VERSION = 1

Tensors = dict[str, np.ndarray]
"""A model's parameters, or its gradients, by name."""

MESSAGE_TYPES: dict[str, type[Message]] = {}
ENVELOPE_FIELDS = ("message_id", "sender", "run", "round", "model_version", "timestamp", "schema_version", "user_id")


def new_message_id() -> str:
    return uuid.uuid4().hex


_INSTANCE: tuple[int, str] = (0, "")


def process_instance() -> str:
    """This process, as its clients' Join and Heartbeat(s) name it: ``host:pid:random``,
    made once per process (a forked child makes its own). Two processes claiming one
    client id are told apart by it (the server warns)."""
    global _INSTANCE
    pid = os.getpid()
    if _INSTANCE[0] != pid:
        _INSTANCE = (pid, f"{socket.gethostname()[:64]}:{pid}:{secrets.token_hex(4)}")
    return _INSTANCE[1]


@dataclass(frozen=True)
class Envelope:
    """What a transport carries beside the body; maps onto AMQP properties and headers."""

    type: str
    message_id: str
    sender: str
    timestamp: float
    headers: dict[str, Any] = field(default_factory=dict)  # run, round, model_version, schema_version, ...
    user_id: str = ""  # the publisher's broker user: stamped by the transport, validated by RabbitMQ


@dataclass(kw_only=True)
class Message:
    """Base of every message type; its fields are the envelope."""

    TYPE: ClassVar[str] = ""
    LOCAL: ClassVar[bool] = False  # a worker's own event (start, timers): refused from a transport

    message_id: str = field(default_factory=new_message_id)
    sender: str = ""
    run: str = ""
    round: int = 0
    model_version: int = 0
    timestamp: float = field(default_factory=time.time)
    schema_version: int = SCHEMA_VERSION
    user_id: str = ""  # who published it (the broker user); set on receipt, stamped by the transport on send

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("TYPE") or re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
        # the same module and qualname is the same class defined again (a module reload)
        old = MESSAGE_TYPES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"message type {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.TYPE = name
        MESSAGE_TYPES[name] = cls

    def reply(self, cls: type[M], **fields: Any) -> M:
        """A new message of type ``cls`` in the same run, round and model version."""
        fields.setdefault("run", self.run)
        fields.setdefault("round", self.round)
        fields.setdefault("model_version", self.model_version)
        return cls(**fields)


M = typing.TypeVar("M", bound=Message)


# ---------------------------------------------------------------- the built-in types


@dataclass(kw_only=True)
class Join(Message):
    """A client announces itself and how much data it holds."""

    client_id: str
    num_samples: int = 0
    instance: str = ""  # the sending process (process_instance); "" from a sender that does not say


@dataclass(kw_only=True)
class Leave(Message):
    """A client says it is going away on purpose, or (``error``) because its app cannot run
    at all (e.g. its ``load_partition`` raised): the server then stops waiting for it."""

    client_id: str
    reason: str = ""
    error: str = ""  # bounded and printable, as TrainFailed's


@dataclass(kw_only=True)
class Heartbeat(Message):
    """A client is alive. It carries what Join does, so a restarted server relearns its
    federation from heartbeats alone."""

    client_id: str
    num_samples: int = 0
    instance: str = ""  # as Join's
    training_s: float | None = None  # seconds since it took the task it is training on; None: not training


@dataclass(kw_only=True)
class Heartbeats(Message):
    """The logical clients of one process are alive: one message per process and beat
    instead of one per client (client id -> its sample count, as each Heartbeat carries).
    A process hosting 1,000 clients sends 1 message per beat, not 1,000."""

    clients: dict[str, int] = field(default_factory=dict)
    instance: str = ""  # as Join's: the one process hosting these clients
    training: dict[str, float] = field(default_factory=dict)  # those training: seconds since each took its task


@dataclass(kw_only=True)
class TrainTask(Message):
    """Train on global model ``model_version`` (envelope) and answer with a ParameterUpdate.

    Broadcast once to every client; ``participants`` says who is sampled this round. The
    model travels inline (``parameters``) or by reference (claim check): ``model_stream``
    names the run's models stream, ``model_offset`` an offset at or before the version's
    message and ``model_sha256`` its hash; a client process fetches each version once and
    checks the hash (:mod:`brokerfl.storage.model_refs`) before any handler sees the task.
    """

    participants: list[str]
    parameters: Tensors = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the round's train settings
    round_config: dict[str, Any] = field(
        default_factory=dict
    )  # per-round config for the app: context.config (brokerfl.app.round_config)
    deadline: float = 0.0  # unix time after which an answer is too late (0: none); clients skip expired tasks
    model_stream: str = ""  # by reference: where version ``model_version`` is ("" : inline)
    model_offset: int = 0
    model_sha256: str = ""
    # a model that exchanges only some entries (brokerfl.app's exchanged): the digest of the
    # server's base, which never travels; a client whose base differs cannot take part ("": none)
    base_fingerprint: str = ""


@dataclass(kw_only=True)
class ParameterUpdate(Message):
    """A client's parameters after local training on ``model_version`` (envelope)."""

    client_id: str
    task_id: str
    parameters: Tensors
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    compression: str = ""  # "": whole parameters; else a brokerfl.wire.compression method, against model_version


@dataclass(kw_only=True)
class TrainFailed(Message):
    """The answer to a TrainTask whose training raised (the app's ``train``): the client
    is alive, its app is not; the server stops waiting for it (envelope: the task's round
    and model version). ``error``: the exception's type and message, bounded and printable."""

    client_id: str
    task_id: str
    error: str


@dataclass(kw_only=True)
class Gradients(Message):
    """Gradients for the receiver to apply (e.g. a server-computed correction)."""

    gradients: Tensors
    learning_rate: float = 0.0
    num_samples: int = 0


@dataclass(kw_only=True)
class EvaluateTask(Message):
    """Evaluate global model ``model_version``: inline or by reference, as a TrainTask."""

    parameters: Tensors = field(default_factory=dict)
    participants: list[str] = field(default_factory=list)
    model_stream: str = ""
    model_offset: int = 0
    model_sha256: str = ""
    base_fingerprint: str = ""  # as a TrainTask's


@dataclass(kw_only=True)
class EvaluateResult(Message):
    """A client's scores of an EvaluateTask's model: ``metrics`` holds every metric its
    app's ``evaluate`` returned (brokerfl.wire.app_metrics); ``loss`` and ``accuracy`` repeat
    two of them for older servers (NaN: the app returned none). ``error``: the app's
    evaluation failed (bounded and printable; no scores, ``num_samples`` 0)."""

    client_id: str
    task_id: str
    loss: float
    accuracy: float
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass(kw_only=True)
class UpdateDropped(Message):
    """The server's durable record that an update was acked without being folded, and why
    (late, stale, duplicate, ...). Published before the ack; the journal keeps it."""

    update_id: str
    client_id: str
    reason: str


@dataclass(kw_only=True)
class ModelVersionStored(Message):
    """The server's journal record of a stored global model version: what it is made of
    (updates in fold order) and its hash, so a journal alone can be replayed and checked.
    Version 0's record carries the initial parameters; the others carry none."""

    version: int
    parent: int | None = None
    strategy: str = ""
    update_ids: list[str] = field(default_factory=list)
    sha256: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    parameters: Tensors = field(default_factory=dict)


@dataclass(kw_only=True)
class Exit(Message):
    """The run is over: receivers stop."""

    reason: str = ""


@dataclass(kw_only=True)
class RunFinished(Message):
    """The server's journal record that the run ended (its rounds done, failed, or aborted)
    at ``model_version``. No server takes an update published after it; accounting counts
    such updates in a category of their own instead of calling them lost."""

    reason: str = ""
    failed: bool = False


@dataclass(kw_only=True)
class ServerStandby(Message):
    """A server process waiting for the run's server role, which another one holds: sent
    to the server queue every ``liveness.heartbeat_s`` so that the active server's status
    lists its standbys. ``sender`` names the process (host:pid)."""

    waiting_since: float = 0.0  # unix time


@dataclass(kw_only=True)
class FlowerRequest(Message):
    """A Flower ServerApp's message to one node (``brokerfl.flower``): Flower's metadata,
    and its content as records (``brokerfl.flower.records``: arrays as tensors, configs and
    metrics as typed values). ``seq`` is its place among the ServerApp's requests and
    ``digest`` the hash of what it asks (content, type, group, destination), by which a
    restarted ServerApp's re-issued request is matched with the journaled one."""

    client_id: str  # the brokerfl client that hosts the node
    node_id: int
    request_id: str  # Flower's message_id
    message_type: str
    group_id: str = ""
    ttl: float = 0.0
    created_at: float = 0.0
    seq: int = 0
    digest: str = ""
    content: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class FlowerReply(Message):
    """A node's reply to a :class:`FlowerRequest`: content, or Flower's ``Error`` (its code
    and reason) when the ClientApp raised or could not run the request."""

    client_id: str
    node_id: int
    request_id: str  # the request's: Flower's reply_to_message_id
    reply_id: str  # Flower's message_id of the reply
    message_type: str = ""
    group_id: str = ""
    ttl: float = 0.0
    created_at: float = 0.0
    content: dict[str, Any] = field(default_factory=dict)
    error_code: int | None = None  # None: a reply with content
    error_reason: str = ""


@dataclass(kw_only=True)
class FlowerExchange(Message):
    """The server's journal record of what one ``pull_messages`` or ``send_and_receive`` of
    a Flower ServerApp returned (its ``call``-th, counted from the run's start): the
    replies, by request id, in the order the app got them. A restarted ServerApp gets the
    same answers from the journal, however long the replies took the first time."""

    call: int
    request_ids: list[str] = field(default_factory=list)  # that the app asked about
    replied: list[str] = field(default_factory=list)  # request ids whose replies it got, in order
    expired: list[str] = field(default_factory=list)  # request ids answered by an Error (TTL passed, no reply)


# ---------------------------------------------------------------- secure aggregation
# The four stages of a secure round (brokerfl.handlers.secure), each a request and a reply.
# ``session`` is the round's TrainTask id: a stage message of another task (a round retried,
# a server restarted) is not this round's. Nothing here is secret: keys are public, shares
# travel encrypted for their receiver, the vectors are masked.


@dataclass(kw_only=True)
class SecureKeys(Message):
    """Stage 1's reply (its request is the TrainTask): the client trained and holds its
    update; its public keys (``c_pk`` encrypts the shares sent to it, ``s_pk`` agrees the
    pairwise masks) and a commitment to its self-mask seed."""

    client_id: str
    session: str
    c_pk: bytes
    s_pk: bytes
    seed_commitment: bytes
    train_s: float = 0.0  # the training's seconds (its app's metrics, which say more, stay on the client)


@dataclass(kw_only=True)
class SecureKeyList(Message):
    """Stage 2's request, to every client: the keys of each client that answered stage 1,
    by client id ([c_pk, s_pk, seed commitment]). Each client computes the neighbour graph
    from them and the session (no one chooses it)."""

    session: str
    keys: dict[str, list[bytes]]


@dataclass(kw_only=True)
class SecureShares(Message):
    """Stage 2's reply: the client's shares of its secrets, one ciphertext per neighbour
    (only that neighbour can open it)."""

    client_id: str
    session: str
    ciphertexts: dict[str, bytes]


@dataclass(kw_only=True)
class SecureSharesFor(Message):
    """Stage 3's request, to one client: the ciphertexts addressed to it, by sender (the
    neighbours that answered stage 2)."""

    client_id: str  # the receiver
    session: str
    ciphertexts: dict[str, bytes]


@dataclass(kw_only=True)
class SecureMasked(Message):
    """Stage 3's reply: the client's update, quantised, weighted and masked (uint64 words:
    the model's values in name order, then the weight, then the clipped count). This is
    the round's update: the model version lists its id, or an UpdateDropped record does."""

    client_id: str
    session: str
    vector: np.ndarray


@dataclass(kw_only=True)
class SecureUnmask(Message):
    """Stage 4's request, to every client that sent a masked vector: who did (``masked``)
    and who sent shares but no vector (``dropped``)."""

    session: str
    masked: list[str]
    dropped: list[str]


@dataclass(kw_only=True)
class SecureReveal(Message):
    """Stage 4's reply: shares that remove the masks of the sum, by peer: the self-mask
    seed's of each peer in ``masked``, the mask key's of each peer in ``dropped``; never
    both of one peer."""

    client_id: str
    session: str
    seed_shares: dict[str, bytes]
    key_shares: dict[str, bytes]


@dataclass(kw_only=True)
class SecureRound(Message):
    """The server's journal record of a secure round's end: who took part in each stage,
    why each one that dropped out did (stage and reason), and the outcome: ``version``
    (the model version the sum went into) or ``dropped`` (why the round was dropped)."""

    session: str
    keys: list[str] = field(default_factory=list)  # U1: answered stage 1
    shared: list[str] = field(default_factory=list)  # U2
    masked: dict[str, str] = field(default_factory=dict)  # U3: client -> its SecureMasked's id
    revealed: list[str] = field(default_factory=list)  # U4
    dropouts: dict[str, str] = field(default_factory=dict)  # client -> "stage N: reason"
    version: int | None = None
    dropped: str = ""
    clipped: int = 0  # coordinates the clients clipped to the quantisation range, in all


# ---------------------------------------------------------------- wire form


def to_wire(message: Message, limits: Limits = DEFAULT_LIMITS) -> tuple[Envelope, bytes]:
    """Split a message into its envelope and its msgpack body."""
    envelope, parts = to_wire_parts(message, limits)
    return envelope, b"".join(parts)


def to_wire_parts(message: Message, limits: Limits = DEFAULT_LIMITS) -> tuple[Envelope, list[Any]]:
    """:func:`to_wire` with the body as the buffers that make it up, not joined
    (:func:`brokerfl.wire.codec.encode_parts`: the arrays' own memory, valid while they are):
    a transport copies a large body once, straight into its chunks."""
    payload = {f.name: getattr(message, f.name) for f in dataclasses.fields(message) if f.name not in ENVELOPE_FIELDS}
    envelope = Envelope(
        type=message.TYPE,
        message_id=message.message_id,
        sender=message.sender,
        timestamp=message.timestamp,
        user_id=message.user_id,
        headers={
            "run": message.run,
            "round": message.round,
            "model_version": message.model_version,
            "schema_version": message.schema_version,
        },
    )
    return envelope, encode_parts(payload, limits)


def from_wire(envelope: Envelope, body: bytes, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Rebuild a message; any problem (unknown type, wrong fields or field types) is a DecodeError."""
    cls = MESSAGE_TYPES.get(envelope.type)
    if cls is None:
        raise DecodeError(f"unknown message type {envelope.type!r}")
    headers = envelope.headers or {}
    schema = headers.get("schema_version", SCHEMA_VERSION)
    if type(schema) is not int or schema != SCHEMA_VERSION:  # True and 1.0 equal 1, but are not versions
        raise DecodeError(f"schema version {schema!r} is not supported (this build speaks {SCHEMA_VERSION})")
    payload = decode(body, limits)
    hints = _payload_hints(cls)
    unknown = sorted(set(payload) - set(hints))
    if unknown:
        raise DecodeError(f"{envelope.type}: unknown field(s) {unknown}")
    values: dict[str, Any] = {}
    for name, (hint, required) in hints.items():
        if name not in payload:
            if required:
                raise DecodeError(f"{envelope.type}: missing field {name!r}")
            continue
        values[name] = _check(payload[name], hint, f"{envelope.type}.{name}")
    envelope_values = {
        "message_id": _check(envelope.message_id, str, "message_id"),
        "sender": _check(envelope.sender or "", str, "sender"),
        "timestamp": _check(envelope.timestamp, float, "timestamp"),
        "user_id": _check(envelope.user_id or "", str, "user_id"),
        "run": _check(headers.get("run", ""), str, "run"),
        "round": _check(headers.get("round", 0), int, "round"),
        "model_version": _check(headers.get("model_version", 0), int, "model_version"),
    }
    _check_ranges(envelope.type, envelope_values, values)
    return cls(**envelope_values, **values)


MAX_COUNTER = 2**63  # rounds, model versions, sample counts: non-negative, and what an AMQP header holds
MAX_ERROR_CHARS = 1000  # an error a client reports (it sends at most ERROR_CHARS, see handlers/workflows/client.py)
MAX_SECONDS = 1e9  # a duration a message reports (about 30 years)
_MESSAGE_ID_FIELDS = ("task_id", "update_id", "request_id", "reply_id")
MAX_INSTANCE_CHARS = 200  # Join/Heartbeat(s).instance: host:pid:random
_COUNT_FIELDS = ("round", "model_version", "num_samples", "version", "parent", "model_offset", "node_id", "seq", "call")


def _check_ranges(kind: str, envelope_values: dict[str, Any], values: dict[str, Any]) -> None:
    """Protocol rules beyond types, checked before any handler trusts a field: client ids
    follow the name rule (they become words of routing keys and land in logs, state and
    records), counters are non-negative and bounded, message ids are bounded."""
    if "client_id" in values:
        try:
            check_name("client id", values["client_id"])
        except ValueError:
            raise DecodeError(
                f"{kind}.client_id: {_shown(values['client_id'])} must be 1-64 characters of letters, digits, '_' or "
                "'-'"
            ) from None
    for name in _MESSAGE_ID_FIELDS:
        if name in values and len(values[name]) > MAX_ID_CHARS:
            raise DecodeError(f"{kind}.{name}: {_shown(values[name])} is longer than {MAX_ID_CHARS} characters")
    if len(values.get("instance") or "") > MAX_INSTANCE_CHARS:
        raise DecodeError(
            f"{kind}.instance: {_shown(values['instance'])} is longer than {MAX_INSTANCE_CHARS} characters"
        )
    if len(values.get("error") or "") > MAX_ERROR_CHARS:  # TrainFailed
        raise DecodeError(f"{kind}.error: {len(values['error'])} characters, more than {MAX_ERROR_CHARS}")
    metrics = values.get("metrics")  # ParameterUpdate, EvaluateResult, ModelVersionStored: names from an app
    if metrics and (problem := wire_metrics_problem(metrics)) is not None:
        raise DecodeError(f"{kind}.metrics: {problem}")
    for client_id, seconds in (values.get("training") or {}).items():  # Heartbeats
        _check_client_key(client_id, f"{kind}.training")
        if not 0 <= seconds < MAX_SECONDS:  # NaN fails too
            raise DecodeError(f"{kind}.training[{_shown(client_id)}]: {_shown(seconds)} seconds is out of range")
    seconds = values.get("training_s")  # Heartbeat
    if seconds is not None and not 0 <= seconds < MAX_SECONDS:
        raise DecodeError(f"{kind}.training_s: {_shown(seconds)} seconds is out of range")
    for client_id, count in (values.get("clients") or {}).items():  # Heartbeats
        _check_client_key(client_id, f"{kind}.clients")
        if not 0 <= count < MAX_COUNTER:
            raise DecodeError(
                f"{kind}.clients[{_shown(client_id)}]: {_shown(count)} samples is out of range (0 to 2^63)"
            )
    participants = values.get("participants") or []
    if not _all_client_ids(participants):  # the slow way only to say which one is wrong
        for i, value in enumerate(participants):
            try:
                check_name("client id", value)
            except ValueError:
                raise DecodeError(f"{kind}.participants[{i}]: {_shown(value)} is not a client id") from None
    for name in _COUNT_FIELDS:
        value = values.get(name, envelope_values.get(name))
        if isinstance(value, int) and not 0 <= value < MAX_COUNTER:
            raise DecodeError(f"{kind}.{name}: {_shown(value)} is out of range (0 to 2^63)")
    if not 0 < len(envelope_values["message_id"]) <= MAX_ID_CHARS:
        raise DecodeError(f"message_id {_shown(envelope_values['message_id'])} must be 1-{MAX_ID_CHARS} characters")


_CLIENT_IDS = re.compile(r"[A-Za-z0-9_-]{1,64}(?:,[A-Za-z0-9_-]{1,64})*")


def _all_client_ids(values: list[str]) -> bool:
    """Every value a client id (brokerfl.wire.names.check_name's rule), in one regex over the joined
    list: a broadcast task names every participant and every client decodes it, so a
    per-element check costs N^2 per round over N clients. The separator count rules out
    an element that itself holds the separator."""
    if not values:
        return True
    joined = ",".join(values)
    return joined.count(",") == len(values) - 1 and _CLIENT_IDS.fullmatch(joined) is not None


def _check_client_key(client_id: Any, where: str) -> None:
    """A map keyed by client ids (Heartbeats' ``clients`` and ``training``): each key one."""
    try:
        check_name("client id", client_id)
    except ValueError:
        raise DecodeError(f"{where}: {_shown(client_id)} is not a client id") from None


def _shown(value: Any) -> str:
    """A value from the wire as it may appear in a reason: its repr, bounded."""
    return bounded(repr(value), 80)


_HINTS: dict[type, dict[str, tuple[Any, bool]]] = {}


def _payload_hints(cls: type[Message]) -> dict[str, tuple[Any, bool]]:
    """Each payload field's type hint and whether it is required (computed once per class:
    get_type_hints evaluates the annotations' strings every time)."""
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = _compute_payload_hints(cls)
    return hints


def _compute_payload_hints(cls: type[Message]) -> dict[str, tuple[Any, bool]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in ENVELOPE_FIELDS:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out[f.name] = (hints[f.name], required)
    return out


def _is_torch_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a torch tensor means it is loaded
    return torch is not None and isinstance(value, torch.Tensor)


def _check(value: Any, hint: Any, where: str) -> Any:
    """Check a decoded value against a field's type hint; returns it (ints widen to float)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check(value, option, where)
            except DecodeError:
                pass
        raise DecodeError(f"{where}: {type(value).__name__} is not {hint}")
    if hint is type(None):
        if value is None:
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is np.ndarray:
        if isinstance(value, np.ndarray):
            return value
        if _is_torch_tensor(value):  # a sender may put torch tensors on the wire; handlers see numpy
            return value.numpy() if str(value.dtype) != "torch.bfloat16" else value.float().numpy()
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(hint) or (Any,)
            if item is str and set(map(type, value)) <= {str}:  # e.g. participants: in C, no call per element
                return value
            return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            key, item = typing.get_args(hint) or (Any, Any)
            return {_check(k, key, where): _check(v, item, f"{where}[{k!r}]") for k, v in value.items()}
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:  # pragma: no cover - a hint this checker does not know: accept, the handler validates
        return value
    raise DecodeError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
