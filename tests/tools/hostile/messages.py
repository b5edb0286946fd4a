"""Hostile messages for a run's server queue: what an attacker with ordinary broker
credentials can publish, each with what the server should do with it.

:func:`hostile_messages` yields a seeded mix of these categories (random and empty
bodies, truncated and bit-flipped valid encodings, wrong field types, lying tensor headers,
NaN/inf and wrong-shape updates, absurd num_samples/rounds/versions, invalid client ids,
forged Leave for real clients, LOCAL timer types, unknown types, garbage AMQP properties and
headers, absurd and never-finished chunk sets). Each message says what the server should
do with it (``expect``), so a test can check that it did. :mod:`tests.tools.hostile.publisher`
publishes them as an attacker would.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from brokerfl.transports.amqp import chunks
from brokerfl.wire.codec import encode
from brokerfl.wire.message import Heartbeat, Join, Leave, ParameterUpdate, to_wire

DEAD = "dead"  # dead-lettered with a reason (message id kept)
DEAD_ANONYMOUS = "dead-anonymous"  # dead-lettered, but its properties could not be read (id lost)
REFUSED = "refused"  # dead-lettered, or dropped with an UpdateDropped record
CHUNK = "chunk"  # one chunk of a set that never completes: dead-lettered, or still held when the run ends
IDENTITY = "identity"  # handled: a forged message for a real client, left to identity (identity.enforce)

CHUNK_BYTES = 64 * 1024
INVALID_CLIENT_IDS = ["", "#", "*", "a.b", "c 1", "x" * 10_000, "ü", "../etc"]


class RawTimestamp(int):
    """A header value published as an AMQP timestamp ('T') verbatim: pika refuses to write
    (and cannot read) one past year 9999 itself."""


@dataclass
class HostileMessage:
    category: str
    expect: str
    routing_key: str  # on the run's exchange; "" -> straight to the server queue
    properties: dict[str, Any]
    body: bytes
    message_id: str = ""
    set_size: int = 1  # chunks: how many of this set are sent
    tags: list[str] = field(default_factory=list)


def hostile_messages(
    count: int, *, run: str, client_ids: list[str], shapes: dict[str, tuple[int, ...]], seed: int = 0, rounds: int = 20
) -> Iterator[HostileMessage]:
    """``count`` hostile messages (chunk sets count one per chunk), in a seeded order."""
    rng = random.Random(seed)
    made = 0
    n = 0
    makers = [
        _random_body,
        _empty_body,
        _truncated,
        _bit_flipped,
        _wrong_types,
        _lying_tensors,
        _bad_update,
        _absurd_counters,
        _invalid_ids,
        _forged_leave,
        _local_type,
        _unknown_type,
        _garbage_properties,
        _garbage_properties,
        _absurd_chunks,
        _unfinished_chunks,
    ]
    while made < count:
        n += 1
        maker = rng.choice(makers)
        for message in maker(rng, n, run, client_ids, shapes, rounds):
            if made >= count:
                return
            made += 1
            yield message


# ---------------------------------------------------------------- helpers


def _props(kind: str, mid: str, run: str, *, round_: int = 1, version: int = 0, **extra_headers: Any) -> dict[str, Any]:
    headers = {"run": run, "round": round_, "model_version": version, "schema_version": 1, **extra_headers}
    return {
        "type": kind,
        "message_id": mid,
        "app_id": "attacker",
        "timestamp": 1_700_000_000,
        "headers": headers,
        "delivery_mode": 2,
    }


def _valid_update(
    rng: random.Random, mid: str, run: str, client_ids: list[str], shapes, rounds: int
) -> tuple[dict[str, Any], bytes]:
    """A well-formed update from a client that is not in the run (a valid name): what the
    other categories garble. Claiming a real client would make it foldable, and only
    identity (``identity.enforce``) can tell that forgery from the client's own update."""
    params = {k: np.full(s, rng.uniform(-1, 1), np.float32) for k, s in shapes.items()}
    update = ParameterUpdate(
        message_id=mid,
        client_id=f"ghost-{rng.randrange(1000)}",
        task_id="t" + mid,
        parameters=params,
        num_samples=10,
        run=run,
        round=rng.randint(1, rounds),
        model_version=rng.randint(0, rounds),
    )
    envelope, body = to_wire(update)
    return _props(envelope.type, mid, run, round_=update.round, version=update.model_version), body


