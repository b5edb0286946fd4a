"""Apps (brokerfl.app): the examples run, BatchNorm buffers aggregate by the documented
rule, federated evaluation, and every way an app can break is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from cli_processes import outputs_at_the_end, start_brokerfl

from brokerfl.app import AppError, Partition, load_app
from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import ConfigError, load_config, parse_config
from brokerfl.storage.journal import read_journal
from brokerfl.transports.base import REASON_HEADER
from brokerfl.transports.local import LocalTransport
from brokerfl.wire.message import ParameterUpdate, from_wire

ROOT = Path(__file__).resolve().parents[1]


def test_numpy_logistic_regression_on_five_hospitals_imports_no_torch(tmp_path):
    """The whole run in a fresh interpreter: its metrics come from federated evaluation
    (the server has no data), and torch is never imported."""
    script = (
        "import json, sys\n"
        "from brokerfl.config import load_config\n"
        "from brokerfl.assembly.simulate import simulate\n"
        f"r = simulate(load_config('examples/logreg_numpy/config.yaml'), {str(tmp_path)!r})\n"
        "print(json.dumps({'torch': sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')),"
        " 'records': r.records}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["torch"] == []
    rounds = [r for r in result["records"] if "evaluation" not in r]
    federated = [r for r in result["records"] if r.get("evaluation") == "federated"]
    assert len(rounds) == 20 and all(r["accuracy"] is None for r in rounds)  # no server test data
    assert [r["model_version"] for r in federated] == list(range(1, 21))  # evaluate_every: 1
    assert all(r["num_clients"] == 5 for r in federated)
    assert federated[-1]["accuracy"] >= 0.94
    assert (tmp_path / "curve.png").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(line.get("evaluation") == "federated" for line in lines) == 20


def test_federated_evaluation_is_sample_weighted():
    from brokerfl.handlers.workflows.evaluation import weighted_metrics
    from brokerfl.wire.message import EvaluateResult

    results = [
        EvaluateResult(client_id="a", task_id="t", loss=1.0, accuracy=0.5, num_samples=10),
        EvaluateResult(client_id="b", task_id="t", loss=0.0, accuracy=1.0, num_samples=30),
    ]
    assert weighted_metrics(results) == {"loss": 0.25, "accuracy": 0.875, "num_samples": 40}


def test_evaluate_every_and_server_test_data_with_federated_evaluation_always():
    config = load_config("examples/logreg_numpy/config.yaml", {"rounds": 5, "evaluate_every": 2})
    federated = [r for r in simulate(config).records if r.get("evaluation") == "federated"]
    assert [r["round"] for r in federated] == [2, 4, 5]  # every 2nd round, and the last
    mlp = load_config(None, {"rounds": 2, "clients": 2, "federated_evaluation": "always"})
    records = simulate(mlp).records
    assert [("evaluation" in r, r["round"]) for r in records] == [(False, 1), (True, 1), (False, 2), (True, 2)]
    assert all(r["accuracy"] is not None for r in records)  # the server's own test data too


def test_batchnorm_buffers_travel_and_aggregate_by_hand():
    """Two clients, one round of the CNN: the new version's BatchNorm running statistics
    are the sample-weighted mean of the clients' (computed here from the journaled
    updates), and num_batches_tracked is that mean rounded (each client ran 3 batches)."""
    config = load_config(
        "examples/cnn_mnist/config.yaml",
        {
            "clients": 2,
            "rounds": 1,
            "strategy.min_clients": 2,
            "train.max_batches": 3,
            "app_options.partition": "dirichlet",
            "app_options.alpha": 1.0,
        },
    )
    result = simulate(config, journal=True)
    updates = [
        from_wire(d.envelope, d.body)
        for d in read_journal(LocalTransport(result.broker), topology_for(config))
        if d.envelope.type == ParameterUpdate.TYPE and not d.routing_key.startswith("dead.")
    ]
    assert len(updates) == 2 and updates[0].num_samples != updates[1].num_samples
    initial, stored = result.store.get(0).parameters, result.store.get(1).parameters
    weights = np.array([u.num_samples for u in updates], np.float64)
    for name in ("1.running_mean", "1.running_var", "5.running_mean", "5.running_var"):
        clients = [u.parameters[name] for u in updates]
        assert not np.array_equal(clients[0], initial[name])  # the buffers moved, and travelled
        by_hand = (
            weights[0] * clients[0].astype(np.float64) + weights[1] * clients[1].astype(np.float64)
        ) / weights.sum()
        assert stored[name].dtype == np.float32
        np.testing.assert_array_equal(stored[name], by_hand.astype(np.float32))
    for name in ("1.num_batches_tracked", "5.num_batches_tracked"):
        assert [int(u.parameters[name]) for u in updates] == [3, 3]
        assert stored[name].dtype == np.int64 and stored[name].shape == () and int(stored[name]) == 3


@pytest.mark.parametrize(("a", "b", "expected"), [(3, 6, 5), (6, 7, 7), (4, 8, 7), (1, 3, 2)])
def test_integer_buffers_take_the_rounded_weighted_mean(a, b, expected):
    """Weights 1 and 3: 5.25 -> 5; 6.75 -> 7 (a cast would truncate to 6); 7.0 -> 7;
    2.5 -> 2 (halves to even)."""
    from brokerfl.handlers.strategies.aggregate import fold_update, new_running_sum, weighted_average

    like = {"n": np.array(0, np.int64)}
    acc = new_running_sum(like)
    fold_update(acc, {"n": np.array(a, np.int64)}, 1.0)
    fold_update(acc, {"n": np.array(b, np.int64)}, 3.0 if (a, b) != (1, 3) else 1.0)
    out = weighted_average(acc, like)["n"]
    assert isinstance(out, np.ndarray) and out.dtype == np.int64 and out.shape == () and int(out) == expected


def test_float16_folds_in_float64_and_keeps_its_dtype():
    from brokerfl.handlers.strategies.aggregate import fold_update, new_running_sum, weighted_average

    like = {"h": np.zeros(3, np.float16)}
    acc = new_running_sum(like)
    fold_update(acc, {"h": np.array([1.0, 2.0, 3.0], np.float16)}, 100.0)
    fold_update(acc, {"h": np.array([2.0, 2.0, 0.5], np.float16)}, 300.0)
    out = weighted_average(acc, like)["h"]
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.array([1.75, 2.0, 1.125], np.float16))


# ---------------------------------------------------------------- clear errors


def fake_app(monkeypatch, name: str, **functions) -> str:
    module = types.ModuleType(name)
    module.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, name, module)
    return name


def numpy_app(**overrides):
    def load_partition(index, num_partitions, options, seed):
        x = np.random.default_rng(index).normal(size=(20, 2))
        return x, (x[:, 0] > 0).astype(np.float64)

    def train(parameters, data, settings, seed):
        return {k: v + 0.1 for k, v in parameters.items()}, {"loss": 1.0}

    def evaluate(parameters, data):
        return {"loss": 1.0, "accuracy": 0.5}

    functions = dict(
        model=lambda options: {"w": np.zeros(2, np.float32)},
        load_partition=load_partition,
        train=train,
        evaluate=evaluate,
    )
    functions.update(overrides)
    return functions


def test_an_app_module_that_fails_to_import_names_the_config_key():
    config = parse_config({"app": "no_such_package.app"})
    with pytest.raises(ConfigError, match=r"^app: cannot import app module 'no_such_package.app'"):
        load_app(config)


def test_a_model_factory_that_returns_no_module(monkeypatch):
    name = fake_app(monkeypatch, "fake_app_no_module", **numpy_app(model=lambda options: 42))
    with pytest.raises(AppError, match=r"app 'fake_app_no_module': model\(\) returned int, expected a torch.nn.Module"):
        load_app(parse_config({"app": name})).initial_parameters(0)


def test_an_empty_partition_for_client_7(monkeypatch):
    def load_partition(index, num_partitions, options, seed):
        return Partition(train=(np.zeros((0, 2)), np.zeros(0))) if index == 7 else (np.ones((3, 2)), np.ones(3))

    name = fake_app(monkeypatch, "fake_app_empty", **numpy_app(load_partition=load_partition))
    config = parse_config({"app": name, "clients": 8, "rounds": 2})
    result = simulate(config)  # the run goes on without client 7, which says why
    assert list(result.server_state.unable) == ["7"]
    assert (
        "app 'fake_app_empty': load_partition() returned an empty partition for client 7 (partition 7 of 8)"
        in result.server_state.unable["7"]
    )
    assert [r["num_updates"] for r in result.records if "evaluation" not in r] == [7, 7]


def test_bad_app_options_name_the_app_and_key():
    with pytest.raises(
        ConfigError, match=r"app_options of app 'examples.cnn_mnist.app': unknown key\(s\) \['chanels'\]"
    ):
        load_app(parse_config({"app": "examples.cnn_mnist.app", "app_options": {"chanels": [4, 8]}}))
    with pytest.raises(ConfigError, match="data and model are the built-in MLP app's settings"):
        parse_config({"app": "examples.cnn_mnist.app", "model": {"hidden": [4]}})


def test_an_update_unlike_the_global_model_is_dead_lettered_and_the_run_goes_on(monkeypatch):
    """Client 1's train() returns float64 (the global model is float32): its updates are
    dead-lettered with the reason; the rounds close with client 0's."""

    def train(parameters, data, settings, seed):
        if data[0][0, 0] == 1.0:  # client 1's data
            return {"w": parameters["w"].astype(np.float64)}, {}
        return {k: v + 0.1 for k, v in parameters.items()}, {}

    def load_partition(index, num_partitions, options, seed):
        return np.full((4, 2), float(index)), np.zeros(4)

    name = fake_app(monkeypatch, "fake_app_bad_update", **numpy_app(train=train, load_partition=load_partition))
    config = parse_config(
        {"app": name, "clients": 2, "rounds": 2, "strategy": {"min_clients": 1, "round_deadline_s": 1.0}}
    )
    result = simulate(config)
    assert [r["num_updates"] for r in result.records if "evaluation" not in r] == [1, 1]
    np.testing.assert_allclose(result.store.latest().parameters["w"], [0.2, 0.2], rtol=1e-6)
    dead = LocalTransport(result.broker)
    reasons = []
    while (delivery := dead.get(topology_for(config).dead_queue)) is not None:
        reasons.append(delivery.envelope.headers[REASON_HEADER])
        dead.ack(delivery)
    assert len(reasons) == 2
    assert all(
        f"update from client 1 (app '{name}', its train()): w: dtype float64, the global model has float32" in r
        for r in reasons
    )


