"""The name rule and the bounds on what names a message, both sides of the broker share.

Run names and client ids become words of routing keys (no dots, no wildcards) and land in
logs, state and records; message ids are bounded; text from the wire is shown bounded and
printable. This module imports nothing from brokerfl: what travels (messages) and the
broker's side (transport, topology) both take the rule from here.
"""

from __future__ import annotations

import re
from typing import Any

MAX_ID_CHARS = 128  # message ids and senders (ours are 32 hex digits and client names), and the fields that name one

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_name(kind: str, value: str) -> str:
    """Run names and client ids become words of routing keys: no dots, no wildcards."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-64 characters of letters, digits, '_' or '-'")
    return value


def bounded(text: Any, limit: int = 200) -> str:
    """``text`` as a string fit for a log line, a terminal or a record: at most ``limit``
    characters, with control characters (a terminal's escape sequences, line breaks that
    would forge log lines) written as escapes."""
    text = text if isinstance(text, str) else repr(text)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text)} chars)"
    return text if text.isprintable() else "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
