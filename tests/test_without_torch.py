"""torch is an extra: a numpy-only app installs and runs without it, and what needs it says
which extra to install. Each test runs ``brokerfl`` in a fresh interpreter where torch
and opacus cannot be imported (a sitecustomize that refuses them, as if not installed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_processes import ROOT, outputs_at_the_end, start_brokerfl

BLOCKER = '''
import sys


class NotInstalled:
    """Refuses torch and opacus as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("torch", "opacus"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
'''
EXTRA = "pip install 'brokerfl[torch]'"


def brokerfl_without_torch(tmp_path: Path, *args: str) -> tuple[int, str]:
    (tmp_path / "blocker").mkdir(exist_ok=True)
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "blocker"), str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = start_brokerfl(*args, env=env)
    [output] = outputs_at_the_end([proc], timeout=240)
    return proc.returncode, output


def test_the_blocker_refuses_torch(tmp_path):
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocker")}
    done = subprocess.run(
        [sys.executable, "-c", "import torch"], check=False, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def test_help_needs_no_torch(tmp_path):
    code, output = brokerfl_without_torch(tmp_path, "--help")
    assert code == 0, output[-3000:]
    assert "simulate" in output


@pytest.mark.timeout(300)
def test_the_numpy_example_runs_without_torch(tmp_path):
    code, output = brokerfl_without_torch(
        tmp_path, "simulate", "examples/logreg_numpy/config.yaml", "--rounds", "2", "--out", str(tmp_path / "out")
    )
    assert code == 0, output[-3000:]
    assert "2 rounds in" in output
    assert (tmp_path / "out" / "final_model.npz").is_file()


def test_dp_fedavg_without_opacus_names_the_extra_when_the_config_is_loaded(tmp_path):
    config = tmp_path / "dp.yaml"
    config.write_text("app: examples.logreg_numpy.app\nclients: 2\nrounds: 1\nstrategy:\n  name: dp_fedavg\n")
    code, output = brokerfl_without_torch(tmp_path, "simulate", str(config), "--out", str(tmp_path / "out"))
    assert code != 0
    assert f"strategy 'dp_fedavg' needs opacus, which is not installed: {EXTRA}" in output
    assert "Traceback" not in output


def test_an_app_that_needs_torch_names_the_extra(tmp_path):
    code, output = brokerfl_without_torch(
        tmp_path, "simulate", "--rounds", "1", "--clients", "2", "--out", str(tmp_path / "out")
    )
    assert code != 0
    assert f"app 'mlp' needs torch, which is not installed: {EXTRA}" in output
    assert "Traceback" not in output