def _one(
    category: str, expect: str, props: dict[str, Any], body: bytes, key: str | None = None
) -> list[HostileMessage]:
    kind = props.get("type")
    word = kind if isinstance(kind, str) and kind.isidentifier() and len(kind) < 64 else "parameter_update"
    return [
        HostileMessage(
            category, expect, f"server.{word}" if key is None else key, props, body, str(props.get("message_id", ""))
        )
    ]


# ---------------------------------------------------------------- categories


def _random_body(rng, n, run, ids, shapes, rounds):
    kind = rng.choice(["parameter_update", "join", "heartbeat", "leave", "evaluate_result"])
    return _one("random body", DEAD, _props(kind, f"hostile-{n}", run), os.urandom(rng.randint(1, 4096)))


def _empty_body(rng, n, run, ids, shapes, rounds):
    return _one("empty body", DEAD, _props(rng.choice(["parameter_update", "join"]), f"hostile-{n}", run), b"")


def _truncated(rng, n, run, ids, shapes, rounds):
    props, body = _valid_update(rng, f"hostile-{n}", run, ids, shapes, rounds)
    return _one("truncated encoding", DEAD, props, body[: rng.randint(0, len(body) - 1)])


def _bit_flipped(rng, n, run, ids, shapes, rounds):
    props, body = _valid_update(rng, f"hostile-{n}", run, ids, shapes, rounds)
    data = bytearray(body)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    # a flip in a tensor's bytes can leave a decodable update: it is then refused (late,
    # not sampled, NaN) or, at worst, dropped with a record: never folded (its client and
    # round do not both match a sampled client's task... see the test's check of the folds)
    return _one("bit-flipped encoding", REFUSED, props, bytes(data))


def _wrong_types(rng, n, run, ids, shapes, rounds):
    payloads = [
        ("join", {"client_id": 7, "num_samples": 10}),
        ("heartbeat", {"client_id": rng.choice(ids), "num_samples": "many"}),
        ("parameter_update", {"client_id": rng.choice(ids), "task_id": 1, "parameters": [1, 2], "num_samples": 1}),
        (
            "parameter_update",
            {"client_id": rng.choice(ids), "task_id": "t", "parameters": {"w": "x"}, "num_samples": 1.5},
        ),
        ("join", {"client_id": "a", "num_samples": 1, "extra": True}),
    ]
    kind, payload = rng.choice(payloads)
    props = _props(kind, f"hostile-{n}", run)
    if rng.random() < 0.3:  # wrong types in the headers instead
        props["headers"].update(
            rng.choice([{"round": "three"}, {"model_version": True}, {"schema_version": 2}, {"run": 5}])
        )
    return _one("wrong field types", DEAD, props, encode(payload))


def _lying_tensors(rng, n, run, ids, shapes, rounds):
    props, body = _valid_update(rng, f"hostile-{n}", run, ids, shapes, rounds)
    data = bytearray(body)
    header_len = struct.unpack_from("<I", data, 0)[0] if len(data) >= 4 else 0
    for _ in range(rng.randint(1, 4)):  # within the msgpack header, where shapes and offsets are
        data[4 + rng.randrange(max(1, min(header_len, len(data) - 4)))] = rng.randrange(256)
    if rng.random() < 0.3:
        struct.pack_into("<I", data, 0, rng.choice([0, 2**32 - 1, len(data) * 2]))
    return _one("lying tensor header", REFUSED, props, bytes(data))


def _bad_update(rng, n, run, ids, shapes, rounds):
    mid = f"hostile-{n}"
    name = rng.choice(sorted(shapes))
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    how = rng.choice(["nan", "inf", "shape", "missing", "extra", "dtype"])
    if how == "nan":
        params[name] = np.full(shapes[name], np.nan, np.float32)
    elif how == "inf":
        params[name] = np.full(shapes[name], np.inf, np.float32)
    elif how == "shape":
        params[name] = np.zeros((*shapes[name], 2), np.float32)
    elif how == "missing":
        del params[name]
    elif how == "extra":
        params["evil"] = np.zeros(3, np.float32)
    else:
        params[name] = np.zeros(shapes[name], np.int64)
    update = ParameterUpdate(
        message_id=mid,
        client_id=rng.choice(ids),
        task_id="t",
        parameters=params,
        num_samples=10,
        run=run,
        round=rng.randint(1, rounds),
        model_version=rng.randint(0, rounds),
    )
    envelope, body = to_wire(update)
    return _one(
        f"{how} update",
        REFUSED,
        _props(envelope.type, mid, run, round_=update.round, version=update.model_version),
        body,
    )


