"""Large bodies as several AMQP messages, and putting them back together.

RabbitMQ refuses a message larger than its ``max_message_size`` (16 MiB on 4.x, 128 MiB on
3.x) by closing the channel, and big frames cost the broker memory, so the AMQP transport
publishes a body larger than its ``chunk_size`` as ``count`` messages with the same
routing key and envelope, each carrying:

- ``x-brokerfl-chunk``: ``"index/count"`` (a string, not an array: RabbitMQ 3.x streams
  drop array and table headers);
- ``x-brokerfl-chunk-of``: the logical message's id (the key reassembly groups by);
- ``x-brokerfl-length``: the length of the whole body;
- ``x-brokerfl-xxh3-128``: the hex XXH3-128 checksum of the whole body, on the last chunk
  only. Bodies chunked by older versions carry ``x-brokerfl-sha256`` instead (hex SHA-256),
  which is still checked (a journal keeps them).

This module is broker-agnostic: the transport hands each chunk to an :class:`Assembler`
together with an opaque ``handle`` (its way to ack the chunk later) and gets back what to
do. Chunks of different messages may interleave (several publishers to one queue), so
partial messages are kept by message id. Duplicated chunks (a publisher that retried
after a lost connection resends what the broker may already have) are kept aside and
settled together with their message, never delivered twice.

The checksum guards reassembly against corruption and mix-ups (chunks of another message,
a chunk resent with other bytes); it is not authentication (the publisher computes it;
who sent a message is RabbitMQ's validated ``user_id``), so it need not be cryptographic.
SHA-256 cost as much client CPU as the broker's own work on a large body, on both the
publisher and the consumer; XXH3-128 runs at memory speed (about 30x faster), so it is
computed inline: the publisher once over the whole body, the receiver chunk by chunk as
they arrive in order (``docs/benchmarks/transport.md``).

Where the chunks of an incomplete message wait (placed in its body as they come, or spilled
to a temporary file when several large messages interleave): :mod:`brokerfl.transports.amqp.partial`.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import xxhash

from brokerfl.transports.amqp.partial import ChunkInfo, Partial, Piece, buffers
from brokerfl.transports.amqp.pika_body import Fragments
from brokerfl.wire.names import MAX_ID_CHARS, bounded

CHUNK_HEADER = "x-brokerfl-chunk"
CHUNK_OF_HEADER = "x-brokerfl-chunk-of"
LENGTH_HEADER = "x-brokerfl-length"
XXH3_HEADER = "x-brokerfl-xxh3-128"
SHA256_HEADER = "x-brokerfl-sha256"  # what older versions sent; still checked
HEADERS = frozenset({CHUNK_HEADER, CHUNK_OF_HEADER, LENGTH_HEADER, XXH3_HEADER, SHA256_HEADER})
MAX_CHUNKS = 1_000_000  # chunks of one message (a 16 TiB body at the default chunk size)

# Reassembly bounds (defaults of Assembler and of AmqpTransport, which passes its own).
MAX_PARTIALS = 32  # incomplete messages held at once; the least recently fed one goes first
MAX_PARTIAL_BYTES = 512 * 1024**2  # bytes of incomplete messages held at once
MAX_PARTIAL_BYTES_PER_SENDER = 256 * 1024**2  # of those, by one sender (app_id)
# Chunked messages at least this long may be reassembled in a temporary file (see
# brokerfl.transports.amqp.partial); below it a file costs more than the RAM it saves.
SPILL_MIN_BYTES = 1024**2


def split(body: bytes | list[Any], chunk_size: int, message_id: str) -> Iterator[tuple[bytes, dict[str, Any]]]:
    """Yield ``(part, headers)`` for each chunk of ``body``, each part as one bytes object:
    :func:`split_views` with each chunk's views joined."""
    for views, headers in split_views(body, chunk_size, message_id):
        yield (bytes(views[0]) if len(views) == 1 else b"".join(views)), headers  # b"" for an empty body


