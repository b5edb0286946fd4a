"""Reassembly in RAM places each chunk in the body as it arrives (brokerfl.transports.amqp.partial):
the completed body is that buffer, so a message's chunks and their joined copy are never
alive at once, and the bytes are the same, bit for bit, in any order of arrival."""

from __future__ import annotations

import itertools
import os

import pytest
import xxhash

from brokerfl.transports.amqp import chunks
from brokerfl.transports.amqp.partial import Partial, _copy_into, _uninitialised_bytes

KiB = 1024


def parts_of(body: bytes, chunk_size: int, mid: str) -> list[tuple[chunks.ChunkInfo, bytes]]:
    return [(chunks.parse(headers), part) for part, headers in chunks.split(body, chunk_size, mid)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_chunks_in_any_order_are_placed_and_the_body_is_the_buffer(order):
    body = os.urandom(3 * 16 * KiB + 123)  # three full chunks and a short last one
    parts = parts_of(body, 16 * KiB, "m")
    a = chunks.Assembler()
    for n, i in enumerate(order):
        outcome = a.add(*parts[i], handle=i)
        if n < len(order) - 1:
            assert isinstance(outcome, chunks.Held)
            partial = a.partials["m"]
            assert all(p.placed and p.body is None for p in partial.pieces.values())  # no chunk kept as received
    assert isinstance(outcome, chunks.Complete)
    assert type(outcome.body) is bytes and outcome.body == body
    assert outcome.handles == [0, 1, 2, 3]


def test_a_publisher_with_uneven_chunks_is_joined_as_before():
    body = os.urandom(40 * KiB)
    uneven = [body[: 10 * KiB], body[10 * KiB : 30 * KiB], body[30 * KiB :]]  # not "all but the last the same size"
    info = [chunks.ChunkInfo("m", i, 3, len(body), None, None) for i in range(3)]
    info[2] = chunks.ChunkInfo("m", 2, 3, len(body), None, xxhash.xxh3_128(body).hexdigest())
    a = chunks.Assembler()
    outcomes = [a.add(info[i], uneven[i], handle=i) for i in range(3)]
    assert [type(o) for o in outcomes] == [chunks.Held, chunks.Held, chunks.Complete]
    assert outcomes[-1].body == body


def all_but_the_last_chunk() -> tuple[chunks.Assembler, list[tuple[chunks.ChunkInfo, bytes]]]:
    """An assembler holding (placed) the first two of a 40 KiB message's three chunks."""
    parts = parts_of(os.urandom(40 * KiB), 16 * KiB, "m")
    a = chunks.Assembler()
    assert isinstance(a.add(*parts[0], handle=0), chunks.Held)
    assert isinstance(a.add(*parts[1], handle=1), chunks.Held)
    assert all(p.placed for p in a.partials["m"].pieces.values())
    return a, parts


def test_a_corrupt_message_gives_back_its_placed_chunks_as_received():
    a, parts = all_but_the_last_chunk()
    last_info, last = parts[2]
    wrong = chunks.ChunkInfo("m", 2, 3, last_info.length, None, "0" * 32)
    outcome = a.add(wrong, last, handle=2)
    assert isinstance(outcome, chunks.Corrupt) and "checksum" in outcome.reason
    assert outcome.bodies == [parts[0][1], parts[1][1], last] and outcome.handles == [0, 1, 2]


def test_an_evicted_message_gives_back_its_placed_chunks():
    clock = [0.0]
    a = chunks.Assembler(clock=lambda: clock[0], max_partials=1)
    first = parts_of(os.urandom(40 * KiB), 16 * KiB, "first")
    second = parts_of(os.urandom(40 * KiB), 16 * KiB, "second")
    a.add(*first[0], handle="f0")
    clock[0] = 1.0
    a.add(*second[0], handle="s0")
    ((evicted, _why),) = a.take_evicted()
    assert evicted.message_id == "first" and evicted.take() == [("f0", first[0][1])]


def test_a_last_chunk_claiming_a_longer_body_is_not_placed_and_the_message_is_corrupt():
    a, parts = all_but_the_last_chunk()
    longer = os.urandom(8 * KiB + 1000)  # its place, after the two 16 KiB chunks, would end past the body
    outcome = a.add(chunks.ChunkInfo("m", 2, 3, 32 * KiB + len(longer), None, "0" * 32), longer, handle=2)
    assert isinstance(outcome, chunks.Corrupt) and "length" in outcome.reason  # not an exception
    assert outcome.bodies == [parts[0][1], parts[1][1], longer]


def test_copy_into_refuses_what_does_not_fit():
    target = _uninitialised_bytes(8)
    _copy_into(target, 4, b"abcd")
    assert target[4:] == b"abcd"
    with pytest.raises(ValueError):
        _copy_into(target, 5, b"abcd")
    assert Partial("x", 2).buffer is None
