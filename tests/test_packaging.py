"""The package as a user installs it: a wheel built from this checkout, in fresh venvs.

- it claims no generic top-level names (``handlers``, ``examples``);
- a numpy-only app installs and runs without torch;
- the ``torch`` extra installed where torch 2.13.0 already is changes no torch, and the built-in
  default run works.

Slow (a venv, a few minutes): it installs from the machine's package index and caches.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the version the constraints file pins

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


# the installed wheel alone: no checkout on the path, as a developer's shell may have put it
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def run(*args: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=CLEAN_ENV, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", out, ROOT, cwd=out)
    (built,) = out.glob("brokerfl-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel and its dependencies, no torch (one venv for both tests:
    installing the dependencies is most of their time)."""
    root = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    run(
        root / "venv" / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "-c",
        ROOT / "constraints.txt",
        wheel,
        cwd=root,
    )
    return root / "venv"


def test_wheel_claims_no_generic_names_and_runs_a_numpy_app_without_torch(installed: Path, tmp_path: Path) -> None:
    python = installed / "bin" / "python"
    work = tmp_path / "work"
    work.mkdir()
    for name in ("handlers", "examples", "torch"):
        probe = subprocess.run(
            [str(python), "-c", f"import {name}"], cwd=work, env=CLEAN_ENV, capture_output=True, text=True, timeout=120
        )
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, (
            f"import {name} worked in the installed wheel"
        )
    run(python, "-c", "import brokerfl.handlers.workflows.server, brokerfl.app", cwd=work)
    # a user's numpy-only app, next to its config, as `brokerfl new` lays one out
    shutil.copytree(
        ROOT / "examples" / "logreg_numpy",
        work / "examples" / "logreg_numpy",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (work / "examples" / "__init__.py").write_text("")
    done = run(
        installed / "bin" / "brokerfl",
        "simulate",
        "examples/logreg_numpy/config.yaml",
        "--rounds",
        "2",
        cwd=work,
    )
    assert (work / "runs" / "logreg-hospitals" / "metrics.jsonl").read_text().count("\n") >= 2, done.stdout


def test_wheel_beside_an_installed_torch_keeps_it_and_runs_the_default(
    wheel: Path, installed: Path, tmp_path: Path
) -> None:
    python = installed / "bin" / "python"
    run(python, "-m", "pip", "install", "--quiet", TORCH, cwd=tmp_path)
    torch_version = [python, "-c", "import torch; print(torch.__version__, torch.__file__)"]
    before = run(*torch_version, cwd=tmp_path).stdout
    run(python, "-m", "pip", "install", "--quiet", f"{wheel}[torch]", cwd=tmp_path)
    after = run(*torch_version, cwd=tmp_path).stdout
    assert before == after, f"installing brokerfl changed torch:\n{before}\n->\n{after}"
    work = tmp_path / "work"
    work.mkdir()
    run(installed / "bin" / "brokerfl", "simulate", "--rounds", "2", cwd=work)
    assert list((work / "runs").glob("*/final_model.npz")), "the default run wrote no final_model.npz"
