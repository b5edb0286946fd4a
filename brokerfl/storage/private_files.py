"""Files and directories that hold secrets (passwords, private keys): their owner's only.

A secret file is written to a new temporary file (created 0600) in the same directory and
renamed over the old one, so it is 0600 whatever mode an earlier file of that name had, a
reader never sees it half written, and a symbolic link planted at its name is replaced, not
followed. A private directory is made 0700, and made 0700 again if it already existed.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700


def private_directory(path: str | Path) -> Path:
    """``path`` (and its missing parents) created; ``path`` itself 0700."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=DIRECTORY_MODE)
    os.chmod(path, DIRECTORY_MODE)  # an existing directory keeps its mode through mkdir
    return path


@contextmanager
def replaced_atomically(path: str | Path, mode: int = FILE_MODE) -> Iterator[BinaryIO]:
    """A binary file to write ``path``'s new content to: a temporary file (``mode``) in the
    same directory, synced and renamed over ``path`` when the block ends, removed if it
    raises. Readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        os.fchmod(fd, mode)  # mkstemp's mode, said where it matters
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_private(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` with mode 0600, replacing any earlier file (see the module docstring)."""
    with replaced_atomically(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_public(path: str | Path, data: bytes | str) -> Path:
    """Write a file that is not secret (a certificate, hashed definitions) with mode 0644,
    replaced the same way, so an earlier file's mode or a planted link does not carry over."""
    path = write_private(path, data)
    os.chmod(path, 0o644)
    return path
