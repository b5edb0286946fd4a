"""One incomplete chunked message, and where its chunks wait until the last one comes.

A chunk of a message reassembled in RAM is copied straight to its place in the body as it
arrives (:meth:`Partial.place`), and pika's copy of it is dropped: the completed body is
that buffer, so the chunks and their joined copy (2x the message) are never alive at once.
A large chunk comes as pika's frames (:class:`~brokerfl.transports.amqp.pika_body.Fragments`),
copied part by part: pika never joins it into a chunk-sized ``bytes`` first.
Chunks are placed by index: every chunk but the last has the same size (what
:func:`brokerfl.transports.amqp.chunks.split` makes), learnt from whichever chunk comes first. A
chunk that does not fit that pattern (another publisher's chunking) is kept as it came and
joined at the end, as before.

Spilling. Several publishers sending large bodies at once (every client's update to the
server) interleave their chunks in the queue, so reassembly holds several incomplete
messages at a time: with 4 clients, ~3.3x a 38 MiB model in the server's RAM on top of the
model and the fold (``docs/benchmarks/server-memory.md``). An
:class:`~brokerfl.transports.amqp.chunks.Assembler` given ``spill_min_bytes`` therefore
reassembles a chunked message at least that long in RAM only when no other one is incomplete
(``ram_partials``): the chunks of any one begun while another is still coming, in RAM or
spilled, go to an anonymous temporary file (one per incomplete message, in ``spill_dir``) as
they arrive, and on completion the whole body is read back with one read into a fresh
``bytes`` of exactly its length, backed by huge pages where the kernel allows (a fresh
mapping faults page by page otherwise; a spilled message costs one more kernel copy, the
write).
RAM then holds one message's body plus one chunk, whatever the interleaving: counting the
spilled ones keeps a body being placed in RAM from overlapping one being read back. The
page cache holds the rest (it is not the process's memory, and the kernel writes it out or
drops it under pressure). Messages that do not overlap are never spilled. The bounds still
count spilled bytes, so a hostile publisher cannot fill the disk either. A chunk that
cannot be written (disk full) stays in RAM instead.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import os
import tempfile
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, cast

import xxhash

from brokerfl.transports.amqp.pika_body import Fragments
from brokerfl.transports.memory import advise_huge_pages, libc


@dataclass(frozen=True)
class ChunkInfo:
    """What one chunk's headers say (:func:`brokerfl.transports.amqp.chunks.parse`)."""

    message_id: str
    index: int
    count: int
    length: int
    sha256: str | None  # hex SHA-256 of the whole body (older publishers), on the last chunk
    xxh3: str | None = None  # hex XXH3-128 of the whole body, on the last chunk


@dataclass
class Piece:
    info: ChunkInfo
    body: bytes | Fragments | None  # None: placed in its partial's body, or spilled to its file, at ``offset``
    handle: Any
    size: int = 0
    offset: int = -1
    placed: bool = False


@dataclass
class Partial:
    """Chunks of one message received so far."""

    message_id: str
    count: int
    sender: str = ""
    bytes: int = 0  # of the bodies held (in RAM or spilled)
    pieces: dict[int, Piece] = field(default_factory=dict)
    extras: list[Piece] = field(default_factory=list)  # duplicate copies (a publisher's retry)
    first_seen: float = 0.0
    last_seen: float = 0.0
    digest: Any = field(default_factory=xxhash.xxh3_128)  # XXH3-128 of pieces[0 .. hashed-1]
    hashed: int = 0
    spill: Any = None  # the temporary file its chunks are written to (None: all in RAM)
    spilled: int = 0  # bytes written to it (where the next chunk goes)
    large: bool = False  # at least the assembler's spill_min_bytes
    spilling: bool = False  # its chunks go to the file (decided when its first chunk came)
    buffer: builtins.bytes | None = None  # the body being filled in by place() (allocated at the first placed chunk)
    chunk_size: int = 0  # of every chunk but the last, once known

    @property
    def handles(self) -> list[Any]:
        return [p.handle for p in self.ordered()]

    def ordered(self) -> list[Piece]:
        return [self.pieces[i] for i in sorted(self.pieces)] + self.extras

    # ``builtins.bytes`` in the annotations below: the field ``bytes`` shadows the type here
    def body_of(self, piece: Piece) -> builtins.bytes | memoryview | Fragments:
        """A chunk's bytes: as received (pika's fragments of it, possibly), a view of its
        place in the body, or read back from the file if it was spilled."""
        if piece.body is not None:
            return piece.body
        if piece.placed:
            assert self.buffer is not None  # placed in it
            return memoryview(self.buffer)[piece.offset : piece.offset + piece.size]
        return _read(self.spill.fileno(), piece.size, piece.offset)

    def take(self) -> list[tuple[Any, builtins.bytes]]:
        """``(handle, body)`` of every chunk, in order (for dead-lettering); closes the file."""
        try:
            return [(p.handle, bytes(self.body_of(p))) for p in self.ordered()]
        finally:
            self.close()

    def close(self) -> None:
        self.buffer = None
        if self.spill is not None:
            self.spill.close()
            self.spill = None

    def place(self, piece: Piece) -> None:
        """Copy the chunk to its place in the body and drop the chunk; a chunk whose size does
        not fit "all chunks but the last the same size" is kept as it is."""
        info = piece.info
        size = _chunk_size(info, piece.size)
        if size is None or (self.chunk_size and size != self.chunk_size):
            return
        if self.buffer is not None and len(self.buffer) != info.length:
            return  # it disagrees with the first chunk on the length: Corrupt when complete
        self.chunk_size = size
        if self.buffer is None:
            self.buffer = _uninitialised_bytes(info.length)
        offset = info.index * size
        assert piece.body is not None  # placed or spilled once only
        _copy_into(self.buffer, offset, piece.body)
        piece.offset, piece.placed, piece.body = offset, True, None

    def store(self, piece: Piece, spill_dir: str | None) -> None:
        """Write the chunk to the file (created at the first one) and drop it from RAM;
        if that fails (disk full), keep it in RAM."""
        try:
            if self.spill is None:
                self.spill = tempfile.TemporaryFile(dir=spill_dir, buffering=0)
            assert piece.body is not None  # placed or spilled once only
            _write(self.spill.fileno(), piece.body, self.spilled)
        except OSError:
            return
        piece.offset, self.spilled, piece.body = self.spilled, self.spilled + piece.size, None

    def joined(self, pieces: list[Piece], length: int) -> builtins.bytes:
        """The whole body: the placed buffer when every chunk is in it; one read when the
        chunks lie in order in the file (the usual case for a spilled message); else a join."""
        if self.buffer is not None and all(p.placed for p in pieces):
            return (
                self.buffer
            )  # still the partial's until it is closed (a checksum mismatch takes the chunks back from it)
        if all(p.body is None and not p.placed for p in pieces) and all(
            a.offset + a.size == b.offset for a, b in pairwise(pieces)
        ):
            return _read(self.spill.fileno(), length, pieces[0].offset)
        return b"".join(part for p in pieces for part in buffers(self.body_of(p)))