# ---------------------------------------------------------------- the CNN over RabbitMQ


@pytest.mark.broker
def test_cnn_app_over_rabbitmq_matches_simulate_replays_and_accounts(amqp_url, run_name, tmp_path):
    """A server process and a client process (two logical clients) over the real broker:
    the same model versions, bit for bit, as simulate; replay --check and accounting pass."""
    import torch
    import yaml

    from brokerfl.cli import main
    from brokerfl.storage.metrics_log import read_metrics
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    config = yaml.safe_load((ROOT / "examples" / "cnn_mnist" / "config.yaml").read_text())
    config.update(
        run=run_name,
        clients=2,
        rounds=2,
        train={**config["train"], "max_batches": 2, "batch_size": 16},
        strategy={"name": "fedavg", "min_clients": 2},
    )
    path = tmp_path / "cnn.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    common = [str(path), "--broker", amqp_url, "--log-level", "warning"]
    try:
        procs = [
            start_brokerfl("server", *common, "--out", str(out)),
            start_brokerfl("client", *common, "--client-id", "0-1"),
        ]
        outputs = outputs_at_the_end(procs, timeout=300)
        assert [p.returncode for p in procs] == [0, 0], outputs
        over_amqp = read_metrics(out / "metrics.jsonl")
        assert [r["num_updates"] for r in over_amqp] == [2, 2]

        torch.set_num_threads(1)  # as the processes do
        local = simulate(load_config(path)).records
        assert [r["sha256"] for r in over_amqp] == [r["sha256"] for r in local]

        assert main(["replay", *common, "--check"]) == 0
        assert main(["accounting", *common, "--out", str(out)]) == 0
    finally:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name).delete(admin, ["0", "1"])


