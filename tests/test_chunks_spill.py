"""Reassembly with chunks spilled to a temporary file (``Assembler(spill_min_bytes=...)``):
the same outcomes, bit for bit, as in RAM, and no file left open. ``ram_partials=0``
spills every message (by default the first one begun stays in RAM)."""

from __future__ import annotations

import os
import random

import pytest

from brokerfl.transports.amqp import chunks

KiB = 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def parts_of(body: bytes, chunk_size: int, mid: str) -> list[tuple[chunks.ChunkInfo, bytes]]:
    return [(chunks.parse(headers), part) for part, headers in chunks.split(body, chunk_size, mid)]


def corrupted(part: bytes) -> bytes:
    """``part`` with its first byte flipped: always a change (writing a fixed byte over it
    is none when the byte was already that one, 1 time in 256)."""
    return bytes([part[0] ^ 0xFF]) + part[1:]


@pytest.fixture
def fds():
    """Fails the test if it leaves a file descriptor open."""
    before = open_fds()
    yield
    assert open_fds() == before


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_interleaved_messages_reassemble_bit_exactly_from_their_files(seed, fds):
    rng = random.Random(seed)
    bodies = {f"m{i}": os.urandom(rng.randrange(20 * KiB, 90 * KiB)) for i in range(5)}
    queues = {mid: parts_of(body, 8 * KiB, mid) for mid, body in bodies.items()}
    a = chunks.Assembler(spill_min_bytes=0, ram_partials=0)
    done: dict[str, chunks.Complete] = {}
    while any(queues.values()):  # chunks of the five messages interleaved at random
        mid = rng.choice([m for m, q in queues.items() if q])
        info, part = queues[mid].pop(0)
        outcome = a.add(info, part, handle=(mid, info.index), sender=mid)
        if isinstance(outcome, chunks.Complete):
            done[mid] = outcome
        else:
            assert isinstance(outcome, chunks.Held)
            partial = a.partials[mid]
            assert partial.spill is not None and all(
                p.body is None for p in partial.pieces.values()
            )  # nothing held in RAM
    assert {mid: c.body for mid, c in done.items()} == bodies
    assert all(type(c.body) is bytes for c in done.values())
    assert all(c.handles == [(mid, i) for i in range(len(c.handles))] for mid, c in done.items())
    assert a.held_bytes == 0 and not a.partials


def test_chunks_out_of_order_and_duplicates(fds):
    body = os.urandom(50 * KiB)
    parts = parts_of(body, 16 * KiB, "m")  # 4 chunks
    a = chunks.Assembler(spill_min_bytes=0, ram_partials=0)
    order = [0, 2, 1, 1, 0]  # a redelivery out of order, and a publisher's retries
    outcomes = [a.add(*parts[i], handle=f"h{n}") for n, i in enumerate(order)]
    assert all(isinstance(o, chunks.Held) for o in outcomes)
    assert a.partials["m"].hashed == 3 and a.held_bytes == sum(len(parts[i][1]) for i in order)
    done = a.add(*parts[3], handle="last")
    assert isinstance(done, chunks.Complete) and done.body == body
    assert done.handles == ["h0", "h2", "h1", "last", "h3", "h4"]  # index order, then duplicates
    assert isinstance(a.add(*parts[2], handle="late"), chunks.Extra)
    a.settled("m", requeued=False)
    assert isinstance(a.add(*parts[2], handle="later"), chunks.Stale)


def test_a_corrupt_spilled_message_gives_back_every_chunk_as_received(fds):
    body = os.urandom(40 * KiB)
    parts = parts_of(body, 16 * KiB, "m")
    sent = [part if i != 1 else corrupted(part) for i, (_, part) in enumerate(parts)]
    a = chunks.Assembler(spill_min_bytes=0, ram_partials=0)
    assert isinstance(a.add(parts[0][0], sent[0], handle=0), chunks.Held)
    assert isinstance(a.add(parts[1][0], sent[1], handle=1), chunks.Held)
    assert isinstance(a.add(parts[1][0], sent[1], handle="again"), chunks.Held)  # a duplicate, spilled too
    outcome = a.add(parts[2][0], sent[2], handle=2)
    assert isinstance(outcome, chunks.Corrupt) and "checksum mismatch" in outcome.reason
    assert outcome.handles == [0, 1, 2, "again"] and outcome.bodies == [sent[0], sent[1], sent[2], sent[1]]


def test_evicted_and_expired_spilled_messages_give_back_their_chunks(fds):
    clock = [0.0]
    a = chunks.Assembler(clock=lambda: clock[0], max_partials=2, spill_min_bytes=0, ram_partials=0)
    bodies = {mid: os.urandom(30 * KiB) for mid in ("a", "b", "c")}
    parts = {mid: parts_of(body, 8 * KiB, mid) for mid, body in bodies.items()}
    for mid in ("a", "b", "c"):
        for info, part in parts[mid][:2]:
            clock[0] += 1
            assert isinstance(a.add(info, part, handle=(mid, info.index), sender=mid), chunks.Held)
    ((evicted, why),) = a.take_evicted()
    assert evicted.message_id == "a" and "incomplete chunked messages at once" in why
    assert evicted.take() == [(("a", i), parts["a"][i][1]) for i in range(2)]
    assert evicted.spill is None  # take() closed it
    expired = a.expire(older_than=4.5)  # b was last fed at 4, c at 6
    assert [p.message_id for p in expired] == ["b"]
    assert expired[0].take() == [(("b", i), parts["b"][i][1]) for i in range(2)]
    released = a.release()  # c: handles only, its file closed
    assert (
        [p.message_id for p in released] == ["c"]
        and released[0].spill is None
        and released[0].handles == [("c", 0), ("c", 1)]
    )
    assert a.held_bytes == 0


