"""brokerfl's docstrings, written in Sphinx's markup, as the markdown the site renders.

The docstrings are prose with a few reStructuredText habits: roles (:class:`Name`,
:mod:`a.b`), double-backtick code, a paragraph ending in ``::`` before an indented
literal block, and definition lists (a line, then its definition indented under it).
:func:`from_docstring` turns those into markdown: roles into code spans (``~a.b.C`` shows
``C``), the ``::`` into a colon (the indented block stays code), the definitions into the
``def_list`` extension's form. Text that is already markdown passes unchanged.

Used by the reference generator (``reference.py``) and, as a griffe extension
(:class:`SphinxProse`, listed under mkdocstrings' ``extensions`` in ``mkdocs.yml``), for the
API pages.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

try:
    from griffe import Extension
except ImportError:  # the reference generator runs without griffe
    Extension = object  # type: ignore[assignment,misc]

_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_DOUBLE = re.compile(r"``(.+?)``")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LIST_ITEM = re.compile(r"^(?:[-*+] |\d+\. |#)")


def code(text: str) -> str:
    """``text`` as an inline code span (backticks inside it allowed)."""
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _prose(line: str) -> str:
    """One line of prose: roles and double backticks as code spans; a '<' outside code
    spans, which would open an HTML tag, as an entity."""
    line = _ROLE.sub(lambda m: code(m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2)), line)
    line = _DOUBLE.sub(lambda m: code(m.group(1)), line)
    parts = _CODE_SPAN.split(line)
    # split keeps (fence, content) of each span: every third item from 1 is a fence
    out, i = [], 0
    while i < len(parts):
        out.append(re.sub(r"<(?=[A-Za-z/!?])", "&lt;", parts[i]))
        if i + 2 < len(parts):
            out.append(parts[i + 1] + parts[i + 2] + parts[i + 1])
        i += 3
    return "".join(out)


def _indented(line: str) -> bool:
    return line.startswith("    ") and bool(line.strip())


def from_docstring(text: str) -> str:
    """A docstring as markdown (see the module's docstring)."""
    lines = inspect.cleandoc(text).split("\n")
    out: list[str] = []
    literal = False  # inside an indented literal block
    literal_next = False  # the last paragraph ended with '::'
    definition_next = False  # the line before was a definition's term
    in_definition = False  # the lines since the last term are its definition
    for index, line in enumerate(lines):
        if literal:
            if not line.strip() or line.startswith("    "):
                out.append(line)
                continue
            literal = False
        if literal_next and _indented(line):
            literal, literal_next = True, False
            out.append(line)
            continue
        if line.strip():
            literal_next = False
        if definition_next:
            definition_next, in_definition = False, True
            out.append(":   " + _prose(line[4:]))
            continue
        if in_definition and not _indented(line):
            in_definition = False
            after_definition = bool(line.strip())
        else:
            after_definition = False
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if line.rstrip().endswith("::"):
            literal_next = True
            line = line.rstrip()[:-2].rstrip()
            line = line + ":" if line else ""
        elif (
            line.strip()
            and not line.startswith(" ")
            and (not out or not out[-1].strip() or after_definition)
            and _indented(following)
            and not _LIST_ITEM.match(line)
        ):
            definition_next = True  # a term: its definition is indented under it
            if after_definition:  # the next term of a list: markdown wants a blank line between
                out.append("")
        out.append(_prose(line))
    return "\n".join(out)


class SphinxProse(Extension):  # type: ignore[misc]
    """A griffe extension: every docstring griffe loads, turned into markdown."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = from_docstring(obj.docstring.value)