def split_views(
    body: bytes | list[Any], chunk_size: int, message_id: str
) -> Iterator[tuple[list[memoryview], dict[str, Any]]]:
    """Yield ``(views, headers)`` for each chunk of ``body``: the chunk as views of the
    caller's buffers (no copy), in order, and its headers.

    ``body``: bytes, or a list of the buffers that make it up, in order
    (:func:`brokerfl.wire.codec.encode_parts`). The checksum is computed over each chunk's views
    as they are yielded (the same digest as over the whole body). The buffers must not
    change until the last chunk is published."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    views = [memoryview(body)] if isinstance(body, bytes) else [memoryview(p).cast("B") for p in body]
    pieces = [v for v in views if v.nbytes]
    length = sum(v.nbytes for v in pieces)
    count = max(1, -(-length // chunk_size))
    checksum = xxhash.xxh3_128()
    at, offset = 0, 0  # where the next chunk starts: pieces[at][offset:]
    for index in range(count):
        want = min(chunk_size, length - index * chunk_size)
        taken: list[memoryview] = []
        while want > 0:
            piece = pieces[at][offset : offset + want]
            taken.append(piece)
            checksum.update(piece)
            want -= piece.nbytes
            offset += piece.nbytes
            if offset == pieces[at].nbytes:
                at, offset = at + 1, 0
        headers: dict[str, Any] = {CHUNK_HEADER: f"{index}/{count}", CHUNK_OF_HEADER: message_id, LENGTH_HEADER: length}
        if index == count - 1:
            headers[XXH3_HEADER] = checksum.hexdigest()
        yield taken or [memoryview(b"")], headers


class BadChunk(ValueError):
    """Chunk headers that do not make sense."""


def parse(headers: dict[str, Any]) -> ChunkInfo | None:
    """The chunk headers of a message, or None if it is a whole message."""
    if CHUNK_HEADER not in headers and CHUNK_OF_HEADER not in headers:
        return None
    position = headers.get(CHUNK_HEADER)
    message_id = headers.get(CHUNK_OF_HEADER)
    length = headers.get(LENGTH_HEADER)
    sha = headers.get(SHA256_HEADER)
    xxh3 = headers.get(XXH3_HEADER)
    if isinstance(position, (str, bytes)) and len(position) <= 64:  # "index/count"
        try:
            position = [int(v) for v in (position.decode() if isinstance(position, bytes) else position).split("/")]
        except ValueError:
            raise BadChunk(f"bad {CHUNK_HEADER} header {_shown(position)}") from None
    if not (
        isinstance(position, list)
        and len(position) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in position)
    ):
        raise BadChunk(f"bad {CHUNK_HEADER} header {_shown(position)}")
    index, count = position
    if not 0 <= index < count <= MAX_CHUNKS:
        raise BadChunk(f"chunk index {index} out of range for {count} chunks (at most {MAX_CHUNKS})")
    if not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_ID_CHARS:
        raise BadChunk(f"bad {CHUNK_OF_HEADER} header {_shown(message_id)}")
    if not isinstance(length, int) or isinstance(length, bool) or not count <= max(length, 1):
        raise BadChunk(f"bad {LENGTH_HEADER} header {_shown(length)} for {count} chunks")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise BadChunk(f"bad {SHA256_HEADER} header {_shown(sha)}")
    if xxh3 is not None and not (isinstance(xxh3, str) and len(xxh3) == 32):
        raise BadChunk(f"bad {XXH3_HEADER} header {_shown(xxh3)}")
    return ChunkInfo(message_id, index, count, length, sha, xxh3)


def _shown(value: Any) -> str:
    return bounded(repr(value), 80)


# What Assembler.add returns ------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """Kept until the rest arrives."""


@dataclass(frozen=True)
class Complete:
    message_id: str
    body: bytes
    handles: list[Any]  # every chunk's handle, in index order, then duplicates


@dataclass(frozen=True)
class Corrupt:
    message_id: str
    handles: list[Any]
    bodies: list[bytes]  # parallel to handles (for dead-lettering copies)
    reason: str


@dataclass(frozen=True)
class Extra:
    """A duplicate chunk of a message already handed out but not yet settled: settle it
    together with that message."""

    message_id: str
    handle: Any


@dataclass(frozen=True)
class Stale:
    """A duplicate chunk of a message already acked: ack it and drop it."""

    message_id: str
    handle: Any


Outcome = Held | Complete | Corrupt | Extra | Stale


class Assembler:
    """Reassembles chunked messages for one consumer (or one queue's ``get``).

    Memory is bounded whatever publishers send (anyone who may publish to the queue can
    start chunked messages and never finish them): at most ``max_partials`` incomplete
    messages, ``max_bytes`` of their chunks, ``max_bytes_per_sender`` of them from one
    sender (the chunks' ``app_id``). Past a bound the least recently fed incomplete message
    is given up: it goes to :attr:`evicted`, with the reason, for the transport to
    dead-letter. A chunk whose message could never fit is refused at once (Corrupt).

    ``spill_min_bytes``: of the chunked messages at least this long, those begun while
    ``ram_partials`` of them are already incomplete (in RAM or spilled) are reassembled in a
    temporary file in ``spill_dir`` (default: the system's) instead (see
    :mod:`brokerfl.transports.amqp.partial`); None: never. Partials handed out (:attr:`evicted`,
    :meth:`expire`) hold their file until :meth:`Partial.take`; :meth:`release` and
    :meth:`close` close them."""

    def __init__(
        self,
        remember: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_partials: int = MAX_PARTIALS,
        max_bytes: int = MAX_PARTIAL_BYTES,
        max_bytes_per_sender: int = MAX_PARTIAL_BYTES_PER_SENDER,
        spill_min_bytes: int | None = None,
        spill_dir: str | None = None,
        ram_partials: int = 1,
    ) -> None:
        self.partials: dict[str, Partial] = {}
        self.in_hand: set[str] = set()  # completed, handed out, not yet settled
        self.evicted: list[tuple[Partial, str]] = []  # given up to stay in bounds; the transport dead-letters them
        self.held_bytes = 0
        self._sender_bytes: dict[str, int] = {}
        self._done: OrderedDict[str, None] = OrderedDict()  # recently acked ids (bounded)
        self._remember = remember
        self._clock = clock
        self.max_partials = max_partials
        self.max_bytes = max_bytes
        self.max_bytes_per_sender = max_bytes_per_sender
        self.spill_min_bytes = spill_min_bytes
        self.spill_dir = spill_dir
        self.ram_partials = ram_partials

    def take_evicted(self) -> list[tuple[Partial, str]]:
        evicted, self.evicted = self.evicted, []
        return evicted

    def _forget(self, partial: Partial) -> None:
        """Remove an incomplete message from the books (and its bytes from the bounds)."""
        if self.partials.pop(partial.message_id, None) is None:
            return
        self.held_bytes -= partial.bytes
        left = self._sender_bytes.get(partial.sender, 0) - partial.bytes
        if left > 0:
            self._sender_bytes[partial.sender] = left
        else:
            self._sender_bytes.pop(partial.sender, None)

    def _evict(self, partial: Partial, why: str) -> None:
        self._forget(partial)
        self.evicted.append(
            (
                partial,
                f"chunked message {partial.message_id}: given up after {len(partial.pieces)} of {partial.count} "
                f"chunks: {why}",
            )
        )

    def _oldest(self, sender: str | None = None) -> Partial:
        """The least recently fed incomplete message (of ``sender``): there is one, for
        what is held (by ``sender``) is over a bound."""
        candidates = [p for p in self.partials.values() if sender is None or p.sender == sender]
        return min(candidates, key=lambda p: p.last_seen)

    def knows(self, message_id: str) -> bool:
        return message_id in self.partials or message_id in self.in_hand or message_id in self._done

    def add(self, info: ChunkInfo, body: bytes | Fragments, handle: Any, sender: str = "") -> Outcome:
        mid = info.message_id
        if mid in self.in_hand:
            return Extra(mid, handle)
        if mid in self._done:
            return Stale(mid, handle)
        now = self._clock()
        partial = self.partials.get(mid)
        if partial is None:
            if info.length > min(self.max_bytes, self.max_bytes_per_sender):
                return Corrupt(
                    mid,
                    [handle],
                    [bytes(body)],
                    f"chunked message {mid}: {info.length} bytes is more than reassembly holds (max_partial_bytes "
                    f"{self.max_bytes}, per sender {self.max_bytes_per_sender}; a run raises them "
                    "with max_message_mib)",
                )
            while len(self.partials) >= self.max_partials:
                self._evict(self._oldest(), f"more than {self.max_partials} incomplete chunked messages at once")
            large = self.spill_min_bytes is not None and info.length >= self.spill_min_bytes and info.count > 1
            # Spilled ones count too: a message placed in RAM while a spilled one is still
            # coming would be held (up to 1x) while that one is read back whole (1x).
            in_progress = sum(p.large for p in self.partials.values())
            partial = self.partials[mid] = Partial(
                mid,
                info.count,
                sender,
                first_seen=now,
                large=large,
                spilling=large and in_progress >= self.ram_partials,
            )
        partial.last_seen = now
        if info.index in partial.pieces:
            if len(partial.extras) >= partial.count:  # more copies than a retry makes
                return self._corrupt(
                    partial, f"chunk {info.index} arrived again, after {len(partial.extras)} duplicates"
                )
            extra = Piece(info, body, handle, len(body))  # a publisher's retry: same bytes again
            partial.extras.append(extra)
            self._grow(partial, len(body))
            given_up = self._bounded(partial)
            if given_up is None:
                self._park(partial, extra, place=False)
            return given_up or Held()
        piece = partial.pieces[info.index] = Piece(info, body, handle, len(body))
        if info.count != partial.count:
            return self._corrupt(
                partial, f"chunk {info.index} says {info.count} chunks, an earlier one said {partial.count}"
            )
        self._grow(partial, len(body))
        if sum(p.size for p in partial.pieces.values()) > info.length:
            return self._corrupt(partial, f"chunks hold more than the {info.length} bytes the message has")
        given_up = self._bounded(partial)
        if given_up is not None:
            return given_up
        self._hash(partial)  # before spilling: the chunk in hand is hashed without a read back
        self._park(partial, piece)
        if len(partial.pieces) < partial.count:
            return Held()
        return self._finish(partial)

    def _park(self, partial: Partial, piece: Piece, *, place: bool = True) -> None:
        """Where the chunk waits: spilled to the file, or copied into its place in the body
        (a duplicate copy is not placed: the body has the original)."""
        if partial.spilling:
            partial.store(piece, self.spill_dir)
        elif place:
            partial.place(piece)

    def _grow(self, partial: Partial, size: int) -> None:
        partial.bytes += size
        self.held_bytes += size
        self._sender_bytes[partial.sender] = self._sender_bytes.get(partial.sender, 0) + size

    def _bounded(self, partial: Partial) -> Outcome | None:
        """Give up the least recently fed messages until the byte bounds hold again; if that
        is ``partial`` itself, its Corrupt outcome, else None."""
        while self._sender_bytes.get(partial.sender, 0) > self.max_bytes_per_sender:
            oldest = self._oldest(partial.sender)
            if oldest is partial:
                return self._corrupt(
                    partial,
                    f"its sender {_shown(partial.sender)} holds more than max_partial_bytes_per_sender "
                    f"({self.max_bytes_per_sender}) in incomplete messages",
                )
            self._evict(
                oldest,
                f"its sender holds more than max_partial_bytes_per_sender ({self.max_bytes_per_sender}) in incomplete "
                "messages",
            )
        while self.held_bytes > self.max_bytes:
            oldest = self._oldest()
            if oldest is partial:
                return self._corrupt(
                    partial, f"incomplete messages hold more than max_partial_bytes ({self.max_bytes})"
                )
            self._evict(oldest, f"incomplete messages hold more than max_partial_bytes ({self.max_bytes})")
        return None

    @staticmethod
    def _hash(partial: Partial) -> None:
        """Feed the digest the chunks that now follow on from those already hashed."""
        while partial.hashed in partial.pieces:
            for part in buffers(partial.body_of(partial.pieces[partial.hashed])):
                partial.digest.update(part)
            partial.hashed += 1

    def _finish(self, partial: Partial) -> Outcome:
        pieces = [partial.pieces[i] for i in range(partial.count)]
        length = pieces[0].info.length
        if any(p.info.length != length for p in pieces):
            return self._corrupt(partial, "chunks disagree on the message length")
        if sum(p.size for p in pieces) != length:
            return self._corrupt(partial, f"chunks hold {sum(p.size for p in pieces)} bytes, the message has {length}")
        last = pieces[-1].info
        if last.xxh3 is None and last.sha256 is None:
            return self._corrupt(partial, f"last chunk carries no {XXH3_HEADER}")
        try:
            body = partial.joined(pieces, length)  # the one copy
        except OSError as exc:
            return self._corrupt(partial, f"its spill file could not be read: {exc}")
        expected: str | None
        if last.xxh3 is not None:
            algorithm, expected, got = "xxh3-128", last.xxh3, partial.digest.hexdigest()
        else:  # from an older publisher
            algorithm, expected, got = "sha256", last.sha256, hashlib.sha256(body).hexdigest()
        if got != expected:
            return self._corrupt(partial, f"{algorithm} checksum mismatch: got {got}, expected {expected}")
        self._forget(partial)
        self.in_hand.add(partial.message_id)
        handles = partial.handles
        partial.pieces.clear()  # drop the chunks' bodies now, not when the caller lets go
        partial.extras.clear()
        partial.close()
        return Complete(partial.message_id, body, handles)

    def _corrupt(self, partial: Partial, reason: str) -> Corrupt:
        self._forget(partial)
        try:
            taken = partial.take()
        except OSError as exc:  # the spill file cannot be read back: dead-letter what is in RAM
            taken = [(p.handle, bytes(p.body) if p.body is not None else b"") for p in partial.ordered()]
            reason = f"{reason} (and its spill file could not be read: {exc})"
            partial.close()
        return Corrupt(
            partial.message_id,
            [h for h, _ in taken],
            [b for _, b in taken],
            f"chunked message {partial.message_id}: {reason}",
        )

    def settled(self, message_id: str, *, requeued: bool) -> None:
        """The consumer settled a completed message: acked or rejected ones are done (later
        copies of their chunks are :class:`Stale`), requeued ones will come back."""
        self.in_hand.discard(message_id)
        if requeued:
            return
        self._done[message_id] = None
        self._done.move_to_end(message_id)
        while len(self._done) > self._remember:
            self._done.popitem(last=False)

    def expire(self, older_than: float) -> list[Partial]:
        """Remove and return the partial messages that received nothing since ``older_than``
        (by this assembler's clock): the rest went elsewhere or was never published."""
        gone = [p for p in self.partials.values() if p.last_seen < older_than]
        for p in gone:
            self._forget(p)
        return gone

    def release(self) -> list[Partial]:
        """Remove and return every partial message (to hand their chunks back: their handles;
        their files are closed)."""
        gone = list(self.partials.values())
        for p in gone:
            self._forget(p)
            p.close()
        return gone

    def close(self) -> None:
        """Close the files of every incomplete and evicted message (the assembler is dropped)."""
        self.release()
        for partial, _ in self.take_evicted():
            partial.close()

    def oldest(self) -> float | None:
        return min((p.first_seen for p in self.partials.values()), default=None)
