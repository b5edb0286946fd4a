"""A federation of separate processes over the real RabbitMQ: one server, several client
processes, trained on digits, matching `brokerfl simulate` on the same config and seed;
and docker/compose.yaml's services run as local processes with their own environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.transports.topology import RunTopology

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]


def brokerfl(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = 180) -> list[str]:
    """Wait for every process (bounded), killing the rest on a timeout; returns outputs."""
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return outputs


@pytest.fixture
def cleanup(amqp_url):
    runs: list[tuple[str, list[str]]] = []
    yield runs.append
    from brokerfl.transports.amqp import AmqpTransport

    with AmqpTransport(amqp_url) as admin:
        for run, client_ids in runs:
            RunTopology(run).delete(admin, client_ids)


def test_server_and_client_processes_train_like_simulate(amqp_url, run_name, tmp_path, cleanup):
    clients, rounds = 4, 5
    cleanup((run_name, [str(i) for i in range(clients)]))
    common = [
        "configs/digits_fedavg.yaml",
        "--broker",
        amqp_url,
        "--run",
        run_name,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--log-level",
        "warning",
    ]
    server = brokerfl("server", *common, "--out", str(tmp_path))
    # two processes: one hosts client 0, the other the logical clients 1-3
    client_procs = [brokerfl("client", *common, "--client-id", "0"), brokerfl("client", *common, "--client-id", "1-3")]
    outputs = finish([server, *client_procs])
    assert [p.returncode for p in (server, *client_procs)] == [0, 0, 0], outputs

    over_amqp = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in over_amqp] == list(range(1, rounds + 1))
    assert all(r["num_updates"] == clients for r in over_amqp)
    assert (tmp_path / "curve.png").exists()

    torch.set_num_threads(1)  # as the client processes do
    local = simulate(
        load_config("configs/digits_fedavg.yaml", {"run": run_name, "clients": clients, "rounds": rounds})
    ).records
    # float64 folding makes the model independent of arrival order: same bits
    assert [r["accuracy"] for r in over_amqp] == [r["accuracy"] for r in local]
    assert [r["sha256"] for r in over_amqp] == [r["sha256"] for r in local]


def compose_defaults(value):
    """compose.yaml's values with every ${VAR:-default} at its default (an empty shell)."""
    if isinstance(value, dict):
        return {key: compose_defaults(item) for key, item in value.items()}
    if isinstance(value, list):
        return [compose_defaults(item) for item in value]
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value) if isinstance(value, str) else value


def test_compose_services_run_as_local_processes(run_name, tmp_path, provision_on_broker):
    """docker/compose.yaml with docker/compose.identity.yaml, each service's command with its
    environment and its own provisioned credentials file as a local process (each
    participant its own user, identity enforced); the containers themselves run in
    tests/test_containers.py where an engine can."""
    compose = compose_defaults(yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text()))
    identity = yaml.safe_load((ROOT / "docker" / "compose.identity.yaml").read_text())
    services = compose["services"]
    assert "rabbitmq" in services and "healthcheck" in services["rabbitmq"]
    assert "management" in services["rabbitmq"]["image"]
    assert (ROOT / "docker" / services["server"]["env_file"]).read_text().count("amqp://guest:guest@rabbitmq") == 1
    mounts = " ".join(identity["services"]["rabbitmq"]["volumes"])
    assert (
        "definitions.json:/etc/rabbitmq/brokerfl/definitions.json" in mounts
        and "rabbitmq.conf:/etc/rabbitmq/conf.d/" in mounts
    )
    workers = {  # the monitoring profile's services (prometheus, grafana) are no workers
        name: {**spec, **identity["services"][name]}
        for name, spec in services.items()
        if name != "rabbitmq" and "profiles" not in spec
    }
    assert "server" in workers and sum(name.startswith("client") for name in workers) >= 2

    base_env = dict(workers["server"]["environment"])
    config = load_config(
        ROOT / base_env["BROKERFL_CONFIG"], {"run": run_name, "clients": int(base_env["BROKERFL_CLIENTS"]), "rounds": 3}
    )
    done = provision_on_broker(config)
    assert "load_definitions = " in done.rabbitmq_conf.read_text()
    procs = []
    users = set()
    for name, spec in sorted(workers.items()):
        env = dict(spec["environment"])
        assert "BROKERFL_AMQP_URL" not in env  # credentials come from the service's own file only
        env.pop("BROKERFL_RUN", None)  # the test's run, from the provisioned file
        # the compose file's run is compose-digits: the same file of this test's run
        user = Path(spec["env_file"]).name.removesuffix(".env").replace("compose-digits", run_name)
        users.add(user)
        env.update(done.env(user), BROKERFL_ROUNDS="3")
        assert env["BROKERFL_ENFORCE_IDENTITY"] == "1" and f"{user}:" in env["BROKERFL_AMQP_URL"]
        if "BROKERFL_METRICS_PORT" in env:  # a free port here: other tests may run beside this one
            env.update(BROKERFL_METRICS_PORT=str(_free_port()), BROKERFL_METRICS_ADDR="127.0.0.1")
        if name == "server":
            env["BROKERFL_OUT"] = str(tmp_path)
        assert spec["command"][0] == "brokerfl"
        procs.append(brokerfl(*spec["command"][1:], "--log-level", "warning", env=env))
    assert len(users) == len(workers)
    outputs = finish(procs)
    assert [p.returncode for p in procs] == [0] * len(procs), outputs
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["num_updates"] == config.clients for r in records)
    assert records[-1]["accuracy"] > 0.8


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_broker_is_one_clear_error():
    # a server retries its first connection (--max-reconnect-s; tests/test_start_retry.py), then gives up
    proc = brokerfl(
        "server", "--broker", "amqp://guest:secret@127.0.0.1:1/", "--run", "nowhere", "--max-reconnect-s", "1"
    )
    (out,) = finish([proc], timeout=60)
    assert proc.returncode == 3
    assert "127.0.0.1:1" in out and "secret" not in out and "gave up after" in out
    assert "Traceback" not in out


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)  # polling the broker's counters under a deadline


