"""``brokerfl inspect``: what a run's queues hold, its dead letters and why, its newest
model versions, and any single message decoded (tensor names, shapes, dtypes, norms).

Everything but the queue counts comes from the journal, so inspecting takes nothing off a
queue. Unacked counts need RabbitMQ's management API (plain AMQP cannot tell them); where
it does not answer, they are shown as unknown.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np

from brokerfl.runtime import operator_commands as _admin  # noqa: F401 - registers the operator's message types, so they decode
from brokerfl.runtime.identity import server_user
from brokerfl.storage.accounting import who
from brokerfl.storage.journal import Skipped
from brokerfl.transports.base import (
    ORIGIN_USER_HEADER,
    ORIGINAL_LENGTH_HEADER,
    REASON_HEADER,
    Delivery,
    Transport,
    TransportError,
)
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.codec import DecodeError
from brokerfl.wire.message import ModelVersionStored, from_wire
from brokerfl.wire.names import bounded


def management_counts(amqp_url: str, timeout: float = 2.0) -> dict[str, dict[str, int]] | None:
    """Per-queue ready/unacked/consumers from the management API on the broker's host, or None."""
    parts = urlsplit(amqp_url)
    vhost = quote(parts.path[1:] or "/", safe="")
    request = urllib.request.Request(f"http://{parts.hostname}:15672/api/queues/{vhost}")
    credentials = f"{parts.username or 'guest'}:{parts.password or 'guest'}".encode()
    request.add_header("Authorization", "Basic " + base64.b64encode(credentials).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            queues = json.load(response)
    except (OSError, ValueError):
        return None
    return {
        q["name"]: {
            "ready": q.get("messages_ready", 0),
            "unacked": q.get("messages_unacknowledged", 0),
            "consumers": q.get("consumers", 0),
            "messages": q.get("messages"),
            "bytes": q.get("message_bytes"),
            "kind": q.get("type"),
        }
        for q in queues
    }


def queue_kinds(topology: RunTopology, client_ids: Iterable[str]) -> dict[str, str]:
    """Each queue of the run and the kind it is declared with (AMQP does not say a queue's
    kind: the run's topology does, as its server and the definitions declare them)."""
    specs = [*topology.queues(), *(topology.client_queue_spec(c) for c in client_ids)]
    return {spec.name: spec.kind for spec in specs}


def queue_table(
    transport: Transport, topology: RunTopology, client_ids: Iterable[str], amqp_url: str | None = None
) -> str:
    counts = management_counts(amqp_url) if amqp_url else None
    client_ids = list(client_ids)
    kinds = queue_kinds(topology, client_ids)
    names = [topology.server_queue, topology.dead_queue, *(topology.client_queue(c) for c in client_ids)]
    if topology.journal:
        names.append(topology.journal_stream)
    lines = [f"{'queue':<48} {'kind':<8} {'ready':>7} {'unacked':>8} {'consumers':>9}"]
    for name in names:
        try:
            info = transport.queue_info(name)
        except TransportError:
            lines.append(f"{name:<48} (absent)")
            continue
        unacked: Any = info.messages_unacked
        ready, consumers = info.messages_ready, info.consumers
        kind = kinds.get(name, info.kind)
        if counts and name in counts:
            ready, unacked, consumers = counts[name]["ready"], counts[name]["unacked"], counts[name]["consumers"]
            kind = counts[name].get("kind") or kind  # the broker's word, where it gives it
        lines.append(f"{name:<48} {kind:<8} {ready:>7} {('?' if unacked is None else unacked):>8} {consumers:>9}")
    if amqp_url and counts is None:
        lines.append("(unacked counts need the management plugin: rabbitmq-plugins enable rabbitmq_management)")
    return "\n".join(lines)


def dead_letter_origin(delivery: Delivery, run: str | None) -> str:
    """Who published a dead letter's original, as far as the broker vouches for it.

    A dead letter is published by whoever dead-lettered the original (RabbitMQ validates
    that ``user_id``); the original's publisher rides in the ``x-brokerfl-user`` header,
    which that publisher wrote. It is shown only when the run's server dead-lettered it (it
    copied RabbitMQ's validated ``user_id`` of what it consumed); anyone else may publish a
    ``dead.*`` message with any header (a client framing another), so then only the
    claim and who dead-lettered it are shown."""
    e = delivery.envelope
    if run is not None and e.user_id and e.user_id == server_user(run):
        return who(str(e.headers.get(ORIGIN_USER_HEADER) or ""), e.sender)
    return f"{who('', e.sender)}, dead-lettered by {who(e.user_id, '')} (the original's publisher is not verified)"


def dead_queue_depth(transport: Transport, topology: RunTopology) -> int | None:
    """Messages in the run's dead-letter queue (None if it is not there)."""
    try:
        return transport.queue_info(topology.dead_queue).messages_ready
    except TransportError:
        return None


def dead_letter_counts(journaled: int, queued: int | None) -> list[str]:
    """The dead-letter lines: the journal's count, and the dead-letter queue's if known,
    with why they differ. brokerfl's workers dead-letter through the run's exchange (the
    journal keeps a copy); the broker dead-letters on its own what expires or is rejected
    in the server queue (e.g. a request nobody took in time), straight into the queue."""
    lines = [f"dead letters: {journaled} in the journal" + ("" if queued is None else f", {queued} in the queue")]
    if queued is not None and queued > journaled:
        lines.append(
            f"  {queued - journaled} more in the queue than the journal has: dead-lettered by the broker itself "
            "(expired or rejected in the server queue), which bypasses the journal; see them with a consumer of the "
            "dead-letter queue"
        )
    elif queued is not None and queued < journaled:
        lines.append(
            f"  {journaled - queued} of the journal's are no longer in the queue (taken from it, or dropped by its "
            "length limit); the journal keeps them"
        )
    return lines


def journal_report(
    deliveries: Iterable[Delivery], newest: int = 5, *, run: str | None = None, dead_queue: int | None = None
) -> str:
    """``run``: whose server's dead letters name the original's publisher (see
    :func:`dead_letter_origin`); ``dead_queue``: the dead-letter queue's depth, if known
    (said beside the journal's count: see :func:`dead_letter_counts`)."""
    dead: list[Delivery] = []
    dead_count = 0
    versions: list[ModelVersionStored] = []
    counts: dict[str, int] = {}
    skipped = Skipped()
    for d in deliveries:
        if d.problem:
            skipped.add("unreadable envelope")
            continue
        kind = bounded(d.envelope.type, 40)
        counts[kind] = counts.get(kind, 0) + 1
        if d.routing_key.startswith("dead."):
            dead_count += 1
            dead = [*dead[-19:], d]
        elif d.envelope.type == ModelVersionStored.TYPE:
            record = skipped.record(d, ModelVersionStored)
            if record is not None and all(v.version != record.version for v in versions[-newest:]):
                versions.append(record)  # a resumed process journals its newest version again
    lines = ["journal: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))]
    lines.append(skipped.summary())
    lines += dead_letter_counts(dead_count, dead_queue)
    for d in dead:
        headers = {
            k: bounded(v, 80) for k, v in d.envelope.headers.items() if k not in (REASON_HEADER, ORIGIN_USER_HEADER)
        }
        lines.append(
            f"  {bounded(d.envelope.type, 40)} {bounded(d.envelope.message_id, 40)} from {dead_letter_origin(d, run)}: "
            f"{bounded(d.envelope.headers.get(REASON_HEADER, '?'), 300)}"
        )
        lines.append(f"      headers {bounded(repr(headers), 500)}")
    lines.append(f"newest model versions (of {len(versions)}):")
    for v in versions[-newest:]:
        acc = v.metrics.get("accuracy")
        lines.append(
            f"  v{v.version} round {v.round}: {len(v.update_ids)} updates, sha256 {v.sha256[:16]}"
            + (f", accuracy {acc:.4f}" if acc is not None else "")
        )
    return "\n".join(lines)


def find_message(deliveries: Iterable[Delivery], message_id: str) -> Delivery:
    """The journaled message with that id; its dead-letter copy only if that is all there is."""
    dead_copy = None
    for d in deliveries:
        if d.envelope.message_id == message_id:
            if not d.routing_key.startswith("dead."):
                return d
            dead_copy = dead_copy or d
    if dead_copy is not None:
        return dead_copy
    raise KeyError(f"no message {message_id!r} in the journal")


def describe(delivery: Delivery) -> str:
    """Envelope, headers and fields; tensors as name, shape, dtype and L2 norm (no raw bytes)."""
    e = delivery.envelope
    lines = [
        f"{bounded(e.type, 40)} {bounded(e.message_id, 40)}",
        f"  routing key {bounded(delivery.routing_key, 200)}, from {who(e.user_id, e.sender)}, timestamp "
        f"{e.timestamp:.3f}",
        f"  headers {bounded(repr(e.headers), 2000)}",
    ]
    length = e.headers.get(ORIGINAL_LENGTH_HEADER)
    if isinstance(length, int) and length > len(delivery.body):  # a dead letter keeps an excerpt
        return "\n".join(
            [*lines, f"  body: the first {len(delivery.body)} of its {length} bytes (a dead letter keeps an excerpt)"]
        )
    try:
        message = from_wire(e, delivery.body)
    except DecodeError as exc:
        return "\n".join([*lines, f"  body does not decode: {exc}"])
    for name, value in vars(message).items():
        if name in ("message_id", "sender", "timestamp", "schema_version", "user_id"):
            continue
        if isinstance(value, dict) and value and all(isinstance(v, np.ndarray) for v in value.values()):
            lines.append(f"  {name}: {len(value)} tensors")
            for key, array in value.items():
                norm = float(np.linalg.norm(array.astype(np.float64).ravel())) if array.size else 0.0
                lines.append(f"    {key:<24} {str(array.shape):<16} {array.dtype!s:<8} norm {norm:.6g}")
        else:
            lines.append(f"  {name}: {value!r}")
    return "\n".join(lines)


def dump_npz(delivery: Delivery, path: str) -> list[str]:
    """Write a message's tensors (an update's parameters) to an .npz file; returns their names."""
    try:
        message = from_wire(delivery.envelope, delivery.body)
    except DecodeError as exc:
        raise KeyError(f"message {delivery.envelope.message_id} does not decode: {exc}") from None
    tensors = getattr(message, "parameters", None) or getattr(message, "gradients", None)
    if not tensors:
        raise KeyError(f"message {delivery.envelope.message_id} ({delivery.envelope.type}) holds no tensors")
    np.savez(path, **tensors)
    return sorted(tensors)
