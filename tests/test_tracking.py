"""Experiment tracking (``tracking:`` in the config): a run's params, per-round metrics and
final model in a real MLflow tracking server (SQLite backend, artifacts served by it) started
here, TensorBoard scalars read back from the event files; a resumed server's run goes on in
its MLflow run without a step twice; a tracking server that does not answer only warns."""

from __future__ import annotations

import os
import posixpath
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import structlog.testing

from brokerfl.assembly.simulate import simulate
from brokerfl.config import parse_config
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.storage.tracking import (
    RUN_TAG,
    MlflowSink,
    TensorBoardSink,
    TrackingUnavailable,
    check_tracking,
    config_params,
    line_metrics,
    open_tracking,
)

mlflow = pytest.importorskip("mlflow", reason="the tracking extra: pip install 'brokerfl[tracking]'")
pytest.importorskip("tensorboard")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# The tests with a tracking server of their own are slow: its start alone takes 10-60 s.

ROUNDS = 20
SMALL_RUN = {
    "clients": 3,
    "model": {"hidden": [16]},
    "train": {"epochs": 1},
    "strategy": {"min_clients": 2},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with a SQLite backend store and served artifacts, in a session of its
    own (stopped with every process it started)."""

    def __init__(self, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        # its job runner (eight consumer processes) serves nothing a run logs
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not answer: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)  # polling a server that is starting, under a deadline

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started, not waited for: the first run logs to it while it starts (its tracker
    retries meanwhile, as it would for a tracking server that is down)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tracked_run(mlflow_server, tmp_path_factory):
    """A 20-round simulation that logs to MLflow and TensorBoard."""
    out = tmp_path_factory.mktemp("tracked") / "out"
    config = parse_config(
        {
            **SMALL_RUN,
            "run": "tracked-20",
            "rounds": ROUNDS,
            "tracking": {
                "mlflow": {"tracking_uri": mlflow_server.url, "tags": {"team": "fl"}},
                "tensorboard": {},
                "finish_timeout_s": 240,
            },
        }
    )
    result = simulate(config, out)
    mlflow_server.wait_ready()
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("brokerfl")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = 'tracked-20'")
    return {"config": config, "out": out, "result": result, "client": client, "runs": runs}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_20_round_run_in_mlflow_has_its_metrics_params_and_final_model(tracked_run, tmp_path):
    client, runs, out = tracked_run["client"], tracked_run["runs"], tracked_run["out"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked-20"
    assert run.data.tags["team"] == "fl"
    records = read_metrics(out / "metrics.jsonl")
    for name in ("accuracy", "loss", "num_updates", "duration_s", "update_bytes", "train_loss"):
        history = sorted(client.get_metric_history(run.info.run_id, name), key=lambda m: m.step)
        assert [m.step for m in history] == list(range(1, ROUNDS + 1)), name
    accuracy = sorted(client.get_metric_history(run.info.run_id, "accuracy"), key=lambda m: m.step)
    assert [m.value for m in accuracy] == pytest.approx([r["accuracy"] for r in records])
    params = run.data.params
    assert params["rounds"] == str(ROUNDS) and params["strategy.name"] == "fedavg"
    assert params["model.hidden"] == "[16]" and not any(k.startswith("tracking") for k in params)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "final_model.npz",
        "metrics.jsonl",
        "curve.png",
    }
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id,
        artifact_path="final_model.npz",
        dst_path=str(tmp_path),
        tracking_uri=client.tracking_uri,
    )
    with np.load(local) as logged, np.load(out / "final_model.npz") as written:
        assert sorted(logged.files) == sorted(written.files)
        assert all(np.array_equal(logged[k], written[k]) for k in written.files)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tensorboard_event_files_hold_every_round(tracked_run):
    events = EventAccumulator(str(tracked_run["out"] / "tensorboard"))
    events.Reload()
    for name in ("accuracy", "loss", "train_loss"):
        assert [s.step for s in events.Scalars(name)] == list(range(1, ROUNDS + 1)), name
    records = read_metrics(tracked_run["out"] / "metrics.jsonl")
    assert [s.value for s in events.Scalars("loss")] == pytest.approx([r["loss"] for r in records], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resumed_server_goes_on_in_its_mlflow_run_without_a_step_twice(tracked_run, mlflow_server, tmp_path):
    """A server logs 8 rounds and is killed (its tracker never finishes) after writing two more
    lines; the restarted one hands its tracker metrics.jsonl again, then rounds go on to 15."""
    records = read_metrics(tracked_run["out"] / "metrics.jsonl")[:15]
    # an app's metric names come from the clients: none of them stops a line from being logged
    records[3]["metrics"].update({"../../etc/passwd": 1.0, "<b>x</b>": 2.0, "a//b/": 3.0, "/": 4.0})
    config = parse_config(
        {
            **SMALL_RUN,
            "run": "resumed-run",
            "tracking": {"mlflow": {"tracking_uri": mlflow_server.url}, "tensorboard": {}, "finish_timeout_s": 120},
        }
    )
    client = MlflowClient(tracking_uri=mlflow_server.url)
    first = open_tracking(config, tmp_path, resume=False)
    assert first is not None
    for record in records[:8]:
        first(record)
    (run,) = _wait_for_steps(client, "resumed-run", 8)
    (board,) = [thread.sink for thread in first.threads if isinstance(thread.sink, TensorBoardSink)]
    board.writer.flush()  # what a killed server's event file holds
    # ... killed: the first tracker is dropped, not finished
    second = open_tracking(config, tmp_path, resume=True)
    assert second is not None
    second.catch_up(records[:10])  # metrics.jsonl, as the killed server left it
    for record in records[10:15]:
        second(record)
    assert second.finish(records[:15])
    (again,) = _runs(client, "resumed-run")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    for name in ("model_version", "accuracy", "loss"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
        assert sorted(steps) == list(range(1, 16)), name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "_/_/etc/passwd")] == [4]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(s.step for s in events.Scalars("accuracy")) == list(range(1, 16))


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_server_killed_and_started_again_goes_on_in_its_mlflow_run(mlflow_server, amqp_url, run_name, tmp_path):
    """Over RabbitMQ: the server is killed (-9) once MLflow has two rounds; the one started
    again resumes the run from the broker and logs to the same MLflow run, each step once."""
    from test_faults import ROOT, Federation

    mlflow_server.wait_ready()
    config = tmp_path / "tracked.yaml"
    config.write_text(
        (ROOT / "configs/digits_fedavg.yaml").read_text()
        + f"tracking:\n  mlflow: {{tracking_uri: '{mlflow_server.url}'}}\n  tensorboard: {{}}\n"
    )
    fed = Federation(amqp_url, run_name, tmp_path / "out", config=config, clients=2, rounds=5)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    try:
        fed.start()
        (run,) = _wait_for_steps(client, run_name, 2, timeout=300)
        fed.kill(fed.server)
        fed.start_server()
        fed.finish()
        (again,) = _runs(client, run_name)
        assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
        assert [r["model_version"] for r in read_metrics(fed.out / "metrics.jsonl")] == [1, 2, 3, 4, 5]
        for name in ("model_version", "accuracy", "loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, name)]
            assert sorted(steps) == [1, 2, 3, 4, 5], (name, steps)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"final_model.npz", "metrics.jsonl"}
        events = EventAccumulator(str(fed.out / "tensorboard"))
        events.Reload()
        assert sorted(s.step for s in events.Scalars("accuracy")) == [1, 2, 3, 4, 5]
    finally:
        fed.cleanup()


def _runs(client: MlflowClient, name: str) -> list[Any]:
    experiment = client.get_experiment_by_name("brokerfl")
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{name}'")


def _wait_for_steps(client: MlflowClient, name: str, steps: int, timeout: float = 120.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _runs(client, name)
        if runs and len(client.get_metric_history(runs[0].info.run_id, "model_version")) >= steps:
            return runs
        assert time.monotonic() < deadline, f"MLflow run {name} did not get {steps} steps"
        time.sleep(0.2)  # polling the tracking server, under a deadline


@pytest.mark.timeout(300)
def test_an_unreachable_tracking_server_only_warns_and_the_run_completes(tmp_path):
    config = parse_config(
        {
            **SMALL_RUN,
            "run": "unreachable",
            "rounds": 3,
            "tracking": {"mlflow": {"tracking_uri": f"http://127.0.0.1:{_free_port()}"}, "finish_timeout_s": 2},
        }
    )
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        result = simulate(config, tmp_path / "out")
    assert [r["model_version"] for r in result.records] == [1, 2, 3]
    assert (tmp_path / "out" / "final_model.npz").exists()
    warnings = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    assert any(w.startswith("tracking: MLflow at http://127.0.0.1:") and "retrying" in w for w in warnings), warnings
    assert any("did not take the run's end within 2 s" in w for w in warnings), warnings
    assert time.monotonic() - started < 200


@pytest.mark.timeout(60)
def test_a_tracker_without_its_package_is_a_clear_error_at_start(monkeypatch):
    config = parse_config({"tracking": {"mlflow": {}}})
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(TrackingUnavailable, match=r"tracking.mlflow: .*pip install 'brokerfl\[tracking\]'"):
        check_tracking(config)
    check_tracking(parse_config({}))  # no tracking asked: nothing to import


@pytest.mark.timeout(60)
def test_metric_and_param_names_from_the_wire_are_cut_to_what_trackers_take():
    line = {
        "round": 2,
        "model_version": 2,
        "accuracy": 0.5,
        "loss": None,
        "num_updates": 3,
        "duration_s": 1.0,
        "sha256": "ab",
        "restored": True,
        "server_s": {"fold": 0.1},
        "metrics": {"<script>alert(1)</script>": 1.0, "ok": True, "x" * 400: 2.0, "f1": 0.25},
        "client_metrics": {"0": {"accuracy": 1.0}},
    }
    values = line_metrics(line)
    assert values["accuracy"] == 0.5 and values["server_s/fold"] == 0.1 and values["f1"] == 0.25
    assert "_script_alert_1__/script_" in values and "loss" not in values and "ok" not in values
    for hostile, kept in (("../x", "_/x"), ("/a//b/", "a/b"), ("/", "_"), (".", "_"), ("y" * 249 + "/z", "y" * 249)):
        assert line_metrics({"model_version": 1, "metrics": {hostile: 1.0}}).keys() >= {kept}, hostile
        assert posixpath.normpath(kept) == kept
    assert all(len(name) <= 250 for name in values) and "sha256" not in values and "restored" not in values
    federated = line_metrics({**line, "evaluation": "federated"})
    assert "federated/accuracy" in federated and "accuracy" not in federated
    shown = MlflowSink(
        parse_config({"tracking": {"mlflow": {"tracking_uri": "https://u:secret@mlflow.example/x"}}}),
        resume=False,
        timeout_s=1,
    ).where
    assert shown == "https://mlflow.example/x"
    params = config_params(parse_config({"tracking": {"tensorboard": {}}, "train_schedule": {"lr": {1: 0.1}}}))
    assert params["strategy.name"] == "fedavg" and params["train_schedule.lr.1"] == "0.1"
    assert not any(key.startswith("tracking") for key in params)


@pytest.mark.timeout(60)
def test_a_metric_mlflow_refuses_loses_only_itself():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class Refusing:
        logged: list[str] = []

        def log_batch(self, run_id, metrics=(), params=()):
            if any(m.key == "refused" for m in metrics):
                raise MlflowException("no such name", error_code=INVALID_PARAMETER_VALUE)
            self.logged += [m.key for m in metrics]

    sink = MlflowSink(parse_config({"tracking": {"mlflow": {}}}), resume=False, timeout_s=1)
    sink.client, sink.run_id = Refusing(), "run"
    with structlog.testing.capture_logs() as logs:
        sink.log([({"model_version": 1, "accuracy": 0.5, "metrics": {"refused": 1.0, "loss": 0.1}}, 0.0)])
    assert sorted(sink.client.logged) == ["accuracy", "loss", "model_version"]
    assert [entry["metrics"] for entry in logs if entry["log_level"] == "warning"] == [["refused"]]


@pytest.mark.timeout(60)
def test_a_shared_tensorboard_log_dir_has_a_folder_per_run_and_a_fresh_run_clears_only_its_own(tmp_path):
    def opened(run: str, *, resume: bool) -> TensorBoardSink:
        config = parse_config({"run": run, "tracking": {"tensorboard": {"log_dir": str(tmp_path)}}})
        sink = TensorBoardSink(config, None, resume=resume)
        sink.open()
        return sink

    for run in ("a", "b"):
        sink = opened(run, resume=False)
        sink.log([({"model_version": 1, "accuracy": 0.5}, 0.0), ({"model_version": 2, "accuracy": 0.6}, 0.0)])
        sink.finish([], False)
        assert sink.log_dir == tmp_path / run
    resumed = opened("a", resume=True)
    assert resumed.logged_step("") == 2 and resumed.logged_step("federated/") == -1
    resumed.finish([], False)
    fresh = opened("a", resume=False)
    assert fresh.logged_step("") == -1
    fresh.finish([], False)
    events = EventAccumulator(str(tmp_path / "b"))
    events.Reload()
    assert [s.step for s in events.Scalars("accuracy")] == [1, 2]
