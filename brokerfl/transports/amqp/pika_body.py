"""Chunks between pika and brokerfl without a chunk-sized copy either way.

Out: :class:`GatheredBody`. pika's ``basic_publish`` takes ``bytes`` and does three things
with a body: asks its length (for the content header), tests it for emptiness, and slices
it into frames of at most ``frame_max`` bytes, each of which it copies again into the frame
it writes (``pika.connection.Connection._send_message``). A :class:`GatheredBody` is a
``bytes`` (so pika takes it as it is) that answers those three from a list of views of the
encoded body's own buffers: each slice is gathered when pika asks for it. A 16 MiB chunk
then costs pika's frames of it and no 16 MiB copy made before them (a copy of every
published body, and a page-faulting allocation with a lean allocator).

The ``bytes`` underneath is empty: anything that reads it through the buffer protocol
(``memoryview``, ``b"".join``) sees no bytes. pika 1.3 and 1.4 do not
(``tests/test_pika_body.py`` runs pika's own framing code on a GatheredBody and on the
joined bytes and compares the frames; ``pyproject.toml`` keeps pika below 1.5). If a later
pika did, a chunked message would fail its checksum and a whole one would fail to decode:
refused and dead-lettered, not taken wrong.

In: :class:`Fragments`, made by :class:`FragmentKeepingAssembler` (see there): a large
received chunk as pika's frames, which reassembly copies part by part to its place.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any, Self

import pika.channel


class GatheredBody(bytes):
    """``views`` seen as one bytes object by pika: length, truth and slices only."""

    _views: list[memoryview]
    _starts: list[int]
    _length: int

    def __new__(cls, views: Sequence[memoryview]) -> Self:
        self = super().__new__(cls)
        self._views = [v for v in views if v.nbytes]
        self._starts, at = [], 0
        for view in self._views:
            self._starts.append(at)
            at += view.nbytes
        self._length = at
        return self

    def __len__(self) -> int:
        return self._length

    def __bool__(self) -> bool:
        return self._length > 0

    def __getitem__(self, key: object) -> bytes:  # type: ignore[override]
        if not isinstance(key, slice):
            raise TypeError("a gathered body is read in slices (what pika does), not by index")
        start, stop, step = key.indices(self._length)
        if step != 1:
            raise ValueError("a gathered body is read in contiguous slices")
        if stop <= start:
            return b""
        at = bisect.bisect_right(self._starts, start) - 1
        taken = []
        while start < stop:
            view, first = self._views[at], self._starts[at]
            piece = view[start - first : min(stop - first, view.nbytes)]
            taken.append(piece)
            start += piece.nbytes
            at += 1
        return bytes(taken[0]) if len(taken) == 1 else b"".join(taken)

    def __bytes__(self) -> bytes:
        return self[:]

    def __eq__(self, other: object) -> bool:
        return bytes(self) == other

    def __ne__(self, other: object) -> bool:
        return not self == other

    __hash__ = None  # type: ignore[assignment]  # not the hash of the empty bytes underneath

    def __repr__(self) -> str:
        return f"GatheredBody({self._length} bytes in {len(self._views)} views)"


class Fragments:
    """A received chunk as pika's body frames gave it (``parts``), not joined: reassembly
    copies each part straight to its place in the body (:mod:`brokerfl.transports.amqp.partial`),
    so a 16 MiB chunk costs no 16 MiB join first. ``bytes(fragments)`` joins them, for
    whatever needs one bytes object (a dead letter, a chunk kept as it came)."""

    __slots__ = ("nbytes", "parts")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.nbytes = sum(len(p) for p in parts)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return b"".join(self.parts)

    def __repr__(self) -> str:
        return f"Fragments({self.nbytes} bytes in {len(self.parts)} parts)"


# Chunks at least this long arrive as Fragments (below it a join costs next to nothing).
FRAGMENTS_MIN_BYTES = 1024**2


class FragmentKeepingAssembler(pika.channel.ContentFrameAssembler):
    """pika's per-channel assembler of a message's frames, except that the body of a chunk
    (a message with ``chunk_header`` among its headers) of at least
    :data:`FRAGMENTS_MIN_BYTES` is handed on as :class:`Fragments` instead of joined. pika
    joins every body into one ``bytes`` (``ContentFrameAssembler._finish``); with a lean
    allocator a 16 MiB join is a fresh mapping that faults page by page (several times the
    cost of a join into reused memory), on every chunk the server receives."""

    def __init__(self, chunk_header: str) -> None:
        super().__init__()
        self.chunk_header = chunk_header

    def _finish(self) -> Any:  # pika's own signature
        header = self._header_frame
        headers = getattr(header.properties, "headers", None) if header is not None else None
        if (
            len(self._body_fragments) > 1
            and header.body_size >= FRAGMENTS_MIN_BYTES
            and isinstance(headers, dict)
            and self.chunk_header in headers
        ):
            content = (self._method_frame, header, Fragments(self._body_fragments))
            self._reset()  # a new list: the Fragments keep the old one
            return content
        return super()._finish()


def keep_fragments(channel: object, chunk_header: str) -> None:
    """Make ``channel`` (a pika BlockingChannel) hand chunks on as :class:`Fragments`."""
    channel._impl._content_assembler = FragmentKeepingAssembler(chunk_header)  # type: ignore[attr-defined]