def test_bounds_count_spilled_bytes():
    a = chunks.Assembler(max_bytes=20 * KiB, max_bytes_per_sender=20 * KiB, spill_min_bytes=0, ram_partials=0)
    first = parts_of(os.urandom(20 * KiB), 8 * KiB, "first")
    second = parts_of(os.urandom(20 * KiB), 8 * KiB, "second")
    assert isinstance(a.add(*first[0], handle=0), chunks.Held)
    assert isinstance(a.add(*first[1], handle=1), chunks.Held)
    assert a.partials["first"].spill is not None and a.held_bytes == 16 * KiB
    assert isinstance(a.add(*second[0], handle=2), chunks.Held)  # 24 KiB held: first is given up
    ((evicted, why),) = a.take_evicted()
    assert evicted.message_id == "first" and "max_partial_bytes" in why
    evicted.close()
    a.close()
    assert not a.partials and a.held_bytes == 0


def test_small_messages_stay_in_ram_and_an_unwritable_spill_dir_falls_back_to_ram(tmp_path, fds):
    body = os.urandom(40 * KiB)
    parts = parts_of(body, 16 * KiB, "m")
    small = chunks.Assembler(spill_min_bytes=len(body) + 1)
    small.add(*parts[0], handle=0)
    partial = small.partials["m"]
    assert (
        partial.spill is None and partial.pieces[0].placed and bytes(partial.body_of(partial.pieces[0])) == parts[0][1]
    )
    nowhere = chunks.Assembler(spill_min_bytes=0, ram_partials=0, spill_dir=str(tmp_path / "missing"))
    outcomes = [nowhere.add(info, part, handle=i) for i, (info, part) in enumerate(parts)]
    assert isinstance(outcomes[-1], chunks.Complete) and outcomes[-1].body == body
    small.close()


def test_close_closes_every_file(fds):
    a = chunks.Assembler(max_partials=2, spill_min_bytes=0, ram_partials=0)
    for mid in ("a", "b", "c"):
        a.add(*parts_of(os.urandom(20 * KiB), 8 * KiB, mid)[0], handle=mid)
    assert len(a.evicted) == 1 and len(a.partials) == 2
    a.close()
    assert not a.partials and not a.evicted


def test_by_default_one_message_at_a_time_stays_in_ram_and_the_overlapping_ones_spill(fds):
    bodies = {mid: os.urandom(40 * KiB) for mid in ("a", "b", "c")}
    parts = {mid: parts_of(body, 16 * KiB, mid) for mid, body in bodies.items()}
    a = chunks.Assembler(spill_min_bytes=0)
    for mid in ("a", "b"):  # interleaved: a first (in RAM), b meanwhile (spilled)
        a.add(*parts[mid][0], handle=mid)
    assert a.partials["a"].spill is None and a.partials["a"].pieces[0].placed
    assert a.partials["b"].spill is not None and a.partials["b"].pieces[0].body is None
    done = {}
    for mid in ("a", "b"):
        for info, part in parts[mid][1:]:
            outcome = a.add(info, part, handle=mid)
        done[mid] = outcome.body
    for info, part in parts["c"]:  # after the others: nothing overlaps, nothing spills
        outcome = a.add(info, part, handle="c")
        if isinstance(outcome, chunks.Held):
            assert a.partials["c"].spill is None
    done["c"] = outcome.body
    assert done == bodies


def test_a_message_begun_while_a_spilled_one_is_still_coming_spills_too(fds):
    """The RAM slot frees only when nothing large is incomplete: otherwise the body placed
    in RAM would be held while the spilled one is read back whole (2 bodies at once)."""
    bodies = {mid: os.urandom(40 * KiB) for mid in ("a", "b", "c")}
    parts = {mid: parts_of(body, 16 * KiB, mid) for mid, body in bodies.items()}
    a = chunks.Assembler(spill_min_bytes=0)
    a.add(*parts["a"][0], handle="a")  # in RAM
    a.add(*parts["b"][0], handle="b")  # overlaps a: spilled
    done = {}
    for info, part in parts["a"][1:]:
        outcome = a.add(info, part, handle="a")
    done["a"] = outcome.body
    a.add(*parts["c"][0], handle="c")  # a is done, but b is still coming
    assert a.partials["c"].spill is not None and a.partials["c"].pieces[0].body is None
    for mid in ("b", "c"):
        for info, part in parts[mid][1:]:
            outcome = a.add(info, part, handle=mid)
        done[mid] = outcome.body
    assert done == bodies
    assert not a.partials


def test_a_spilled_body_is_read_back_whole_from_its_offset_and_a_short_file_is_an_error(tmp_path):
    from brokerfl.transports.amqp.partial import _read

    data = os.urandom(5 * 1024**2 + 3)  # large enough for huge pages, not a multiple of a page
    path = tmp_path / "spill"
    path.write_bytes(b"head" + data)
    with open(path, "rb") as f:
        assert _read(f.fileno(), len(data), 4) == data
        with pytest.raises(OSError, match="ended 1 bytes early"):
            _read(f.fileno(), len(data) + 1, 4)
