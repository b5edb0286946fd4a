"""Envelopes as AMQP properties, and back.

``type``, ``message_id``, ``app_id`` (sender), ``timestamp`` (whole seconds; the exact float
rides in ``x-brokerfl-timestamp``) and ``headers`` are AMQP properties; messages are
persistent msgpack. pika cannot encode floats in headers, so top-level float header values
travel as ``repr`` strings, listed (comma-separated: RabbitMQ 3.x streams drop array and
table headers) in ``x-brokerfl-floats``, and come back as floats. Our own ``x-brokerfl-*``
transport headers are stripped on receive.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import struct
from typing import Any

import pika
import pika.frame
import pika.spec

from brokerfl.transports.amqp import chunks
from brokerfl.transports.base import (
    MAX_TIMESTAMP,
    ORIGIN_USER_HEADER,
    TransportError,
    dead_letter_headers,
    envelope_problem,
    safe_envelope,
)
from brokerfl.wire.message import Envelope
from brokerfl.wire.names import bounded

CONTENT_TYPE = "application/msgpack"
TIMESTAMP_HEADER = "x-brokerfl-timestamp"
FLOATS_HEADER = "x-brokerfl-floats"
DEAD_CHUNK_HEADER = "x-brokerfl-dead-chunk"  # a dead-lettered chunk: "index/count of <message id>"
UNDECODABLE_HEADER = "x-brokerfl-undecodable"  # set by our frame reader: pika could not decode the properties
OWN_HEADERS = chunks.HEADERS | {TIMESTAMP_HEADER, FLOATS_HEADER, UNDECODABLE_HEADER}


def _check_header(value: Any, where: str) -> None:
    if isinstance(value, (str, bytes, bool, int, type(None))):
        return
    if isinstance(value, list):
        for v in value:
            _check_header(v, where)
        return
    if isinstance(value, dict):
        for v in value.values():
            _check_header(v, where)
        return
    if isinstance(value, decimal.Decimal):
        # RabbitMQ 3.10 closes the connection (541 INTERNAL_ERROR) of a publisher whose
        # message with a decimal header is routed to a stream: say so before it does.
        raise TransportError(
            f"header {where!r}: decimal values cannot travel in AMQP headers (RabbitMQ closes the connection routing "
            "them to a stream)"
        )
    if isinstance(value, datetime.datetime):
        return
    raise TransportError(
        f"header {where!r}: {type(value).__name__} cannot travel in AMQP headers (floats only at the top level)"
    )


def to_properties(
    envelope: Envelope, extra: dict[str, Any] | None = None, *, user: str | None = None
) -> pika.BasicProperties:
    """``user``: the connection's login, set as ``user_id`` unless the envelope names one
    (RabbitMQ refuses a ``user_id`` that is not the connection's user)."""
    headers: dict[str, Any] = {}
    floats = []
    for key, value in envelope.headers.items():
        if isinstance(value, float):
            headers[key] = repr(value)
            floats.append(key)
        else:
            _check_header(value, key)
            headers[key] = value
    headers[TIMESTAMP_HEADER] = repr(float(envelope.timestamp))
    if floats:
        headers[FLOATS_HEADER] = ",".join(floats)
    headers.update(extra or {})
    return pika.BasicProperties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        type=envelope.type,
        message_id=envelope.message_id,
        app_id=envelope.sender or None,
        timestamp=_whole_seconds(envelope.timestamp),
        headers=headers,
        user_id=envelope.user_id or user or None,
    )


def _whole_seconds(timestamp: Any) -> int:
    """AMQP's timestamp is a uint64 of seconds; anything out of range travels as 0 (the exact
    value rides in a header, and a receiver checks it)."""
    try:
        return int(timestamp) if 0 <= timestamp <= MAX_TIMESTAMP else 0
    except (TypeError, ValueError, OverflowError):
        return 0


def to_envelope(properties: pika.BasicProperties) -> tuple[Envelope, str]:
    """The envelope of a received message, and what is wrong with it ("" if nothing).

    Total: whatever the properties hold (pika hands over bytes for strings that are not
    UTF-8, any int for the timestamp, any header types), this returns an envelope whose
    fields have their types (bad ones blanked) and says why the message cannot be trusted;
    the consumer dead-letters it with that reason."""
    headers: dict[Any, Any] = dict(properties.headers) if isinstance(properties.headers, dict) else {}
    problem = ""
    undecodable = headers.get(UNDECODABLE_HEADER)
    if undecodable is not None:
        problem = str(undecodable)
    floats = headers.get(FLOATS_HEADER) or ""
    for key in floats.split(",") if isinstance(floats, str) and floats else []:
        try:
            headers[key] = float(headers[key])
        except (KeyError, TypeError, ValueError):
            pass
    try:
        timestamp = float(headers[TIMESTAMP_HEADER])
    except (KeyError, TypeError, ValueError):  # published by something else
        timestamp = properties.timestamp or 0
    for key in OWN_HEADERS:
        headers.pop(key, None)
    raw = Envelope(
        type=properties.type or "",
        message_id=properties.message_id or "",
        sender=properties.app_id or "",
        timestamp=timestamp,
        headers=headers,
        user_id=properties.user_id or "",  # validated by RabbitMQ against the publisher's login
    )
    problem = problem or envelope_problem(raw)
    if not problem:
        return Envelope(raw.type, raw.message_id, raw.sender, float(timestamp), headers, user_id=raw.user_id), ""
    return safe_envelope(raw), problem


