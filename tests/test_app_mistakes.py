"""Every mistake an app can make gets one clear message naming the app, the function, the
client and what was expected; the run goes on without that client where it can, or stops
with exit 2 before starting."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import structlog
import torch
from cli_processes import outputs_at_the_end, start_brokerfl
from torch import nn

from brokerfl.app import AppError, load_app
from brokerfl.assembly.roles import client_worker, server_worker, topology_for
from brokerfl.assembly.simulate import SimulationError, simulate
from brokerfl.config import parse_config
from brokerfl.storage.metrics_log import MetricsLog, read_metrics
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.local import LocalBroker, LocalTransport

ROOT = Path(__file__).resolve().parents[1]


def fake_app(monkeypatch, name: str, **functions) -> str:
    module = types.ModuleType(name)
    module.__dict__.update(functions)
    monkeypatch.setitem(sys.modules, name, module)
    return name


def data(index: int, n: int = 20) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(index).normal(size=(n, 2)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def numpy_app(**overrides):
    """A numpy app that trains by adding 0.1 and scores a fixed accuracy."""

    def train(parameters, data, settings, seed):
        return {k: v + 0.1 for k, v in parameters.items()}, {"loss": 1.0}

    functions = {
        "model": lambda options: {"w": np.zeros(2, np.float32)},
        "load_partition": lambda index, n, options, seed: data(index),
        "train": train,
        "evaluate": lambda parameters, data: {"loss": 1.0, "accuracy": 0.5},
    }
    functions.update(overrides)
    return functions


def torch_app(**overrides):
    functions = {
        "model": lambda options: nn.Linear(2, 2),
        "load_partition": lambda index, n, options, seed: data(index),
        "load_server_test": lambda options, seed: data(99),
    }
    functions.update(overrides)
    return functions


def config_of(name: str, **settings):
    return parse_config({"app": name, "clients": 3, "rounds": 2, **settings})


# ---------------------------------------------------------------- load_partition


def test_load_partition_raising_for_one_client_leaves_it_out_and_the_server_names_it(monkeypatch):
    def load_partition(index, num_partitions, options, seed):
        if index == 1:
            raise FileNotFoundError("/data/site-1.csv")
        return data(index)

    name = fake_app(monkeypatch, "mistake_partition", **numpy_app(load_partition=load_partition))
    with structlog.testing.capture_logs() as logs:
        result = simulate(config_of(name, strategy={"min_clients": 2}))
    assert [r["num_updates"] for r in result.records if "evaluation" not in r] == [
        2,
        2,
    ]  # the run went on without client 1
    expected = (
        f"app '{name}': load_partition() failed for client 1 (partition 1 of 3): FileNotFoundError: /data/site-1.csv"
    )
    assert result.server_state.unable == {"1": expected}
    (said,) = [e for e in logs if e["event"].startswith("client 1 cannot run app")]
    assert said["log_level"] == "error" and said["error"] == expected and "the run goes on without it" in said["event"]


def test_load_partition_raising_for_too_many_clients_stops_the_run_saying_who_and_why(monkeypatch):
    def load_partition(index, num_partitions, options, seed):
        if index:
            raise ValueError(f"no rows for site {index}")
        return data(index)

    name = fake_app(monkeypatch, "mistake_partition_many", **numpy_app(load_partition=load_partition))
    with pytest.raises(SimulationError) as failed:
        simulate(config_of(name, strategy={"min_clients": 2}))
    message = str(failed.value)
    assert message.startswith(f"too few clients can run app '{name}': 1 of 3 (min_clients 2)")
    assert (
        "client 1: app" in message
        and "load_partition() failed for client 2 (partition 2 of 3): ValueError: no rows for site 2" in message
    )


def test_the_server_names_the_clients_it_waits_for():
    """Client 0 alone joined a federation of 3 that needs 3: the join deadline's warning
    says how many are missing and which."""
    config = parse_config(
        {
            "clients": 3,
            "rounds": 1,
            "strategy": {"min_clients": 3, "join_timeout_s": 0.05},
            "liveness": {"timeout_s": 60.0},
        }
    )
    broker = LocalBroker()
    server = server_worker(LocalTransport(broker), config, MemoryModelStore(), MetricsLog(None), journal=False)
    client = client_worker(LocalTransport(broker), config, "0", journal=False)
    with structlog.testing.capture_logs() as logs:
        client.start()
        server.start()
        deadline = time.monotonic() + 30
        while not any("too few live clients" in e["event"] for e in logs) and time.monotonic() < deadline:
            server.step(0.05)
            client.step(0.0)
    waiting = [e["event"] for e in logs if "too few live clients" in e["event"]]
    assert waiting and waiting[0] == "too few live clients to begin: waiting for 2 (of 3): clients 1, 2 have not joined"
    for worker in (server, client):
        worker.transport.close()


@pytest.mark.broker
def test_one_failing_partition_in_a_process_hosting_two_clients_leaves_the_other_running(amqp_url, run_name, tmp_path):
    """`brokerfl client --client-id 1-2` whose load_partition raises for client 2: client 1
    trains on, the server names client 2 and finishes the run with clients 0 and 1."""
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    (tmp_path / "partition_fails_for_2.py").write_text(
        textwrap.dedent("""
        import numpy as np

        def model(options):
            return {"w": np.zeros(2, np.float32)}

        def load_partition(index, num_partitions, options, seed):
            if index == 2:
                raise OSError("the disk of site 2 is gone")
            x = np.random.default_rng(index).normal(size=(20, 2))
            return x, (x[:, 0] > 0).astype(np.int64)

        def train(parameters, data, settings, seed):
            return {k: v + 0.1 for k, v in parameters.items()}, {"loss": 1.0}

        def evaluate(parameters, data):
            return {"loss": 1.0, "accuracy": 0.5}
    """)
    )
    (tmp_path / "run.yaml").write_text(
        f"run: {run_name}\napp: partition_fails_for_2\nclients: 3\nrounds: 2\nstrategy: {{min_clients: 2}}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    common = [str(tmp_path / "run.yaml"), "--broker", amqp_url, "--log-level", "info"]

    def brokerfl(*args: str) -> subprocess.Popen:
        return start_brokerfl(*args, env={**env, "BROKERFL_LOG_FORMAT": "console"})

    try:
        procs = [
            brokerfl("server", *common, "--out", str(tmp_path / "out")),
            brokerfl("client", *common, "--client-id", "0"),
            brokerfl("client", *common, "--client-id", "1-2"),
        ]
        outputs = outputs_at_the_end(procs, timeout=240)
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        server_out, _, pair_out = outputs
        assert "client 2 cannot run app 'partition_fails_for_2': the run goes on without it" in server_out
        assert (
            "load_partition() failed for client 2 (partition 2 of 3): OSError: the disk of site 2 is gone" in server_out
        )
        assert "the app failed at this client's start" in pair_out and "role=client.2" in pair_out
        lines = [line for line in read_metrics(tmp_path / "out" / "metrics.jsonl") if "evaluation" not in line]
        assert [line["num_updates"] for line in lines] == [2, 2]  # clients 0 and 1, both rounds
    finally:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name).delete(admin, ["0", "1", "2"])


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize(
    ("returned", "shown"),
    [("0.9", r"'0\.9' \(str\)"), (torch.tensor([0.9, 0.8]), r"tensor\(\[0\.9000, 0\.8000\]\) \(Tensor\)")],
)
def test_evaluate_returning_a_string_or_a_tensor_names_evaluate_and_the_key(monkeypatch, returned, shown):
    name = fake_app(
        monkeypatch,
        f"mistake_evaluate_{type(returned).__name__}",
        **numpy_app(evaluate=lambda parameters, data: {"loss": 1.0, "accuracy": returned}),
    )
    app = load_app(config_of(name))
    with pytest.raises(
        AppError, match=rf"app '{name}': evaluate\(\) returned {shown} for 'accuracy': a metric must be a number"
    ):
        app.evaluate({"w": np.zeros(2, np.float32)}, data(0))
    # a 0-d tensor (torch's usual mean) is a number
    zero_d = fake_app(
        monkeypatch,
        "mistake_evaluate_0d",
        **numpy_app(evaluate=lambda parameters, data: {"loss": 1.0, "accuracy": torch.tensor(0.75)}),
    )
    assert load_app(config_of(zero_d)).evaluate({"w": np.zeros(2, np.float32)}, data(0))["accuracy"] == 0.75


def test_a_clients_evaluate_returning_a_string_is_named_on_the_server_which_does_not_wait(monkeypatch):
    """Federated evaluation (no server test data): client 2's evaluate() returns a string;
    it reports the failure, the server names it and closes each evaluation with the others."""

    def evaluate(parameters, data):
        return {"loss": 1.0, "accuracy": "0.9" if data[0][0, 0] == 2.0 else 0.5}  # client 2's data

    def load_partition(index, num_partitions, options, seed):
        return np.full((4, 2), float(index), np.float32), np.zeros(4, np.int64)

    name = fake_app(
        monkeypatch, "mistake_client_evaluate", **numpy_app(evaluate=evaluate, load_partition=load_partition)
    )
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        result = simulate(config_of(name, strategy={"round_deadline_s": 120.0}))
    assert time.monotonic() - started < 60  # no evaluation waited for its deadline
    federated = [r for r in result.records if r.get("evaluation") == "federated"]
    assert [(r["round"], r["num_clients"], r["accuracy"]) for r in federated] == [(1, 2, 0.5), (2, 2, 0.5)]
    failed = [e for e in logs if e["event"] == "client evaluation failed"]
    assert [e["client"] for e in failed] == ["2", "2"]
    assert all(
        e["function"] == "evaluate()" and f"app '{name}': evaluate() returned '0.9' (str) for 'accuracy'" in e["error"]
        for e in failed
    )


def test_evaluate_raising_on_the_server_is_recorded_and_training_goes_on(monkeypatch, tmp_path):
    calls = []

    def evaluate(parameters, data):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (pretend)")
        if len(calls) == 3:
            return {"loss": 1.0, "accuracy": "high"}
        return {"loss": 1.0, "accuracy": 0.5}

    name = fake_app(
        monkeypatch,
        "mistake_server_evaluate",
        **numpy_app(evaluate=evaluate, load_server_test=lambda options, seed: data(9)),
    )
    result = simulate(config_of(name, rounds=4), tmp_path)
    lines = [r for r in result.records if "evaluation" not in r]
    assert [r["round"] for r in lines] == [1, 2, 3, 4] and [r["num_updates"] for r in lines] == [3, 3, 3, 3]
    assert [r.get("evaluation_error") is None for r in lines] == [True, False, False, True]
    assert (
        lines[1]["evaluation_error"]
        == f"AppError: app '{name}': evaluate() failed: RuntimeError: CUDA out of memory (pretend)"
    )
    assert "evaluate() returned 'high' (str) for 'accuracy'" in lines[2]["evaluation_error"]
    assert lines[1]["accuracy"] is None and lines[3]["accuracy"] == 0.5
    assert '"evaluation_error"' in (tmp_path / "metrics.jsonl").read_text()


def test_evaluate_without_the_target_metric_says_which_it_wants(monkeypatch):
    name = fake_app(monkeypatch, "mistake_no_target", **numpy_app(evaluate=lambda parameters, data: {"mse": 0.2}))
    with pytest.raises(
        AppError,
        match=r"evaluate\(\) returned no 'accuracy', the app's target metric \(it returned \['mse'\]\).*TARGET_METRIC",
    ):
        load_app(config_of(name)).evaluate({"w": np.zeros(2, np.float32)}, data(0))


# ---------------------------------------------------------------- train


def test_non_finite_weights_are_refused_by_the_client_and_the_round_does_not_wait(monkeypatch):
    def train(parameters, data, settings, seed):
        poisoned = float("nan") if data[0][0, 0] == 1.0 else 0.1  # client 1's data
        return {k: v + poisoned for k, v in parameters.items()}, {"loss": 1.0}

    def load_partition(index, num_partitions, options, seed):
        return np.full((4, 2), float(index), np.float32), np.zeros(4, np.int64)

    name = fake_app(monkeypatch, "mistake_nan", **numpy_app(train=train, load_partition=load_partition))
    started = time.monotonic()
    result = simulate(config_of(name, strategy={"min_clients": 2, "round_deadline_s": 120.0}))
    assert time.monotonic() - started < 60  # no round waited for its deadline
    assert [r["num_updates"] for r in result.records if "evaluation" not in r] == [2, 2]
    failures = result.server_state.train_failures
    assert [(f.client_id, f.round) for f in failures] == [("1", 1), ("1", 2)]
    assert failures[0].error == (
        f"AppError: app '{name}': train() returned parameters with NaN or infinite values in ['w']: such an update "
        "is never folded"
    )


def test_the_server_still_refuses_non_finite_updates():
    from brokerfl.handlers.strategies.aggregate import BadUpdate, check_update

    with pytest.raises(BadUpdate, match="w: holds NaN or infinite values"):
        check_update({"w": np.array([1.0, np.inf], np.float32)}, {"w": np.zeros(2, np.float32)})


def test_train_returning_a_non_number_names_train_and_the_key(monkeypatch):
    name = fake_app(
        monkeypatch,
        "mistake_train_metric",
        **numpy_app(train=lambda parameters, data, settings, seed: (parameters, {"loss": [1.0]})),
    )
    with pytest.raises(SimulationError) as failed:
        simulate(config_of(name, rounds=1))
    assert f"app '{name}': train() returned [1.0] (list) for 'loss': a metric must be a number" in str(failed.value)


def test_a_model_built_differently_on_clients_is_named_on_the_server(monkeypatch):
    """model() whose width changes after its first call (as a model built from a different
    version of the code or options on the server would): the server's initial model is
    narrower than the clients' skeleton (the first one built): every client reports the
    mismatch, and the server's failure names the client and the shapes."""
    calls = itertools.count()
    name = fake_app(
        monkeypatch,
        "mistake_architecture",
        **torch_app(model=lambda options: nn.Linear(2, 3 if next(calls) == 0 else 2)),
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(SimulationError) as failed:
        simulate(config_of(name, seed=1, rounds=1, strategy={"min_clients": 3}))
    message = str(failed.value)
    assert (
        "round 1 got 0 of the 3 updates it needs (round 1: every participant answered, 3 with a failed training "
        "(client " in message
    )
    assert f"app '{name}': parameter weight has shape (2, 2), model() has (3, 2)" in message
    logged = [e for e in logs if e["event"] == "client training failed"]
    assert {e["client"] for e in logged} == {"0", "1", "2"}  # each round's try (on_too_few: retry)
    assert all(
        e["app"] == name
        and e["function"] == "train()"
        and "parameter weight has shape (2, 2), model() has (3, 2)" in e["error"]
        for e in logged
    )


def test_the_default_loops_refuse_a_regression_model_at_start_saying_what_they_are_for(monkeypatch):
    x = np.random.default_rng(0).normal(size=(20, 2)).astype(np.float32)
    name = fake_app(
        monkeypatch,
        "mistake_default_regression",
        **torch_app(
            model=lambda options: nn.Linear(2, 1), load_partition=lambda i, n, options, seed: (x, x[:, 0].copy())
        ),
    )
    with pytest.raises(SimulationError) as failed:
        simulate(config_of(name, rounds=1))
    message = str(failed.value)
    assert f"too few clients can run app '{name}'" in message
    assert (
        "train() failed on its warm-up batch: NotClassification: the default train() is for classification "
        "(cross-entropy of outputs of shape "
        "(batch, classes) against integer class labels) and the targets are float32, not integer class labels: for "
        "another task define "
        "train() and evaluate() in the app"
    ) in message


def test_the_default_evaluate_refuses_outputs_that_are_not_class_scores(monkeypatch):
    name = fake_app(
        monkeypatch,
        "mistake_default_outputs",
        **torch_app(model=lambda options: nn.Sequential(nn.Linear(2, 2), nn.Flatten(0))),
    )
    app = load_app(config_of(name))
    with pytest.raises(
        AppError,
        match=(
            rf"app '{name}': evaluate\(\) failed: NotClassification: the default evaluate\(\) is for classification .* "
            r"model\(\) outputs have shape \(40,\), not \(batch, classes\)"
        ),
    ):
        app.evaluate(app.initial_parameters(0), data(0))


# ---------------------------------------------------------------- found at start: exit 2


@pytest.mark.parametrize("own_train", [False, True])
def test_a_model_with_no_parameters_stops_simulate_with_exit_2_naming_the_app_and_model(tmp_path, own_train):
    (tmp_path / "empty_model.py").write_text(
        textwrap.dedent(f"""
        import numpy as np
        from torch import nn

        def model(options):
            return nn.Sequential(nn.ReLU())

        def load_partition(index, num_partitions, options, seed):
            x = np.random.default_rng(index).normal(size=(20, 2)).astype(np.float32)
            return x, (x[:, 0] > 0).astype(np.int64)
        {"def train(model, data, settings, seed):" if own_train else ""}
        {"    return {'loss': 0.0}" if own_train else ""}
    """)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "simulate",
            str(_config(tmp_path, "empty_model")),
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        "brokerfl simulate: app 'empty_model': model() returned a Sequential with no parameters or buffers: there is "
        "nothing to train or send" in out.stderr
    )
    assert "Traceback" not in out.stderr


def _config(tmp_path: Path, app: str) -> Path:
    path = tmp_path / f"{app}.yaml"
    path.write_text(f"app: {app}\nclients: 2\nrounds: 1\n")
    return path


# ---------------------------------------------------------------- app_options


def test_an_unknown_app_option_is_warned_of_with_options_declared(monkeypatch):
    name = fake_app(monkeypatch, "mistake_options_declared", OPTIONS={"hidden": 8, "lr_decay": 0.9}, **numpy_app())
    with structlog.testing.capture_logs() as logs:
        app = load_app(parse_config({"app": name, "app_options": {"hiden": 16}}))
    assert app.options == {"hidden": 8, "lr_decay": 0.9, "hiden": 16}  # the defaults filled in
    (warned,) = [e for e in logs if e["log_level"] == "warning"]
    assert warned["event"] == (
        f"app_options of app '{name}': unknown key(s) ['hiden'] (the app's OPTIONS are ['hidden', 'lr_decay']): "
        "misspelt?"
    )


def test_an_app_option_never_read_is_warned_of_after_the_first_training(monkeypatch):
    def train(parameters, data, settings, seed, options):
        return {k: v * options.get("scale", 1.0) for k, v in parameters.items()}, {}

    name = fake_app(monkeypatch, "mistake_options_unread", **numpy_app(train=train))
    with structlog.testing.capture_logs() as logs:
        simulate(parse_config({"app": name, "clients": 2, "rounds": 2, "app_options": {"scale": 1.0, "sacle": 2.0}}))
    warned = [e["event"] for e in logs if e["log_level"] == "warning" and "app_options" in e["event"]]
    assert warned == [
        f"app_options of app '{name}': unknown key(s) ['sacle'] (the app never read them): misspelt?"
    ]  # once per process


def test_a_forged_start_failure_of_a_live_client_is_refuted_by_its_heartbeat():
    """Without identity a Leave with an error may be forged: the server gives a live client
    two heartbeats' time to show it is alive before giving up a run it would leave short."""
    from brokerfl.runtime.handler_table import to_server
    from brokerfl.wire.message import Heartbeat, Leave

    config = parse_config(
        {
            "clients": 2,
            "rounds": 1,
            "strategy": {"min_clients": 2, "join_timeout_s": 60.0},
            "liveness": {"heartbeat_s": 0.5, "timeout_s": 5.0},
        }
    )
    broker = LocalBroker()
    topology = topology_for(config, journal=False)
    admin = LocalTransport(broker)
    topology.declare(admin)
    for cid in ("0", "1"):
        topology.declare_client(admin, cid)
    server = server_worker(LocalTransport(broker), config, MemoryModelStore(), MetricsLog(None), journal=False)
    server.start()
    server.publish(
        [
            to_server(Heartbeat(client_id="0", num_samples=5)),
            to_server(Leave(client_id="1", error="forged: the app failed")),
        ]
    )
    deadline = time.monotonic() + 10
    while "1" not in server.state.unable and time.monotonic() < deadline:
        server.step(0.05)
    assert server.state.unable == {"1": "forged: the app failed"} and not server.state.done
    server.publish([to_server(Heartbeat(client_id="1", num_samples=5))])  # client 1 is alive after all
    until = time.monotonic() + 2 * config.liveness.heartbeat_s + 0.5  # past the grace
    while time.monotonic() < until:
        server.step(0.05)
    assert server.state.unable == {} and server.state.begun and not server.state.done
    server.transport.close()
    admin.close()
