"""structlog set-up: key=value lines on a terminal, JSON lines otherwise (for log
collectors), on stderr, with run, role, client, round and message id bound.
``BROKERFL_LOG_FORMAT=json|console`` overrides the choice.

A process that also publishes its log to the run (:mod:`brokerfl.runtime.remote_log`)
installs a :class:`LogBuffer`: every record written to stderr is also copied, bounded, into
it, from whatever thread logs; the process's I/O loop takes them out and publishes them.
Logging never waits for the broker: a full buffer drops the oldest record and counts it."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from typing import Any

import structlog


class _StderrLogger:
    """Looks stderr up at every call, so a progress bar that redirects it still works."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


RECORD_VALUE_CHARS = 300  # of one value of a record copied for the broker
RECORD_EVENT_CHARS = 300
RECORD_EXCEPTION_CHARS = 3000  # a formatted traceback, its end kept
RECORD_MAX_FIELDS = 24
BUFFER_RECORDS = 2000  # records waiting for the I/O loop; beyond, the oldest are dropped


def _bounded_text(value: Any, limit: int) -> str:
    text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bounded_record(event_dict: dict[str, Any], level: str) -> dict[str, Any]:
    """A record as it travels: time, level, event and at most ``RECORD_MAX_FIELDS`` other
    keys, each value a number, bool, None or a bounded string."""
    record: dict[str, Any] = {"time": time.time(), "level": level}
    for key, value in event_dict.items():
        if key in ("timestamp", "level", "time"):
            continue
        if len(record) >= RECORD_MAX_FIELDS + 2:
            record["truncated"] = True
            break
        if key == "exception":
            text = str(value)
            record[key] = text if len(text) <= RECORD_EXCEPTION_CHARS else "..." + text[-RECORD_EXCEPTION_CHARS:]
        elif isinstance(value, bool) or value is None or (isinstance(value, int | float) and abs(value) < 2**53):
            record[_bounded_text(key, 64)] = value
        else:
            record[_bounded_text(key, 64)] = _bounded_text(
                value, RECORD_EVENT_CHARS if key == "event" else RECORD_VALUE_CHARS
            )
    return record


class LogBuffer:
    """Records on their way to the broker: filled by the logging calls of any thread,
    emptied by the process's I/O loop (:meth:`take`). Bounded: past ``size`` the oldest
    record goes, and is counted in ``dropped``."""

    def __init__(self, size: int = BUFFER_RECORDS) -> None:
        self._records: deque[str] = deque()
        self._lock = threading.Lock()
        self.size = size
        self.dropped = 0  # since the last take

    def add(self, record: dict[str, Any]) -> None:
        text = json.dumps(record, default=str, allow_nan=True)
        with self._lock:
            if len(self._records) >= self.size:
                self._records.popleft()
                self.dropped += 1
            self._records.append(text)

    def lose(self, count: int = 1) -> None:
        """Count records that will not reach the broker (copied badly, or a batch not sent)."""
        with self._lock:
            self.dropped += count

    def take(self, limit: int) -> tuple[list[str], int]:
        """Up to ``limit`` records (JSON texts), oldest first, and how many were dropped
        since the last take."""
        with self._lock:
            records = [self._records.popleft() for _ in range(min(limit, len(self._records)))]
            dropped, self.dropped = self.dropped, 0
        return records, dropped

    def __len__(self) -> int:
        return len(self._records)


_buffer: LogBuffer | None = None


def install_buffer(buffer: LogBuffer | None) -> None:
    """Copy every record logged from now on into ``buffer`` (None: stop copying)."""
    global _buffer
    _buffer = buffer


def _copy_to_buffer(logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    buffer = _buffer
    if buffer is not None:
        try:
            buffer.add(bounded_record(event_dict, event_dict.get("level", method)))
        except Exception:  # never let the copy break the log line itself  # noqa: BLE001
            buffer.lose()
    return event_dict


def configure_logging(level: str = "info", log_format: str | None = None) -> None:
    """``log_format``: ``json``, ``console``, or None: $BROKERFL_LOG_FORMAT, else console
    on a terminal and JSON when stderr is not one."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    log_format = log_format or os.environ.get("BROKERFL_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    if log_format not in ("json", "console"):
        raise ValueError(f"unknown log format {log_format!r} (BROKERFL_LOG_FORMAT): use json or console")
    if log_format == "json":
        stamp, render = structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.JSONRenderer()
    else:
        stamp, render = (
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            _copy_to_buffer,
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("brokerfl").bind(**bound)


def warnings_only_logger(**bound: Any) -> Any:
    """A logger that writes warnings and worse only, whatever the process's level: for the
    lines of each logical client of a process that hosts many of them (four lines a round
    each would be thousands a round, and would crowd out everything else in the run's logs
    stream)."""
    quiet = structlog.make_filtering_bound_logger(logging.WARNING)
    return structlog.wrap_logger(None, wrapper_class=quiet, logger_factory_args=("brokerfl",)).bind(**bound)
