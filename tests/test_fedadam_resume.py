"""A server running FedAdam killed -9 mid-run resumes its optimizer state (m, v, steps stored
with every model version) and the run's journal replays hash for hash (RabbitMQ)."""

from __future__ import annotations

import time

import pytest
from test_faults import ROOT, Federation

from brokerfl.storage.metrics_log import read_metrics
from brokerfl.storage.store import DirectoryModelStore

pytestmark = pytest.mark.broker


def test_kill_9_of_a_fedadam_server_resumes_its_optimizer_state(amqp_url, run_name, tmp_path):
    config = tmp_path / "fedadam.yaml"
    config.write_text(
        (ROOT / "configs/digits_fedavg.yaml")
        .read_text()
        .replace("name: fedavg", "name: fedadam\n  options: {eta: 0.01}")
    )
    fed = Federation(amqp_url, run_name, tmp_path / "out", config=config, clients=3, rounds=6)
    try:
        fed.start()
        fed.wait_for_versions(3, timeout=180)
        time.sleep(0.2)  # inside round 4
        fed.kill(fed.server)
        fed.start_server()
        fed.finish()
        records = read_metrics(fed.out / "metrics.jsonl")
        assert [r["model_version"] for r in records] == list(range(1, 7))
        store = DirectoryModelStore(fed.out / "models")
        state = store.get(6).strategy_state
        assert int(state["steps"]) == 6 and {k.split("/")[0] for k in state} == {"m", "v", "steps"}
        replayed = fed.replay()  # the resumed m and v are the ones replay recomputes
        print(replayed.table())
        assert replayed.ok and len(replayed.rows) == 7, replayed.table()
        assert [row.replayed_hash for row in replayed.rows[1:]] == [r["sha256"] for r in records]
    finally:
        fed.cleanup()
