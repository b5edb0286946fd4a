"""The shell scripts the tutorials include (docs/tutorials/code/*.sh), run by the tests.

A script is cut into named sections (``# --8<-- [start:NAME]`` ... ``# --8<-- [end:NAME]``,
the markers pymdownx.snippets includes a section by); a test runs the whole script or single
sections with bash (``-euo pipefail``), in a directory and an environment of its own, with
``brokerfl`` on PATH running this repository's code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "docs" / "tutorials" / "code"
_MARKER = re.compile(r"^\s*# --8<-- \[(start|end):([\w-]+)\]\s*$")


def section(script: Path, name: str) -> str:
    """The lines of one named section (without its markers)."""
    lines, inside, found = [], False, False
    for line in script.read_text().splitlines():
        marker = _MARKER.match(line)
        if marker and marker.group(2) == name:
            inside, found = marker.group(1) == "start", True
        elif inside:
            lines.append(line)
    if not found:
        raise KeyError(f"{script}: no section {name!r}")
    return "\n".join(lines) + "\n"


def without(script: Path, *names: str) -> str:
    """The whole script less the named sections."""
    for name in names:
        section(script, name)  # each must exist
    lines, skipping = [], None
    for line in script.read_text().splitlines():
        marker = _MARKER.match(line)
        if marker and marker.group(2) in names:
            skipping = marker.group(2) if marker.group(1) == "start" else None
        elif skipping is None:
            lines.append(line)
    return "\n".join(lines) + "\n"


def brokerfl_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """os.environ with ``brokerfl`` and ``python`` on PATH: in ``bin_dir``, a script like the
    installed console script (this interpreter, this repository's code; the working
    directory is not on sys.path) and this interpreter, plus ``extra``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    command = bin_dir / "brokerfl"
    command.write_text(f"#!{sys.executable}\nimport sys\n\nfrom brokerfl.cli import main\n\nsys.exit(main())\n")
    command.chmod(0o755)
    python = bin_dir / "python"  # a script, not a link: a link would lose the interpreter's venv
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    python_path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": python_path,
        **extra,
    }


def run_bash(
    text: str, *, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """``text`` run by ``bash -euo pipefail``: stdout and stderr apart, never raising on the
    exit code (the test asserts on it, with the output)."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", text],
        cwd=cwd,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
