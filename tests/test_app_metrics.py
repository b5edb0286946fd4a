"""Every metric an app returns is kept (brokerfl.wire.app_metrics): in metrics.jsonl, the curve
and status, combined across clients as documented; a task other than classification
(examples/regression: MSE and R^2, no accuracy) runs in simulate and over RabbitMQ."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_processes import outputs_at_the_end, start_brokerfl

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import curve_description, curve_panels, read_metrics
from brokerfl.transports.local import LocalTransport
from brokerfl.wire.app_metrics import (
    MAX_METRICS,
    MetricError,
    Target,
    combine,
    numbers,
    reducers_of,
    target_of,
    wire_metrics_problem,
)
from brokerfl.wire.message import (
    DecodeError,
    EvaluateResult,
    ParameterUpdate,
    from_wire,
    to_wire,
)

ROOT = Path(__file__).resolve().parents[1]
WINE_EVALUATE = ["loss", "accuracy", "f1_macro", "roc_auc", "brier"]
WINE_TRAIN = ["train_loss", "train_lr_end", "train_max_grad"]


# ---------------------------------------------------------------- what may travel


def test_numbers_take_numbers_and_name_the_function_and_key_otherwise():
    assert numbers(
        {"a": 1, "b": True, "c": np.float32(0.5), "d": torch.tensor(0.25), "e": np.array([2.0])}, "evaluate()"
    ) == {"a": 1.0, "b": 1.0, "c": 0.5, "d": 0.25, "e": 2.0}
    with pytest.raises(
        MetricError, match=r"evaluate\(\) returned 'high' \(str\) for 'accuracy': a metric must be a number"
    ):
        numbers({"loss": 0.1, "accuracy": "high"}, "evaluate()")
    with pytest.raises(MetricError, match=r"train\(\) returned tensor\(\[0\.5000, 0\.2500\]\) \(Tensor\) for 'lr'"):
        numbers({"lr": torch.tensor([0.5, 0.25])}, "train()")
    with pytest.raises(MetricError, match=r"evaluate\(\) returned metric name 'a b' must be"):
        numbers({"a b": 1.0}, "evaluate()")
    with pytest.raises(MetricError, match=rf"more than {MAX_METRICS}"):
        numbers({f"m{i}": 1.0 for i in range(MAX_METRICS + 2)}, "evaluate()")
    with pytest.raises(MetricError, match=r"evaluate\(\) must return a dict"):
        numbers([("loss", 1.0)], "evaluate()")


def test_a_message_with_metrics_named_by_an_attacker_is_refused_on_decoding():
    assert wire_metrics_problem({"train_loss": 1.0}) is None
    for metrics, why in (
        ({"\x1b[31mred": 1.0}, "must be 1-64 characters"),
        ({"x" * 65: 1.0}, "must be 1-64 characters"),
        ({f"m{i}": 1.0 for i in range(200)}, "200 metrics"),
    ):
        update = ParameterUpdate(client_id="0", task_id="t", parameters={}, num_samples=1, metrics=metrics)
        with pytest.raises(DecodeError, match=why):
            from_wire(*to_wire(update))
        result = EvaluateResult(client_id="0", task_id="t", loss=0.0, accuracy=0.0, num_samples=1, metrics=metrics)
        with pytest.raises(DecodeError, match=why):
            from_wire(*to_wire(result))


def test_clients_metrics_combine_by_sample_weighted_mean_or_the_apps_reducer():
    entries = [({"loss": 1.0, "train_max_grad": 3.0, "only_a": 5.0}, 10), ({"loss": 0.0, "train_max_grad": 7.0}, 30)]
    assert combine(entries) == {"loss": 0.25, "train_max_grad": 6.0, "only_a": 5.0}
    module = type("app", (), {"METRIC_REDUCERS": {"max_grad": "max", "loss": lambda values, weights: sum(values)}})
    assert combine(entries, reducers_of(module, "x")) == {"loss": 1.0, "train_max_grad": 7.0, "only_a": 5.0}
    with pytest.raises(ValueError, match=r"app 'x': METRIC_REDUCERS\['a'\] is 'mode'"):
        reducers_of(type("app", (), {"METRIC_REDUCERS": {"a": "mode"}}), "x")


def test_the_target_metric_is_the_apps_or_accuracy():
    assert target_of(object(), "x") == Target("accuracy", True)
    assert target_of(type("app", (), {"TARGET_METRIC": ("mse", "min")}), "x") == Target("mse", False)
    with pytest.raises(ValueError, match=r"TARGET_METRIC must be \(metric name, 'max' or 'min'\)"):
        target_of(type("app", (), {"TARGET_METRIC": ("mse", "lower")}), "x")
    assert Target("mse", False).better(0.1, 0.2) and not Target("mse", False).better(float("nan"), 0.2)


# ---------------------------------------------------------------- the wine app's metrics


def test_the_wine_apps_metrics_reach_metrics_jsonl_the_curve_and_status(tmp_path):
    from rich.console import Console

    from brokerfl.cli.operate import metrics_lines, render
    from brokerfl.handlers.workflows.admin import status_of
    from brokerfl.runtime.operator_commands import StatusReply

    config = load_config("examples/wine/config.yaml", {"rounds": 3})
    result = simulate(config, tmp_path, journal=True)
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [line["round"] for line in lines] == [1, 2, 3]
    for line in lines:
        assert sorted(line["metrics"]) == sorted(WINE_EVALUATE + WINE_TRAIN)
        assert line["accuracy"] == line["metrics"]["accuracy"] and 0.0 <= line["metrics"]["roc_auc"] <= 1.0
    # train_max_grad takes the clients' largest (METRIC_REDUCERS), train_loss their sample-weighted mean
    updates = [
        from_wire(d.envelope, d.body)
        for d in read_journal(LocalTransport(result.broker), topology_for(config))
        if d.envelope.type == ParameterUpdate.TYPE
        and not d.routing_key.startswith("dead.")
        and d.envelope.headers["round"] == 3
    ]
    assert len(updates) == 3
    assert lines[-1]["metrics"]["train_max_grad"] == max(u.metrics["train_max_grad"] for u in updates)
    weights = [u.num_samples for u in updates]
    assert lines[-1]["metrics"]["train_loss"] == pytest.approx(
        np.average([u.metrics["train_loss"] for u in updates], weights=weights)
    )
    assert lines[-1]["metrics"]["train_lr_end"] == pytest.approx(config.train.lr / 10)
    # the curve: one panel per metric, the target first
    assert curve_description(tmp_path / "curve.png") == "panels: " + ", ".join(
        ["accuracy", "loss", "f1_macro", "roc_auc", "brier", *WINE_TRAIN]
    )
    # status: the newest version's metrics, as the status command prints them
    status = status_of(result.server_state)
    assert status["metrics_version"] == 3 and status["metrics"] == lines[-1]["metrics"]
    assert status["target"] == {"name": "accuracy", "higher_is_better": True}
    json.dumps(status)  # --json prints it
    received = from_wire(*to_wire(StatusReply(status=status))).status  # as `brokerfl status` receives it
    (line,) = metrics_lines(received)
    assert line.startswith("metrics of model version 3: accuracy ") and "(target)" in line
    assert all(f"{name} " in line for name in WINE_EVALUATE + WINE_TRAIN)
    console = Console(record=True, width=400)
    console.print(render({"server": received, "queues": {}, "journal_max_bytes": None, "journal_max_age": None}))
    assert line in console.export_text()


def test_federated_evaluation_keeps_every_metric_and_the_config_picks_the_curves_panels(tmp_path):
    config = load_config(
        "examples/wine/config.yaml",
        {"rounds": 2, "app_options.server_test": False, "metrics": ["f1_macro", "train_lr_end", "absent"]},
    )
    records = simulate(config, tmp_path).records
    federated = [r for r in records if r.get("evaluation") == "federated"]
    assert [r["round"] for r in federated] == [1, 2]
    assert all(sorted(r["metrics"]) == sorted(WINE_EVALUATE) and r["num_clients"] == 3 for r in federated)
    versions = [r for r in records if "evaluation" not in r]
    assert all(r["accuracy"] is None and sorted(r["metrics"]) == sorted(WINE_TRAIN) for r in versions)
    assert curve_description(tmp_path / "curve.png") == "panels: f1_macro, train_lr_end"
    assert curve_panels(records) == ["accuracy", "loss", "f1_macro", "roc_auc", "brier", *WINE_TRAIN]


# ---------------------------------------------------------------- regression


def test_regression_runs_in_simulate_judged_by_r2_without_accuracy(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "simulate",
            "examples/regression/config.yaml",
            "--rounds",
            "8",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert len(lines) == 8 and all(line["accuracy"] is None for line in lines)
    assert all({"mse", "r2", "mae", "loss", "train_loss"} <= set(line["metrics"]) for line in lines)
    assert lines[-1]["metrics"]["r2"] > 0.7 and lines[-1]["metrics"]["r2"] > lines[0]["metrics"]["r2"]
    assert f"final r2 {lines[-1]['metrics']['r2']:.4f}" in out.stdout
    assert curve_description(tmp_path / "curve.png").startswith("panels: r2, loss, mse, mae")


@pytest.mark.broker
def test_regression_over_rabbitmq_matches_simulate_replays_and_accounts(amqp_url, run_name, tmp_path, capsys):
    """A server and two client processes (one hosting two logical clients) over the real
    broker: R^2 in every metrics line, the versions bit for bit simulate's, replay --check
    and accounting pass (their what-if compares R^2)."""
    import yaml

    from brokerfl.cli import main
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    config = yaml.safe_load((ROOT / "examples" / "regression" / "config.yaml").read_text())
    config.update(run=run_name, clients=3, rounds=4, strategy={"name": "fedavg", "min_clients": 3})
    path = tmp_path / "regression.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    common = [str(path), "--broker", amqp_url, "--log-level", "warning"]
    try:
        procs = [
            start_brokerfl("server", *common, "--out", str(out)),
            start_brokerfl("client", *common, "--client-id", "0"),
            start_brokerfl("client", *common, "--client-id", "1-2"),
        ]
        outputs = outputs_at_the_end(procs, timeout=300)
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        over_amqp = read_metrics(out / "metrics.jsonl")
        assert [r["num_updates"] for r in over_amqp] == [3, 3, 3, 3]
        assert all(r["accuracy"] is None and "r2" in r["metrics"] and "train_loss" in r["metrics"] for r in over_amqp)
        assert curve_description(out / "curve.png").startswith("panels: r2, loss")

        torch.set_num_threads(1)  # as the processes do
        local = simulate(load_config(path)).records
        assert [r["sha256"] for r in over_amqp] == [r["sha256"] for r in local]
        assert [r["metrics"]["r2"] for r in over_amqp] == [r["metrics"]["r2"] for r in local]

        assert main(["replay", *common, "--check"]) == 0
        capsys.readouterr()
        assert main(["replay", *common, "--strategy", "median"]) == 0  # a what-if, scored by R^2
        table = capsys.readouterr().out
        assert "median r2" in table.splitlines()[0] and "nan" not in table
        assert main(["accounting", *common, "--out", str(out)]) == 0
    finally:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name).delete(admin, ["0", "1", "2"])


@pytest.mark.parametrize("config_file", ["configs/digits_fedbuff.yaml", "configs/digits_cyclic.yaml"])
def test_asynchronous_and_cyclic_runs_keep_the_training_metrics_too(config_file, tmp_path):
    """Every workflow that stores versions keeps what train() returned, not only the
    synchronous server."""
    from brokerfl.assembly.simulate import simulate
    from brokerfl.config import load_config
    from brokerfl.storage.metrics_log import read_metrics

    config = load_config(
        config_file,
        {
            "run": "train-metrics-" + Path(config_file).stem.replace("_", "-"),
            "rounds": 3,
            "clients": 3,
            "train": {"epochs": 1},
        },
    )
    simulate(config, tmp_path, progress=False)
    lines = [line for line in read_metrics(tmp_path / "metrics.jsonl") if line.get("model_version", 0) >= 1]
    assert lines and all("train_loss" in line["metrics"] and line["metrics"]["train_loss"] > 0 for line in lines)
