"""The app's side of a run: logical clients isolated from each other's side effects on the
model, the context ``train`` gets (round, client id, per-round config, state), and the
trained model as a product (export and load back)."""

from __future__ import annotations

import json

import pytest
from cli_processes import outputs_at_the_end, start_brokerfl
from structlog.testing import capture_logs

from brokerfl.assembly.simulate import simulate
from brokerfl.config import parse_config
from tests import model_apps


def _config(**overrides):
    data = {
        "app": "tests.model_apps",
        "app_options": {"dtype": "float32"},
        "clients": 3,
        "rounds": 2,
        "strategy": {"min_clients": 2, "round_deadline_s": 4.0},
        "train": {"epochs": 1, "batch_size": 16, "momentum": 0.0},
    }
    data.update(overrides)
    return parse_config(data)


def test_a_client_that_changes_the_model_does_not_change_its_neighbours():
    """Client 1's train calls model.double() on the module every logical client of the
    process shares: its own update is refused (float64 for a float32 model), the others
    get the module as model() made it and are folded, round after round."""
    model_apps.CALLS.clear()
    config = _config(app_options={"dtype": "float32", "double_partitions": [1]})
    with capture_logs() as logs, pytest.warns(UserWarning, match="changed the model .*float32.*float64.*fresh model"):
        result = simulate(config)
    assert [r["num_updates"] for r in result.records if r.get("num_updates") is not None] == [2, 2]
    assert sorted(e["client"] for e in logs if e["event"] == "update folded") == ["0", "0", "2", "2"]
    refused = [e["reason"] for e in logs if e["event"] == "dead-lettered"]
    assert len(refused) == 2 and all("client 1" in r and "float64" in r for r in refused)


def test_the_isolation_check_reads_no_tensor_data():
    """What the runtime compares before each task: layout, dtypes, attributes; not values."""
    import torch

    from brokerfl.app.torch_adapter import structure

    net = model_apps.model({"dtype": "float32"})
    before = structure(net)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net.eval()
    assert structure(net) == before  # new values and the mode: each task sets its own
    net[0].weight.requires_grad_(False)
    assert structure(net) != before
    other = model_apps.model({"dtype": "float32"})
    other.extra = 3
    assert structure(other) != before


def test_a_learning_rate_schedule_by_round_changes_the_run_from_its_round():
    """train_schedule lr {1: 0.1, 3: 0.001}: rounds 1-2 train as without it (same hashes),
    round 3 with lr 0.001 (different hash); train() sees the lr in settings and in
    context.config, with its round and client id."""
    model_apps.CALLS.clear()
    base = _config(rounds=3, train={"epochs": 1, "lr": 0.1, "momentum": 0.0})
    plain = simulate(base).records
    model_apps.CALLS.clear()
    scheduled = simulate(
        _config(rounds=3, train={"epochs": 1, "lr": 0.1, "momentum": 0.0}, train_schedule={"lr": {1: 0.1, 3: 0.001}})
    ).records
    assert hashes(plain)[:2] == hashes(scheduled)[:2] and hashes(plain)[2] != hashes(scheduled)[2]
    seen = sorted((c["round"], c["client_id"], c["lr"], c["config"].get("lr")) for c in model_apps.CALLS)
    assert seen == [(r, cid, lr, lr) for r, lr in ((1, 0.1), (2, 0.1), (3, 0.001)) for cid in ("0", "1", "2")]


def test_the_app_configures_each_round_and_bad_schedules_are_named():
    model_apps.CALLS.clear()
    simulate(_config(rounds=3, app_options={"dtype": "float32", "phases": ["warm", "main"]}))
    assert sorted({(c["round"], c["config"]["phase"]) for c in model_apps.CALLS}) == [
        (1, "warm"),
        (2, "main"),
        (3, "main"),
    ]
    from brokerfl.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="train_schedule.lrr: not a train setting"):
        _config(train_schedule={"lrr": {1: 0.1}})
    with pytest.raises((ConfigError, ValueError), match=r"train_schedule.lr.2"):
        _config(train_schedule={"lr": {1: 0.1, 2: -1.0}})


def test_context_state_survives_rounds_and_a_restart_with_a_client_state_dir(tmp_path):
    config = _config(client_state_dir=str(tmp_path / "state"))
    simulate(config)
    files = sorted((tmp_path / "state" / config.run).glob("client-*.json"))
    assert len(files) == 3 and all(json.loads(f.read_text()) == {"rounds": 2} for f in files)
    simulate(config)  # new client states, as a restarted process: loaded from the files
    assert all(json.loads(f.read_text()) == {"rounds": 4} for f in files)
    simulate(_config())  # without the directory: in memory only, from nothing
    assert all(json.loads(f.read_text()) == {"rounds": 4} for f in files)


