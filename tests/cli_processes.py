"""Running ``brokerfl`` commands as processes of a test (a server and its clients over
RabbitMQ): start them, wait for every one to end, and never leave one running."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_brokerfl(*args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """``python -m brokerfl.cli ARGS`` in the repository, stdout and stderr as one text."""
    return subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", *args],
        cwd=ROOT,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def outputs_at_the_end(procs: Sequence[subprocess.Popen], timeout: float) -> list[str]:
    """Each process's output once it has ended (``timeout`` s each); whatever is still
    running after that, or after a failure, is killed."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        kill_the_rest(procs)


def kill_the_rest(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.communicate()
