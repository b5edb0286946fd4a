"""structlog set-up: key=value lines on a terminal, JSON lines otherwise (for log
collectors), on stderr, with run, role, client, round and message id bound.
``BROKERFL_LOG_FORMAT=json|console`` overrides the choice."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog


class _StderrLogger:
    """Looks stderr up at every call, so a progress bar that redirects it still works."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


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
            render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=lambda *args: _StderrLogger(),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound: Any) -> Any:
    return structlog.get_logger("brokerfl").bind(**bound)
