"""Allocator settings: large bodies that do not page-fault every round, or a peak RSS that
is what the process holds.

glibc's malloc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB, growing up to 32 MiB
as big blocks are freed) with a fresh ``mmap`` and gives it back with ``munmap`` when freed.
A federation allocates the same large buffers every round (an encoded body, a reassembled
message, a fold): each one then costs a page fault per 4 KiB page, and copying into fresh
memory runs at a quarter of the speed of copying into memory already mapped (see
``docs/benchmarks/codec.md``). Three settings (``BROKERFL_MALLOC``):

- ``tuned``: large blocks come from the heap and freed memory stays mapped, so a round
  reuses the pages of the round before. The process keeps its peak heap, and freed blocks
  of mixed sizes leave holes, so its peak RSS is the heap's high-water mark rather than
  what is live. The CLI's choice for clients (and ``simulate``), which train on the
  critical path of every round: their rounds are slower with either other setting
  (``docs/benchmarks/round-time.md``).
- ``lean``: every block of 1 MiB or more is mmap'd and unmapped when freed (a fixed
  threshold: glibc's sliding one keeps blocks up to 32 MiB, and 64 MiB of free heap top,
  mapped after a large free). Peak RSS is what is live; each large buffer faults (a body
  read back from a spill file asks for huge pages: :func:`advise_huge_pages`). The CLI's
  choice for the ``server``, whose memory is what grows with a federation: its peak stays
  flat at about 4x the model above its baseline from 4 to 96 clients
  (``docs/benchmarks/server-memory.md``), for ~8% of a 10M round
  (``docs/benchmarks/round-time.md``).
- ``default``: glibc's own settings.

``BROKERFL_MALLOC`` overrides the CLI's choice for every command. Not glibc (musl, macOS):
nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

TRIM_THRESHOLD = 2**31 - 1  # never give the top of the heap back (mallopt takes an int)
TOP_PAD = 64 * 1024**2  # grow the heap 64 MiB at a time: fewer brk calls for large bodies
LEAN_MMAP_THRESHOLD = 1024**2  # lean: a block of 1 MiB or more is its own mapping

SETTINGS = ("tuned", "lean", "default")

MADV_HUGEPAGE = 14  # madvise(2) advice number (Linux)
HUGE_PAGE = 2 * 1024**2  # a transparent huge page on x86-64 and most arm64 kernels
HUGE_PAGES_MIN_BYTES = 4 * 1024**2  # below this a buffer holds at most one aligned huge page

_mode: str | None = None  # the setting in force once chosen: one of SETTINGS


def tune_allocator(choice: str = "tuned") -> bool:
    """Apply ``BROKERFL_MALLOC`` or, where it is unset, ``choice`` (one of
    :data:`SETTINGS`). Call it once, early, before any large buffer (the CLI does); later
    calls change nothing and return the first call's answer. True when brokerfl's settings
    (``tuned`` or ``lean``) were applied; False for ``default``, or on a libc without
    ``mallopt``. A bad value raises ValueError."""
    global _mode
    if _mode is not None:
        return _mode != "default"
    setting = allocator_setting(choice)  # a bad value raises before anything is decided
    _mode = "default"
    if setting == "default":
        return False
    mallopt = getattr(libc(), "mallopt", None)
    if mallopt is None:  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if setting == "tuned":
        # M_MMAP_MAX 0: no block is ever mmap'd, so none is munmap'd when freed. Setting any
        # of these also turns off glibc's sliding mmap threshold.
        ok = mallopt(M_MMAP_MAX, 0) == 1
        ok &= mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        ok &= mallopt(M_TOP_PAD, TOP_PAD) == 1
    else:  # lean: a fixed threshold (setting it turns the sliding one off)
        ok = mallopt(M_MMAP_THRESHOLD, LEAN_MMAP_THRESHOLD) == 1
    if ok:
        _mode = setting
    return bool(ok)


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library, loaded once (errno kept for ``ctypes.get_errno``); None where it
    cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def _madvise() -> Any:
    """libc's madvise, None where there is none (or not Linux: MADV_HUGEPAGE's number is
    Linux's)."""
    madvise = getattr(libc(), "madvise", None) if sys.platform.startswith("linux") else None
    if madvise is not None:
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    return madvise


def advise_huge_pages(address: int, size: int) -> bool:
    """Ask the kernel to back the 2 MiB-aligned part of a fresh, not yet written buffer
    with transparent huge pages (``madvise(MADV_HUGEPAGE)``; honoured where THP is in
    ``madvise`` or ``always`` mode, as on most distributions). A reassembled body is such a
    buffer, and under ``lean`` it is a fresh mapping every time: writing a 40 MB body into
    it then takes ~20 faults instead of ~10,000 (``docs/benchmarks/reassembly.md``), and
    RSS is the same (every page of it is written anyway). Best effort: False where it is not
    supported, and nothing changes."""
    madvise = _madvise()
    if madvise is None or size < HUGE_PAGES_MIN_BYTES:
        return False
    start = (address + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (address + size) & ~(HUGE_PAGE - 1)
    return end > start and madvise(start, end - start, MADV_HUGEPAGE) == 0


def allocator_mode() -> str | None:
    """The setting in force (one of :data:`SETTINGS`), None before :func:`tune_allocator`."""
    return _mode


def allocator_setting(choice: str = "tuned") -> str:
    """``BROKERFL_MALLOC`` if set, else ``choice``; a value not in :data:`SETTINGS` is an
    error, not a silent guess."""
    if choice not in SETTINGS:
        raise ValueError(f"allocator setting {choice!r}: expected one of {', '.join(SETTINGS)}")
    value = os.environ.get("BROKERFL_MALLOC", "").strip().lower()
    if not value:
        return choice
    if value not in SETTINGS:
        raise ValueError(f"BROKERFL_MALLOC={value!r}: expected one of {', '.join(SETTINGS)} (or unset)")
    return value
