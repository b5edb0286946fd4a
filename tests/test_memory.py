"""brokerfl.memory: the allocator settings are applied once per process, and can be refused."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = "from brokerfl.memory import tune_allocator as t; print(t(), t())"


def _probe(**env: str) -> str:
    result = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_applies_once_on_glibc():
    assert _probe(BROKERFL_MALLOC="") == "True True"


def test_tune_allocator_can_be_turned_off():
    assert _probe(BROKERFL_MALLOC="default") == "False False"
