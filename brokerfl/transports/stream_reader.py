"""Reading a stream until the caller has what it wants.

A stream has no end a reader is told about: a reader stops at a mark it published itself
(the journal's and the models store's end marks, the store's offset probe) or at the
message it looks for (a model version). :class:`StreamReader` is the loop they share:
consume from an offset, ack each delivery before handing it out, give up with a
:class:`TransportError` after a silence, cancel the consumer on the way out.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from brokerfl.transports.base import Delivery, StreamOffset, Transport, TransportError


class StreamReader:
    """``with StreamReader(transport, stream, offset=..., silence_s=..., what=...) as reader:
    for delivery in reader: ...`` — the consumer exists from ``__enter__`` on (so a mark
    published inside the block is read), and is cancelled at ``__exit__``. ``what(silence_s)``
    words the error when nothing arrives for ``silence_s`` (progress restarts the clock)."""

    def __init__(
        self,
        transport: Transport,
        stream: str,
        *,
        offset: StreamOffset,
        silence_s: float,
        what: Callable[[float], str],
        prefetch: int = 2,
        poll_s: float = 0.1,
    ) -> None:
        self.transport, self.stream, self.offset = transport, stream, offset
        self.silence_s, self.what, self.prefetch, self.poll_s = silence_s, what, prefetch, poll_s
        self._pending: deque[Delivery] = deque()
        self._tag: str | None = None

    def __enter__(self) -> StreamReader:
        self._tag = self.transport.consume(
            self.stream, self._pending.append, prefetch=self.prefetch, offset=self.offset
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._tag is not None:
            self.transport.cancel(self._tag)
            self._tag = None

    def __iter__(self) -> Iterator[Delivery]:
        if self._tag is None:
            raise RuntimeError("read a StreamReader inside its with block")
        deadline = time.monotonic() + self.silence_s
        while True:
            if not self._pending:
                if time.monotonic() > deadline:
                    raise TransportError(self.what(self.silence_s))
                self.transport.poll(self.poll_s)
                continue
            delivery = self._pending.popleft()
            self.transport.ack(delivery)
            deadline = time.monotonic() + self.silence_s
            yield delivery