def test_evaluation_reads_the_model_in_place_and_training_never_writes_into_it(monkeypatch):
    """The server evaluates in place (the weights are the evaluated arrays: no copy), for
    the built-in MLP and for a torch app; a later train leaves those arrays untouched."""
    import torch

    torch_app = fake_app(
        monkeypatch,
        "fake_torch_app",
        model=lambda options: torch.nn.Sequential(torch.nn.Linear(64, 10)),
        load_partition=lambda index, num_partitions, options, seed: (
            np.zeros((4, 64), np.float32),
            np.zeros(4, np.int64),
        ),
    )
    for config in ({"model": {"hidden": [8]}}, {"app": torch_app}):
        app = load_app(parse_config(config))
        test_data = load_app(parse_config({})).load_server_test(0)
        evaluated = {
            k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape) for k, v in app.initial_parameters(0).items()
        }  # read-only, as decoded
        before = {k: v.copy() for k, v in evaluated.items()}
        pointers = []
        original = torch.nn.Linear.forward
        monkeypatch.setattr(
            torch.nn.Linear,
            "forward",
            lambda self, x, pointers=pointers, original=original: (
                pointers.append(self.weight.data_ptr()),
                original(self, x),
            )[1],
        )
        scores = app.evaluate(evaluated, test_data)
        monkeypatch.setattr(torch.nn.Linear, "forward", original)
        weights = {v.ctypes.data for k, v in evaluated.items() if k.endswith("weight")}
        assert pointers and set(pointers) <= weights, config  # evaluated in place, not copied
        new, _ = app.train(evaluated, test_data, parse_config({}).train, seed=0)
        assert all(np.array_equal(evaluated[k], before[k]) for k in evaluated), config  # training wrote elsewhere
        assert any(not np.array_equal(new[k], before[k]) for k in new), config
        assert app.evaluate(evaluated, test_data) == scores, config  # the same arrays evaluate the same again