def _absurd_counters(rng, n, run, ids, shapes, rounds):
    mid = f"hostile-{n}"
    props, body = _valid_update(rng, mid, run, ids, shapes, rounds)
    which = rng.choice(["num_samples", "round", "version", "negative", "join"])
    if which == "num_samples":
        update = ParameterUpdate(
            message_id=mid,
            client_id=rng.choice(ids),
            task_id="t",
            parameters={k: np.zeros(s, np.float32) for k, s in shapes.items()},
            num_samples=rng.choice([10**12, 2**62]),
            run=run,
            round=rng.randint(1, rounds),
            model_version=rng.randint(0, rounds),
        )
        envelope, body = to_wire(update)
        props = _props(envelope.type, mid, run, round_=update.round, version=update.model_version)
    elif which == "round":
        props["headers"]["round"] = rng.choice([10**15, 2**62])
    elif which == "version":
        props["headers"]["model_version"] = rng.choice([10**15, 2**62])
    elif which == "negative":
        props["headers"][rng.choice(["round", "model_version"])] = -rng.randint(1, 2**40)
    else:
        props = _props("join", mid, run)
        body = encode({"client_id": rng.choice(ids), "num_samples": 10**12})
    return _one(f"absurd {which}", REFUSED, props, body)


def _invalid_ids(rng, n, run, ids, shapes, rounds):
    mid = f"hostile-{n}"
    bad = rng.choice(INVALID_CLIENT_IDS)
    kind = rng.choice(["join", "heartbeat", "leave", "parameter_update"])
    if kind == "parameter_update":
        update = ParameterUpdate(
            message_id=mid,
            client_id=bad,
            task_id="t",
            parameters={k: np.zeros(s, np.float32) for k, s in shapes.items()},
            num_samples=10,
            run=run,
            round=1,
            model_version=0,
        )
        body = to_wire(update)[1]
    elif kind == "leave":
        body = to_wire(Leave(client_id=bad, reason="r" * rng.choice([1, 100_000])))[1]
    else:
        body = to_wire((Join if kind == "join" else Heartbeat)(client_id=bad, num_samples=10))[1]
    return _one("invalid client id", DEAD, _props(kind, mid, run), body)


def _forged_leave(rng, n, run, ids, shapes, rounds):
    # A Leave for a real client is accepted: without identity.enforce nothing tells a forged
    # one from the client's own (only a validated user_id can). Rare in the mix.
    if rng.random() > 0.05:
        return _unknown_type(rng, n, run, ids, shapes, rounds)
    body = to_wire(Leave(client_id=rng.choice(ids), reason="forged"))[1]
    return _one("forged Leave for a real client (identity, #9)", IDENTITY, _props("leave", f"hostile-{n}", run), body)


def _local_type(rng, n, run, ids, shapes, rounds):
    kind = rng.choice(["round_deadline", "join_deadline", "drain_done", "started"])
    body = encode({"redelivered_backlog": 0} if kind == "started" else {})
    return _one("LOCAL timer type", DEAD, _props(kind, f"hostile-{n}", run), body)


def _unknown_type(rng, n, run, ids, shapes, rounds):
    kind = rng.choice(
        [
            "evil",
            "parameter_updatex",
            "x" * 200,
            "",
            "train_task",
            "exit",
            "update_dropped",
            "model_version_stored",
            "journal_mark",
        ]
    )
    # the run's own types the server has no handler for, or that only it may write, too
    body = os.urandom(16) if rng.random() < 0.5 else encode({"reason": "forged"})
    return _one("unknown type", DEAD, _props(kind, f"hostile-{n}", run), body, key="server.unknown")


