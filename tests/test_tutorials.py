"""The tutorials' code runs as the pages show it: every command block of
docs/tutorials/*.md is included from docs/tutorials/code/, and these tests run those files
and assert on what the pages show of their output.

(The containers tutorial's commands are run by tests/test_containers.py, which builds the
image and runs compose anyway.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from tutorial_scripts import CODE, ROOT, brokerfl_env, run_bash, section, without

from brokerfl.storage.metrics_log import read_metrics
from brokerfl.transports.amqp import AmqpTransport
from brokerfl.transports.base import TransportError
from brokerfl.transports.topology import RunTopology

SUMMARY = re.compile(r"^(?P<run>[\w-]+): (?P<rounds>\d+) rounds in [\d.]+ s; final accuracy (?P<accuracy>[\d.]+)", re.M)
ACCOUNTED = "OK: every update is accounted for exactly once"


def _workdir(tmp_path: Path, *files: str) -> Path:
    """A directory like the reader's: the repository's configs beside the tutorial's files."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    for name in files:
        shutil.copy(CODE / name, work / name)
    return work


def _done(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_first_federation(tmp_path):
    work = _workdir(tmp_path, "my_run.yaml", "load_model.py")
    out = _done(run_bash((CODE / "first_federation.sh").read_text(), cwd=work, env=brokerfl_env(tmp_path / "bin")))

    runs = [(m["run"], int(m["rounds"])) for m in SUMMARY.finditer(out)]
    assert runs == [("default", 20), ("default", 5), ("my-run", 10)], out  # --out runs/small keeps the run's name
    final = next(SUMMARY.finditer(out))["accuracy"]
    assert float(final) > 0.95
    assert "curve.png\nfinal_model.npz\nmetrics.jsonl\n" in out
    first = read_metrics(work / "runs" / "default" / "metrics.jsonl")[0]
    assert {"round", "model_version", "accuracy", "loss", "num_updates", "sha256"} <= set(first)
    assert (first["round"], first["num_updates"]) == (1, 10)
    assert [r["num_updates"] for r in read_metrics(work / "runs" / "small" / "metrics.jsonl")] == [4] * 5
    assert [r["num_updates"] for r in read_metrics(work / "runs" / "my-run" / "metrics.jsonl")] == [5] * 10
    # the model loaded back scores exactly what the run reported
    assert "0.weight (128, 64)" in out and "4.weight (10, 64)" in out
    assert f"test accuracy {final}\n" in out


def test_own_app(tmp_path):
    work = _workdir(tmp_path, "tiny_app.yaml")
    shutil.copy(ROOT / "examples" / "quickstart" / "app.py", work / "tiny_app.py")  # the README's app too
    out = _done(run_bash((CODE / "own_app.sh").read_text(), cwd=work, env=brokerfl_env(tmp_path / "bin")))

    assert "my_app/brokerfl.yaml\nmy_app/my_app/__init__.py\nmy_app/my_app/app.py\n" in out
    runs = {m["run"]: (int(m["rounds"]), float(m["accuracy"])) for m in SUMMARY.finditer(out)}
    assert set(runs) == {"my_app", "tiny"}, out
    assert runs["my_app"][0] == 10 and runs["my_app"][1] > 0.85
    assert runs["tiny"][0] == 10 and runs["tiny"][1] > 0.8
    # the tiny app's server has no test data: its metrics come from the clients (federated evaluation)
    lines = read_metrics(work / "runs" / "tiny" / "metrics.jsonl")
    assert any(line.get("evaluation") == "federated" for line in lines)


@pytest.fixture
def delete_run(amqp_url):
    """delete_run(run, client_ids): what the run left on the broker is deleted after the test."""
    runs: list[tuple[str, list[str]]] = []
    yield lambda run, client_ids: runs.append((run, client_ids))
    with AmqpTransport(amqp_url) as admin:
        for run, client_ids in runs:
            RunTopology(run).delete(admin, client_ids)


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_over_rabbitmq(tmp_path, amqp_url, delete_run):
    run = "tut" + uuid.uuid4().hex[:8]
    delete_run(run, [str(i) for i in range(10)])
    work = _workdir(tmp_path)
    env = brokerfl_env(tmp_path / "bin", BROKERFL_AMQP_URL=amqp_url, BROKERFL_RUN=run)
    script = CODE / "over_rabbitmq.sh"
    assert "BROKERFL_RUN=tutorial" in section(script, "settings")
    out = _done(run_bash(without(script, "settings"), cwd=work, env=env, timeout=240))

    assert re.search(r"broker at amqp://\S+ answers", out)
    # the status taken after the kill: mid-run, and client 9's queue has no consumer
    assert re.search(rf"run {run} \(fedavg\): [\w ]+; round \d+ of 20", out), out
    assert re.search(r"│ client 9\s+│\s+\d+ │\s+\S+ │\s+0 │", out), out
    assert f"{run}: done at model version 20;" in out
    assert "updates sent: 200 over 21 model versions" in out
    assert "unaccounted for: 0" in out and ACCOUNTED in out
    records = read_metrics(work / "runs" / run / "metrics.jsonl")
    assert [r["round"] for r in records] == list(range(1, 21))
    assert all(r["num_updates"] == 10 for r in records)
    # the same model as in one process, bit for bit
    hashes = re.findall(r'^"sha256": "([0-9a-f]{64})"$', out, re.M)
    assert hashes == [records[-1]["sha256"]] * 2, out[-500:]
    assert f"deleted run {run}: its exchange, queues, model versions and journal" in out
    with AmqpTransport(amqp_url) as admin:
        with pytest.raises(TransportError):
            admin.queue_info(RunTopology(run).server_queue)


def _rabbitmqctl_on_path(bin_dir: Path) -> None:
    """rabbitmqctl for the test broker's node (BROKERFL_RABBITMQ_NODE, as conftest's)."""
    node = os.environ.get("BROKERFL_RABBITMQ_NODE")
    real = shutil.which("rabbitmqctl")
    if node and real:
        command = bin_dir / "rabbitmqctl"
        command.write_text(f'#!/bin/sh\nexec {real} -n {node} "$@"\n')
        command.chmod(0o755)


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_across_organisations(tmp_path, broker, amqp_url):
    why_not = broker.can_restart()  # the same condition: a local rabbitmqctl for this broker
    if why_not:
        pytest.skip(f"needs rabbitmqctl for the test broker: {why_not}")
    run = "tut" + uuid.uuid4().hex[:8]
    work = _workdir(tmp_path, "hospitals.yaml")
    env = brokerfl_env(tmp_path / "bin", run=run, port=str(urlsplit(amqp_url).port or 5672))
    _rabbitmqctl_on_path(tmp_path / "bin")
    script = CODE / "across_organisations.sh"
    try:
        result = run_bash(without(script, "settings"), cwd=work, env=env, timeout=240)
        out = _done(result)
    finally:  # the script deletes its vhost and users; again here if it failed before that
        users = ", ".join(f'<<"{run}-{user}">>' for user in ("server", "admin", "client-0", "client-1", "client-2"))
        broker.rabbitmqctl(
            "eval",
            f'catch rabbit_vhost:delete(<<"{run}">>, <<"brokerfl-tests">>), '
            f'[catch rabbit_auth_backend_internal:delete_user(U, <<"brokerfl-tests">>) || U <- [{users}]], ok.',
        )

    assert f"{run}-client-0.env\n{run}-client-1.env\n{run}-client-2.env\n{run}-server.env\n" in out
    assert f"{run}: done at model version 5;" in out
    for client in range(3):
        assert f"published by {run}-client-{client}: 5 updates, 5 folded" in out
    assert ACCOUNTED in out
    # client 0's credentials cannot take client 1's tasks
    refused = f"access to queue 'brokerfl.{run}.client.1' in vhost '{run}' refused for user '{run}-client-0'"
    assert refused in result.stderr
    assert "exit 3" in out
    assert f"{run}-client-2.csr\n{run}-client-2.key\n" in out
    assert f"signed from their own requests: {run}-client-2" in out
    tls = sorted(os.listdir(work / "fed-tls" / "tls"))
    assert f"{run}-client-2.pem" in tls and f"{run}-client-2.key" not in tls  # the site's key stayed at the site
    assert "ca.key" not in tls and (work / "ca" / "ca.key").exists()
    assert "auth_mechanisms.1 = EXTERNAL" in (work / "fed-tls" / "rabbitmq.conf").read_text()
