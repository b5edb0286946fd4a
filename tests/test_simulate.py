"""End to end: `brokerfl simulate` trains a real model in one process."""

from __future__ import annotations

import subprocess
import sys

import pytest

from brokerfl.assembly.simulate import SimulationError, simulate
from brokerfl.cli import main
from brokerfl.config import load_config, parse_config
from brokerfl.storage.metrics_log import REQUIRED, read_metrics


def test_simulate_three_rounds_writes_metrics_and_curve(tmp_path):
    assert (
        main(
            [
                "simulate",
                "configs/digits_fedavg.yaml",
                "--rounds",
                "3",
                "--clients",
                "8",
                "--out",
                str(tmp_path),
                "--no-progress",
                "--log-level",
                "warning",
            ]
        )
        == 0
    )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["model_version"] for r in records] == [1, 2, 3]
    assert all(set(REQUIRED) <= set(r) for r in records)
    assert all(r["num_updates"] == 8 for r in records)
    assert records[-1]["accuracy"] > 0.5  # 3 rounds already learn a lot; chance is 0.1
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_same_config_and_seed_give_identical_runs():
    config = load_config("configs/digits_dirichlet.yaml", {"rounds": 3, "clients": 5})
    first, second = simulate(config), simulate(config)
    assert [r["accuracy"] for r in first.records] == [r["accuracy"] for r in second.records]
    assert [r["sha256"] for r in first.records] == [r["sha256"] for r in second.records]
    other = simulate(load_config("configs/digits_dirichlet.yaml", {"rounds": 3, "clients": 5, "seed": 1}))
    assert [r["sha256"] for r in other.records] != [r["sha256"] for r in first.records]


def test_every_model_version_records_its_updates_in_fold_order():
    config = load_config(None, {"rounds": 2, "clients": 3})
    result = simulate(config)
    store = result.server_state.store
    assert store.versions() == [0, 1, 2]
    for version in (1, 2):
        model = store.get(version)
        assert model.parent == version - 1
        assert len(model.update_ids) == 3 and len(set(model.update_ids)) == 3


def test_a_poisoned_update_is_dead_lettered_and_the_round_goes_on(monkeypatch):
    """A client whose update holds NaNs: its update is dead-lettered with the reason, the
    round closes at the deadline with the others (min_clients), the run completes."""
    import numpy as np

    import brokerfl.handlers.apps.mlp as mlp_app
    import brokerfl.handlers.workflows.client as client_handlers

    real_train = mlp_app.train_local  # the built-in app's training

    def train_badly(parameters, x, y, **kw):
        params, metrics = real_train(parameters, x, y, **kw)
        if kw.get("seed") in poisoned_seeds:  # client 1's training runs (not the start-up warm-up)
            params = {k: np.full_like(v, np.nan) for k, v in params.items()}
        return params, metrics

    config = load_config(None, {"rounds": 2, "clients": 3, "strategy.min_clients": 2, "strategy.round_deadline_s": 3.0})
    poisoned_seeds = {client_handlers.training_seed(config.seed, "1", r) for r in (1, 2)}
    monkeypatch.setattr(mlp_app, "train_local", train_badly)
    result = simulate(config)
    assert [r["num_updates"] for r in result.records] == [2, 2]


def test_too_few_answers_stops_with_a_clear_message(monkeypatch):
    from brokerfl.runtime.handler_table import HandlerSet
    from brokerfl.wire.message import TrainTask
    from tests.handler_modules import extra_handlers

    silent = extra_handlers(
        monkeypatch, client=HandlerSet("silent", overrides={TrainTask: lambda task, ctx: None})
    )  # clients that never answer
    config = load_config(
        None,
        {
            "rounds": 2,
            "clients": 2,
            "strategy.round_deadline_s": 0.2,
            "strategy.on_too_few": "stop",
            "extra_handlers": [silent],
        },
    )
    with pytest.raises(SimulationError, match="needs"):
        simulate(config)


def test_console_script_reports_config_errors_by_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: two\nstrategy:\n  nmae: fedavg\n")
    proc = subprocess.run([sys.executable, "-m", "brokerfl.cli", "simulate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "rounds" in proc.stderr and "strategy.nmae: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_client_slower_than_the_deadline_is_the_one_dropped():
    """Clients of `simulate` train one after another, but as if at once: the slow client 2's
    training outlives the round's deadline and is discarded as late; client 3, whose turn
    comes after it, still trains in time and is folded."""
    from structlog.testing import capture_logs

    from tests import slow_apps

    config = parse_config(
        {
            "app": "tests.slow_apps",
            "app_options": {"train_s": 0.1},
            "clients": 4,
            "rounds": 2,
            "client_slowdown": {"2": 12.0},
            "strategy": {"min_clients": 2, "round_deadline_s": 0.8},
        }
    )
    slow_apps.CALLS.clear()
    with capture_logs() as logs:
        result = simulate(config)
    assert [r["num_updates"] for r in result.records if r.get("num_updates") is not None] == [3, 3]
    folded = [e["client"] for e in logs if e["event"] == "update folded"]
    assert sorted(folded) == ["0", "0", "1", "1", "3", "3"]
    late = [e for e in logs if e["event"] == "training result discarded"]
    assert [e["reason"].startswith("its deadline passed") for e in late] == [True, True]
    assert not [e for e in logs if e["event"] == "task past its deadline; skipped"]
    closed = [e for e in logs if e["event"] == "round deadline: closing without every answer"]
    assert [e["missing"] for e in closed] == [["2"], ["2"]]


def test_a_swarm_simulation_writes_its_final_model_too(tmp_path):
    """No server, the same product: the last aggregator's last version is
    ``final_model.npz``, with the hash its metrics line shows."""
    from brokerfl.storage.model_file import read_model_file

    config = load_config(
        "configs/digits_swarm.yaml",
        {
            "run": "swarm-final-model",
            "rounds": 2,
            "clients": 3,
            "train": {"epochs": 1},
            "swarm": {"min_responses_required": 3},
        },
    )
    simulate(config, tmp_path, progress=False)
    _, meta = read_model_file(tmp_path / "final_model.npz")
    last = list(read_metrics(tmp_path / "metrics.jsonl"))[-1]
    assert meta["version"] == 2 and meta["sha256"] == last["sha256"]
