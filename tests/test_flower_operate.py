"""The operator's commands on a Flower run over RabbitMQ: status, pause and resume, the
commands that do not apply (refused with the reason), then the run's journal exported,
accounted for, replayed and inspected from the file."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from brokerfl.assembly.roles import topology_for  # noqa: E402
from brokerfl.config import load_config  # noqa: E402
from tests.cli_processes import kill_the_rest, outputs_at_the_end, start_brokerfl  # noqa: E402

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "flower_apps" / "tiny"


def brokerfl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "brokerfl.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_status_admin_and_the_journal_of_a_flower_run(amqp_url, run_name, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"run: {run_name}\nclients: 2\nflower_app: {APP}\nclient_state_dir: {tmp_path / 'nodes'}\n"
        "flower_config: {num-server-rounds: 6, slow-s: 0.3}\n"
    )
    broker = ["--broker", amqp_url]
    procs = [start_brokerfl("server", str(config), *broker, "--out", str(tmp_path / "out"))]
    procs += [start_brokerfl("client", str(config), *broker, "--client-id", str(i)) for i in range(2)]
    try:
        deadline = time.monotonic() + 60
        while True:  # the server answers once its ServerApp has begun
            status = brokerfl("status", str(config), *broker, "--json", "--timeout", "2")
            view = json.loads(status.stdout) if status.returncode == 0 else {}
            if (view.get("server") or {}).get("begun"):
                break
            assert time.monotonic() < deadline, status.stdout + status.stderr
        server = view["server"]
        assert server["strategy"] == "flower app tiny" and server["flower"]["app"] == "tiny"
        assert [c["id"] for c in server["clients"]] == ["0", "1"]
        assert server["rounds"] == 6 and not server["done"]

        paused = brokerfl("admin", "pause", "--config", str(config), *broker)
        assert paused.returncode == 0 and "paused" in paused.stdout, paused.stdout + paused.stderr
        assert json.loads(brokerfl("status", str(config), *broker, "--json").stdout)["server"]["paused"]
        refused = brokerfl("admin", "set-rounds", "3", "--config", str(config), *broker)
        assert refused.returncode == 1 and "does not apply to a Flower app" in refused.stdout + refused.stderr
        resumed = brokerfl("admin", "resume", "--config", str(config), *broker)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        outputs = outputs_at_the_end(procs, timeout=120)
    finally:
        kill_the_rest(procs)
    assert all(p.returncode == 0 for p in procs), outputs
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["flower"]) for r in lines] == [
        (r, kind) for r in range(1, 7) for kind in ("train", "evaluate")
    ]

    journal = tmp_path / "run.journal"
    exported = brokerfl("journal", "export", str(config), str(journal), *broker)
    assert exported.returncode == 0, exported.stderr
    accounting = brokerfl("accounting", "--journal", str(journal))
    assert accounting.returncode == 0 and "used by the ServerApp exactly once: 24" in accounting.stdout, (
        accounting.stdout
    )
    replayed = brokerfl("replay", str(config), "--journal", str(journal), "--check")
    assert replayed.returncode == 0 and replayed.stdout.count(" ok") == 6, replayed.stdout + replayed.stderr
    what_if = brokerfl("replay", str(config), "--journal", str(journal), "--strategy", "median")
    assert what_if.returncode == 2 and "ServerApp's own code" in what_if.stderr
    first_reply = next(
        line
        for line in brokerfl("inspect", str(config), "--journal", str(journal)).stdout.splitlines()
        if "flower_reply" in line
    )
    assert first_reply


@pytest.fixture(autouse=True)
def _delete_the_run(amqp_url, run_name, tmp_path):
    yield
    from brokerfl.transports.amqp import AmqpTransport

    config = tmp_path / "run.yaml"
    if config.exists():
        with AmqpTransport(amqp_url) as admin:
            topology_for(load_config(config)).delete(admin, ["0", "1"])
