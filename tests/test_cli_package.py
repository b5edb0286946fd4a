"""The ``brokerfl`` command as a package: every way to run it runs the same parser, and its
modules import in any order (operate and common never import commands)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cli_processes import ROOT


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", ["brokerfl", "brokerfl.cli"])
def test_python_dash_m_runs_the_command(module):
    done = run_python("-m", module, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: brokerfl")
    assert "status" in done.stdout and "simulate" in done.stdout


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "first", ["brokerfl.cli.common", "brokerfl.cli.operate", "brokerfl.cli.commands", "brokerfl.cli"]
)
def test_the_command_modules_import_in_any_order(first):
    done = run_python("-c", f"import {first}; import brokerfl.cli; print(brokerfl.cli.main.__module__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "brokerfl.cli.commands"  # the entry point brokerfl.cli:main


def test_status_and_admin_use_the_shared_helpers():
    import brokerfl.cli.common as common
    import brokerfl.cli.operate as operate

    assert operate.common is common
    assert common.parse_client_ids("0-2,7") == ["0", "1", "2", "7"]


def test_a_wrong_log_format_in_the_environment_is_exit_2_with_the_reason(monkeypatch, capsys):
    from brokerfl.cli import main

    monkeypatch.setenv("BROKERFL_LOG_FORMAT", "xml")
    assert main(["simulate", "--rounds", "1"]) == 2
    assert "unknown log format 'xml' (BROKERFL_LOG_FORMAT): use json or console" in capsys.readouterr().err