def _garbage_properties(rng, n, run, ids, shapes, rounds):
    mid = f"hostile-{n}"
    props, body = _valid_update(rng, mid, run, ids, shapes, rounds)
    props["app_id"] = rng.choice(["attacker", "x" * 200])
    which = rng.choice(
        [
            "type-bytes",
            "ts-inf",
            "ts-nan",
            "ts-neg",
            "ts-huge",
            "ts-prop",
            "decimal",
            "timestamp-2^63",
            "long-header",
            "header-key-bytes",
            "stream-offset",
            "floats-header",
            "nested",
        ]
    )
    key = None
    expect = DEAD
    h = props["headers"]
    if which == "type-bytes":
        props["type"] = b"\xff\xfeparameter_update"
    elif which.startswith("ts-") and which != "ts-prop":
        h["x-brokerfl-timestamp"] = {"ts-inf": "inf", "ts-nan": "nan", "ts-neg": "-1", "ts-huge": "1e30"}[which]
    elif which == "ts-prop":
        props["timestamp"] = 2**64 - 1
    elif which == "decimal":
        import decimal

        h["price"] = decimal.Decimal("1.25")
        key = ""  # RabbitMQ 3.10 drops the publisher's connection routing it to the journal stream
        expect = REFUSED
    elif which == "timestamp-2^63":
        h["when"] = RawTimestamp(2**63)
        key = ""
        expect = DEAD_ANONYMOUS
    elif which == "long-header":
        h["junk"] = "j" * 100_000
        expect = REFUSED
    elif which == "header-key-bytes":
        h[b"\xff\xfe"] = 1
    elif which == "stream-offset":
        h["x-stream-offset"] = 5
        expect = REFUSED
    elif which == "floats-header":
        h["x-brokerfl-floats"] = "round,model_version"
        h["round"], h["model_version"] = "inf", "nan"
    else:
        h["round"] = {"a": [1, 2, {"b": None}]}
    return _one(f"garbage properties: {which}", expect, props, body, key=key)


def _absurd_chunks(rng, n, run, ids, shapes, rounds):
    mid = f"hostile-{n}"
    props = _props("parameter_update", mid, run)
    bad = rng.choice(
        [
            {chunks.CHUNK_HEADER: "0/1000000000", chunks.CHUNK_OF_HEADER: mid, chunks.LENGTH_HEADER: 10},
            {chunks.CHUNK_HEADER: "5/2", chunks.CHUNK_OF_HEADER: mid, chunks.LENGTH_HEADER: 10},
            {chunks.CHUNK_HEADER: "0/2", chunks.CHUNK_OF_HEADER: mid, chunks.LENGTH_HEADER: -1},
            {chunks.CHUNK_HEADER: "0/2", chunks.CHUNK_OF_HEADER: mid, chunks.LENGTH_HEADER: 2**62},
            {chunks.CHUNK_HEADER: "x/y", chunks.CHUNK_OF_HEADER: mid, chunks.LENGTH_HEADER: 10},
            {chunks.CHUNK_HEADER: "0/2", chunks.CHUNK_OF_HEADER: "", chunks.LENGTH_HEADER: 10},
            {
                chunks.CHUNK_HEADER: "1/2",
                chunks.CHUNK_OF_HEADER: mid,
                chunks.LENGTH_HEADER: 10,
                chunks.SHA256_HEADER: "nope",
            },
            {
                chunks.CHUNK_HEADER: "0/2",
                chunks.CHUNK_OF_HEADER: mid,
                chunks.LENGTH_HEADER: 3,
            },  # chunk bigger than the message
        ]
    )
    props["headers"].update(bad)
    return _one("absurd chunk headers", DEAD, props, os.urandom(rng.choice([10, 1000])))


def _unfinished_chunks(rng, n, run, ids, shapes, rounds):
    """A set of ``count`` 64 KiB chunks of which some never come (or whose hash lies)."""
    mid = f"hostile-{n}"
    count = rng.randint(2, 6)
    body = os.urandom(count * CHUNK_BYTES)
    parts = list(chunks.split(body, CHUNK_BYTES, mid))
    corrupt = rng.random() < 0.2
    if corrupt:
        parts[-1][1][chunks.XXH3_HEADER] = "0" * 32
        sent = parts
    else:
        sent = rng.sample(parts, rng.randint(1, count - 1))
    out = []
    for part, headers in sent:
        props = _props("parameter_update", mid, run)
        props["headers"].update(headers)
        out.append(
            HostileMessage(
                "unfinished chunk set" if not corrupt else "chunk set with a lying hash",
                CHUNK,
                "server.parameter_update",
                props,
                part,
                mid,
                len(sent),
            )
        )
    return out
