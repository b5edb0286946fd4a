"""Allocator settings that keep large bodies from page-faulting every round.

glibc's malloc serves a request above ``M_MMAP_THRESHOLD`` (128 KiB, growing up to 32 MiB
as big blocks are freed) with a fresh ``mmap`` and gives it back with ``munmap`` when freed.
A federation allocates the same large buffers every round (an encoded body, a reassembled
message, a fold): each one then costs a page fault per 4 KiB page, and copying into fresh
memory runs at a quarter of the speed of copying into memory already mapped (see
``benchmarks/codec.py``). :func:`tune_allocator` tells malloc to serve large blocks from
its heap and to keep freed memory mapped, so a round reuses the pages of the round before.

The cost: the process keeps its peak heap mapped (it does not hand freed memory back to
the system). For a worker that allocates the same sizes every round that is the point; set
``BROKERFL_MALLOC=default`` to keep glibc's defaults. Not glibc (musl, macOS): nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt(3) parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

TRIM_THRESHOLD = 2**31 - 1  # never give the top of the heap back (mallopt takes an int)
TOP_PAD = 64 * 1024**2  # grow the heap 64 MiB at a time: fewer brk calls for large bodies

_applied: bool | None = None


def tune_allocator() -> bool:
    """Serve large blocks from the heap and keep freed memory mapped. Call it once, early
    (the CLI does); later calls return the first call's answer. True when the settings
    were applied; False on a libc without ``mallopt``, or with ``BROKERFL_MALLOC=default``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("BROKERFL_MALLOC", "").strip().lower() == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # M_MMAP_MAX 0: no block is ever mmap'd, so none is munmap'd when freed. Setting any of
    # these also turns off glibc's sliding mmap threshold.
    ok = mallopt(M_MMAP_MAX, 0) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    ok &= mallopt(M_TOP_PAD, TOP_PAD) == 1
    _applied = bool(ok)
    return _applied