def hashes(records):
    return [r["sha256"] for r in records if r.get("sha256")]


def _accuracy_of(model_file, config):
    from brokerfl.app import load_app, load_model
    from brokerfl.app.torch_adapter import evaluate_classifier

    app = load_app(config)
    model = load_model(config, model_file)
    assert (
        model.training is False
        and next(model.parameters()).dtype == next(model_apps.model(config.app_options).parameters()).dtype
    )
    return evaluate_classifier(model, app.load_server_test(config.seed))["accuracy"]


def test_simulate_writes_its_final_model_and_any_version_on_request(tmp_path, capsys):
    """``final_model.npz`` loads back into the app's model and scores the last metrics
    line's accuracy; ``brokerfl export --version`` writes any kept version, with the hash
    the metrics show for it; the file needs no pickle and is checked against its hash."""
    import numpy as np

    from brokerfl.cli import main
    from brokerfl.storage.metrics_log import read_metrics
    from brokerfl.storage.model_file import ModelFileError, read_model_file

    config = _config(app_options={"dtype": "float64"}, rounds=3)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json", exclude_unset=True)))
    out = tmp_path / "out"
    assert (
        main(
            [
                "simulate",
                str(config_file),
                "--out",
                str(out),
                "--keep-versions",
                "--no-progress",
                "--log-level",
                "warning",
            ]
        )
        == 0
    )
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("accuracy") is not None]
    assert _accuracy_of(out / "final_model.npz", config) == records[-1]["accuracy"]
    assert main(["export", str(out), "--version", "2", "--out", str(tmp_path / "v2.npz")]) == 0
    parameters, meta = read_model_file(tmp_path / "v2.npz")
    assert meta["version"] == 2 and meta["sha256"] == records[1]["sha256"] and meta["run"] == config.run
    with np.load(tmp_path / "v2.npz", allow_pickle=False) as plain:  # any numpy reads it
        assert sorted(set(plain.files) - {"__brokerfl__"}) == sorted(parameters)
    capsys.readouterr()
    assert main(["export", str(out), "--version", "9", "--out", str(tmp_path / "v9.npz")]) == 2
    assert "no model version 9" in capsys.readouterr().err
    damaged = tmp_path / "damaged.npz"
    parameters["0.bias"] = parameters["0.bias"] + 1.0
    from brokerfl.storage.model_file import write_model_file
    from brokerfl.storage.store import ModelVersion

    write_model_file(damaged, ModelVersion(2, 2, 1, "fedavg", [], parameters, sha256=meta["sha256"]))
    with pytest.raises(ModelFileError, match="do not match its sha256"):
        read_model_file(damaged)


@pytest.mark.broker
def test_a_float64_model_is_the_same_over_rabbitmq_as_in_simulate(amqp_url, run_name, tmp_path):
    """Ten rounds of a float64 model, a server and two client processes over RabbitMQ
    (updates folded in arrival order) against simulate (in client order): every version's
    sha256 is the same, and both final models load back into the app's model with the
    accuracy of the last metrics line."""
    import torch

    from brokerfl.storage.metrics_log import read_metrics
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    clients, rounds = 4, 10
    config = _config(
        run=run_name,
        clients=clients,
        rounds=rounds,
        app_options={"dtype": "float64"},
        strategy={"min_clients": clients, "round_deadline_s": 120.0, "join_timeout_s": 120.0},
    )
    config_file = tmp_path / "run.yaml"
    config_file.write_text(json.dumps(config.model_dump(mode="json", exclude_unset=True)))
    common = [str(config_file), "--broker", amqp_url, "--log-level", "warning"]
    out = tmp_path / "amqp"

    procs = [
        start_brokerfl("server", *common, "--out", str(out)),
        start_brokerfl("client", *common, "--client-id", "0-1"),
        start_brokerfl("client", *common, "--client-id", "2-3"),
    ]
    try:
        outputs = outputs_at_the_end(procs, timeout=240)
    finally:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name).delete(admin, config.client_ids())
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    over_amqp = read_metrics(out / "metrics.jsonl")

    torch.set_num_threads(1)  # as the client processes do
    local = simulate(config, tmp_path / "simulate").records
    assert len(hashes(local)) == rounds and hashes(over_amqp) == hashes(local)
    for where, records in ((out, over_amqp), (tmp_path / "simulate", local)):
        scored = [r for r in records if r.get("accuracy") is not None]
        assert _accuracy_of(where / "final_model.npz", config) == scored[-1]["accuracy"]
