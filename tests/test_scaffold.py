"""brokerfl new: the scaffolded app package runs at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from brokerfl.ops.scaffold import ScaffoldError, check_app_name, create_app

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_new_app_runs_its_own_test_and_simulate(tmp_path: Path) -> None:
    made = subprocess.run(
        [sys.executable, "-m", "brokerfl.cli", "new", "demo_app", "--dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    app_dir = tmp_path / "demo_app"
    assert {p.name for p in app_dir.iterdir()} >= {"pyproject.toml", "brokerfl.yaml", "demo_app", "tests", "README.md"}
    # the scaffold's own test, with the package importable as pip install -e would make it
    env = {**os.environ, "PYTHONPATH": f"{app_dir}:{ROOT}"}
    tested = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert tested.returncode == 0, tested.stdout[-2000:] + tested.stderr[-2000:]
    # and `brokerfl simulate` in the app's folder picks up its brokerfl.yaml
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "simulate",
            "--rounds",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=app_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "brokerfl.yaml" in ran.stdout + ran.stderr
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 2


@pytest.mark.parametrize("bad", ["Demo", "1demo", "de-mo", "class", "brokerfl", "", "x" * 65])
def test_bad_app_names_are_refused(bad: str) -> None:
    with pytest.raises(ScaffoldError, match="app name"):
        check_app_name(bad)


def test_new_refuses_to_overwrite(tmp_path: Path) -> None:
    create_app("demo_app", tmp_path)
    with pytest.raises(ScaffoldError, match="already exists"):
        create_app("demo_app", tmp_path)


@pytest.mark.broker
def test_the_app_runs_as_compose_services(amqp_url, run_name, tmp_path: Path) -> None:
    """The way the compose services are tested here (no container engine): each worker
    service of docker/compose.yaml, as a local process with its environment, running a
    scaffolded app as the app's Dockerfile sets it up (its package importable, its config)."""
    import yaml
    from test_federation_amqp import brokerfl, compose_defaults, finish

    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    app_dir = create_app("compose_app", tmp_path)
    assert "FROM ${BROKERFL_IMAGE}" in (app_dir / "Dockerfile").read_text()
    compose = compose_defaults(yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text()))
    workers = {
        name: spec for name, spec in compose["services"].items() if name != "rabbitmq" and "profiles" not in spec
    }
    procs, client_ids = [], []
    for name, spec in sorted(workers.items()):
        env = {
            **spec["environment"],
            "BROKERFL_AMQP_URL": amqp_url,
            "BROKERFL_RUN": run_name,
            "BROKERFL_ROUNDS": "2",
            "BROKERFL_CONFIG": str(app_dir / "brokerfl.yaml"),
            "PYTHONPATH": f"{app_dir}:{ROOT}",
        }
        env.pop("BROKERFL_METRICS_PORT", None)
        if name == "server":
            env["BROKERFL_OUT"] = str(tmp_path / "out")
        else:
            client_ids.append(env["BROKERFL_CLIENT_ID"])
        procs.append(brokerfl(*spec["command"][1:], "--log-level", "warning", env=env))
    try:
        outputs = finish(procs)
    finally:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name).delete(admin, client_ids)
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"num_updates": 4' in lines[-1]
