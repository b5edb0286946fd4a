"""brokerfl.transports.memory: the allocator settings are applied once per process, and can be refused."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = "from brokerfl.transports.memory import tune_allocator as t; print(t({default}), t())"
CLI_PROBE = """
import sys, brokerfl.cli.commands as c, brokerfl.transports.memory as m
setattr(c, "cmd_" + sys.argv[1], lambda args: 0)
assert c.main(sys.argv[1:]) == 0
print(m.allocator_mode())
"""


def _probe(default: str = "", **env: str) -> str:
    code = PROBE.format(default=repr(default) if default else "")
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "BROKERFL_MALLOC": "", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_applies_once_on_glibc():
    assert _probe(BROKERFL_MALLOC="") == "True True"


def test_tune_allocator_can_be_turned_off():
    assert _probe(BROKERFL_MALLOC="default") == "False False"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_caller_chooses_unless_brokerfl_malloc_says():
    assert _probe("default") == "False False"
    assert _probe("default", BROKERFL_MALLOC="tuned") == "True True"
    assert _probe("tuned", BROKERFL_MALLOC="default") == "False False"
    assert _probe("tuned", BROKERFL_MALLOC="lean") == "True True"


def test_a_bad_brokerfl_malloc_is_an_error_not_a_guess():
    result = subprocess.run(
        [sys.executable, "-m", "brokerfl.cli", "ping", "--broker", "amqp://127.0.0.1:1/"],
        check=False,
        env={**os.environ, "BROKERFL_MALLOC": "fast"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "BROKERFL_MALLOC='fast': expected one of tuned, lean, default" in result.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.parametrize(
    ("argv", "mode"),
    [
        (["server", "--broker", "amqp://127.0.0.1:1/"], "lean"),
        (["client", "--broker", "amqp://127.0.0.1:1/", "--client-id", "0"], "tuned"),
        (["client", "--broker", "amqp://127.0.0.1:1/", "--client-id", "0-1"], "lean"),
        (["client", "--broker", "amqp://127.0.0.1:1/", "--client-id", "3,7"], "lean"),
        (["simulate"], "tuned"),
    ],
)
def test_the_server_and_many_client_processes_run_lean_the_rest_tuned(argv, mode):
    """Decided from the command line before the command runs (here a stand-in that returns)."""
    result = subprocess.run(
        [sys.executable, "-c", CLI_PROBE, *argv],
        env={**os.environ, "BROKERFL_MALLOC": ""},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == mode


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping holding ``address`` (/proc/self/smaps)."""
    flags, inside = None, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            flags = line.split()[1:]
    assert flags is not None, "no mapping holds the address"
    return flags


THP = "/sys/kernel/mm/transparent_hugepage/enabled"


HUGE_PAGES_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_memory import _vm_flags
from brokerfl.transports.memory import HUGE_PAGES_MIN_BYTES, advise_huge_pages, tune_allocator
from brokerfl.transports.amqp.partial import _BYTES_DATA, _uninitialised_bytes

tune_allocator("lean")  # the server's: a block of 1 MiB or more is a mapping of its own
body = _uninitialised_bytes(3 * HUGE_PAGES_MIN_BYTES, huge_pages=True)  # as _read makes it
placed = _uninitialised_bytes(3 * HUGE_PAGES_MIN_BYTES)  # a body filled chunk by chunk: not asked
small = bytes(64)
print(json.dumps({
    "read_back": _vm_flags(id(body) + _BYTES_DATA + len(body) // 2),
    "placed": _vm_flags(id(placed) + _BYTES_DATA + len(placed) // 2),
    "small_advised": advise_huge_pages(id(small) + _BYTES_DATA, len(small)),
}))
"""


@pytest.mark.skipif(
    not os.path.exists(THP) or "[never]" in Path(THP).read_text(), reason="no transparent huge pages here"
)
def test_a_body_read_back_from_the_spill_file_is_backed_by_huge_pages_and_a_small_one_is_not_asked():
    # In a fresh process: in this one, earlier tests' allocations (and allocator settings)
    # can put a 12 MiB block in a heap range an earlier advice already flagged.
    result = subprocess.run(
        [sys.executable, "-c", HUGE_PAGES_PROBE, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    flags = json.loads(result.stdout)
    assert "hg" in flags["read_back"]  # madvise(MADV_HUGEPAGE) took
    assert "hg" not in flags["placed"]
    assert flags["small_advised"] is False  # not even one aligned huge page