def _chunk_size(info: ChunkInfo, size: int) -> int | None:
    """The size of every chunk but the last, as this chunk implies it (None: no uniform
    chunking fits it)."""
    if info.count < 2:
        return None
    if info.index < info.count - 1:
        chunk = size
    elif (info.length - size) % (info.count - 1):
        return None
    else:
        chunk = (info.length - size) // (info.count - 1)
    last = info.length - (info.count - 1) * chunk
    return chunk if chunk > 0 and 0 < last <= chunk else None


# A body filled in place must be a real ``bytes`` (pika, the codec and dead-lettering take
# bytes), and a bytearray or numpy buffer would need one more copy to become one. So the
# body is allocated uninitialised with the C API and written through its address before
# anyone else sees it (CPython only; sizes here are >= 2 bytes, never the shared singletons).
_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]
_BYTES_DATA = bytes.__basicsize__ - 1  # where a bytes object's data starts (ob_sval), from its address


def _uninitialised_bytes(size: int, *, huge_pages: bool = False) -> bytes:
    """A fresh ``bytes`` of ``size``, its content not yet written; with ``huge_pages``, a
    large one is backed by huge pages where the kernel allows
    (:func:`brokerfl.transports.memory.advise_huge_pages`)."""
    data = _new_bytes(None, size)
    if huge_pages:
        advise_huge_pages(id(data) + _BYTES_DATA, size)
    return data


def buffers(data: bytes | memoryview | Fragments) -> list[bytes | memoryview]:
    """The buffers a chunk's bytes are in, in order."""
    return cast("list[bytes | memoryview]", data.parts) if isinstance(data, Fragments) else [data]


def _copy_into(target: bytes, offset: int, data: bytes | Fragments) -> None:
    if offset < 0 or offset + len(data) > len(target):
        raise ValueError(f"{len(data)} bytes at {offset} do not fit in {len(target)}")
    address = id(target) + _BYTES_DATA + offset
    for part in data.parts if isinstance(data, Fragments) else [data]:
        ctypes.memmove(address, part, len(part))
        address += len(part)


def _write(fd: int, data: bytes | Fragments, offset: int) -> None:
    for part in buffers(data):
        view = memoryview(part)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done


_libc = libc()
if _libc is None:  # pragma: no cover - every Linux has one
    raise ImportError("brokerfl.transports.amqp.partial needs the C library (pread)")
_pread = _libc.pread  # brokerfl.transports.memory's libc: errno kept
_pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64]
_pread.restype = ctypes.c_ssize_t


def _read(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes of the spill file from ``offset``, read straight into a fresh
    ``bytes`` (:func:`_uninitialised_bytes`: huge pages for a large one; ``os.pread``
    would fault a fresh buffer page by page)."""
    data = _uninitialised_bytes(size, huge_pages=True)
    address, got = id(data) + _BYTES_DATA, 0
    while got < size:  # several reads: bodies over ~2 GiB, or a signal
        done = _pread(fd, address + got, size - got, offset + got)
        if done < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            raise OSError(err, f"reading the spill file: {os.strerror(err)}")
        if done == 0:
            raise OSError(f"spill file ended {size - got} bytes early")
        got += done
    return data