def test_a_client_killed_before_its_ack_gets_its_task_again(amqp_url, run_name, cleanup):
    """kill -9 while training: the task was never acked, so the broker redelivers it to
    the restarted client, which answers it exactly once."""
    from brokerfl.config import load_config
    from brokerfl.handlers.datasets import load_dataset
    from brokerfl.handlers.trainer import init_parameters
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.wire.message import TrainTask, to_wire

    cleanup((run_name, ["0"]))
    config = load_config("configs/digits_fedavg.yaml", {"run": run_name, "clients": 4})
    topology = RunTopology(run_name)
    args = [
        "configs/digits_fedavg.yaml",
        "--broker",
        amqp_url,
        "--run",
        run_name,
        "--clients",
        "4",
        "--client-id",
        "0",
        "--log-level",
        "warning",
    ]
    with AmqpTransport(amqp_url) as admin:
        topology.declare(admin)
        first = brokerfl("client", *args)
        join = wait_until(lambda: admin.get(topology.server_queue), 60, "the client's Join")
        assert join.envelope.type == "join"
        admin.ack(join)
        data = load_dataset("digits")
        params = init_parameters(data.num_features, config.model.hidden, data.num_classes, seed=0)
        slow = config.train.model_copy(update={"epochs": 150}).model_dump()  # long enough to be killed in
        task = TrainTask(run=run_name, round=1, parameters=params, participants=["0"], config=slow)
        envelope, body = to_wire(task)
        admin.publish(topology.exchange, "clients.train_task", envelope, body)
        client_queue = topology.client_queue("0")
        wait_until(lambda: admin.queue_info(client_queue).messages_ready == 0, 30, "the task to be delivered")
        first.kill()  # kill -9, mid-training
        first.communicate()
        wait_until(lambda: admin.queue_info(client_queue).messages_ready == 1, 30, "the task to be back in the queue")
        assert "parameter_update" not in _drain_types(admin, topology.server_queue)  # none was sent

        second = brokerfl("client", *args)
        try:
            update = wait_until(lambda: _next_update(admin, topology), 120, "the update")
            assert update.task_id == task.message_id and update.client_id == "0"
            assert admin.queue_info(client_queue).messages_ready == 0
        finally:
            second.kill()
            second.communicate()
        assert "parameter_update" not in _drain_types(admin, topology.server_queue)  # answered once


def _drain_types(admin, queue) -> list[str]:
    types = []
    while (delivery := admin.get(queue)) is not None:
        types.append(delivery.envelope.type)
        admin.ack(delivery)
    return types


def _next_update(admin, topology):
    from brokerfl.wire.message import from_wire

    delivery = admin.get(topology.server_queue)
    if delivery is None:
        return None
    admin.ack(delivery)
    if delivery.envelope.type != "parameter_update":
        return None  # the restarted client's Join, heartbeats
    return from_wire(delivery.envelope, delivery.body)


def test_a_run_survives_a_broker_restart(amqp_url, run_name, tmp_path, cleanup, restart_broker):
    """rabbitmqctl stop_app / start_app mid-run: every process reconnects, the run
    completes, and every round folded every client's update exactly once."""
    clients, rounds = 3, 8
    cleanup((run_name, [str(i) for i in range(clients)]))
    common = [
        "configs/digits_fedavg.yaml",
        "--broker",
        amqp_url,
        "--run",
        run_name,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--log-level",
        "warning",
    ]
    server = brokerfl("server", *common, "--out", str(tmp_path))
    client_procs = [brokerfl("client", *common, "--client-id", f"0-{clients - 1}")]
    metrics = tmp_path / "metrics.jsonl"
    try:
        wait_until(lambda: metrics.exists() and len(read_metrics(metrics)) >= 2, 120, "round 2")
        restart_broker()
    finally:
        outputs = finish([server, *client_procs])
    assert [p.returncode for p in (server, *client_procs)] == [0, 0], outputs
    records = read_metrics(metrics)
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(r["num_updates"] == clients for r in records)
    assert records[-1]["accuracy"] > 0.85