def dead_letter_properties(
    properties: pika.BasicProperties, reason: str, queue: str, routing_key: Any, length: int, *, user: str | None = None
) -> pika.BasicProperties:
    """Fresh properties for a raw delivery's dead-letter copy (chunks that make no message):
    the original's id, type and sender only if they are sane, safe headers only (see
    :func:`brokerfl.transports.base.safe_headers`), the reason and the body's ``length`` (the copy
    keeps an excerpt). A chunk's own headers are left out: a dead-lettered chunk is one
    message, not part of a set for a reader to assemble."""
    envelope, _ = to_envelope(properties)
    headers = dead_letter_headers(envelope.headers, reason, queue, routing_key, length)
    original = properties.headers if isinstance(properties.headers, dict) else {}
    position, of = original.get(chunks.CHUNK_HEADER), original.get(chunks.CHUNK_OF_HEADER)
    if isinstance(position, str) and isinstance(of, str):  # which chunk it was, as one plain string
        headers[DEAD_CHUNK_HEADER] = bounded(f"{position} of {of}", 300)
    headers[ORIGIN_USER_HEADER] = envelope.user_id  # who published the original; the copy is ``user``'s
    return to_properties(dataclasses.replace(envelope, headers=headers, user_id=""), user=user)


# ---------------------------------------------------------------- pika's frame reader, made total


def make_header_decoding_total(conn: Any) -> None:
    """Make a pika connection survive content headers it cannot decode.

    pika decodes a message's properties inside its frame reader: a header table holding an
    AMQP timestamp past year 9999 (``OverflowError``), a non-finite double (``int(inf)``),
    an unknown field type, ... raises out of the reader, pika drops the connection, the
    broker redelivers the message, and the consumer reconnects into the same failure
    forever. Decision: wrap this connection's frame reader (``Connection._read_frame``, a
    pika 1.x internal); when a *content header* frame fails to decode, hand pika a header
    frame with the same channel and body size whose properties hold only
    ``x-brokerfl-undecodable: <why>``. The delivery then flows as usual and the consumer
    dead-letters it with that reason (its original properties are lost: pika could not read
    them). Other frames that fail still raise (nothing an ordinary publisher can send makes
    them: the broker writes method frames). If pika's internals are not there, nothing
    changes."""
    impl = getattr(conn, "_impl", None)
    if impl is None or not callable(getattr(impl, "_read_frame", None)) or not hasattr(impl, "_frame_buffer"):
        return

    def read_frame() -> tuple[int, Any]:
        try:
            return pika.frame.decode_frame(impl._frame_buffer)
        except Exception as exc:
            salvaged = salvage_content_header(impl._frame_buffer, exc)
            if salvaged is None:
                raise
            return salvaged

    impl._read_frame = read_frame


def salvage_content_header(data: bytes, exc: BaseException) -> tuple[int, pika.frame.Header] | None:
    """(bytes used, a stand-in Header frame) for a content header frame at the start of
    ``data`` whose properties failed to decode with ``exc``; None if it is no such frame."""
    try:
        frame_type, channel, size = struct.unpack_from(">BHL", data, 0)
        end = pika.spec.FRAME_HEADER_SIZE + size + pika.spec.FRAME_END_SIZE
        if frame_type != pika.spec.FRAME_HEADER or end > len(data) or data[end - 1] != pika.spec.FRAME_END:
            return None
        class_id, _weight, body_size = struct.unpack_from(">HHQ", data, pika.spec.FRAME_HEADER_SIZE)
    except (struct.error, IndexError):
        return None
    if class_id != pika.spec.BasicProperties.INDEX:
        return None
    why = f"AMQP properties that cannot be decoded ({type(exc).__name__}: {bounded(str(exc), 200)})"
    return end, pika.frame.Header(channel, body_size, pika.spec.BasicProperties(headers={UNDECODABLE_HEADER: why}))
