"""A server and a client started before their broker is reachable wait for it (the first
connection is retried like a reconnect, each attempt logged), and give up with exit 3 after
``--max-reconnect-s``; a refused login is final at once. The broker "comes up" as a TCP
forwarder to the test broker opened on the port the processes were given."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from test_amqp_failover import FreezingProxy
from test_operate_amqp import free_port

from brokerfl.assembly.roles import topology_for
from brokerfl.config import load_config
from brokerfl.storage.accounting import account_run
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.storage.store import DirectoryModelStore
from brokerfl.transports.amqp import AmqpTransport

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", *args], cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT
    )


def until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)  # polling a process's log under a deadline


@pytest.mark.timeout(420)
def test_a_server_and_a_client_started_before_the_broker_wait_for_it_and_run(amqp_url, run_name, tmp_path):
    parts = urlsplit(amqp_url)
    port = free_port()  # nothing listens there yet
    url = f"amqp://{parts.username or 'guest'}:{parts.password or 'guest'}@127.0.0.1:{port}/"
    config_path = tmp_path / "run.yaml"
    config_path.write_text(
        f"run: {run_name}\nclients: 1\nrounds: 1\ntrain: {{epochs: 1, max_batches: 2}}\nstrategy: "
        f"{{join_timeout_s: 60}}\n"
    )
    common = [str(config_path), "--broker", url, "--log-level", "info"]
    logs = {"server": tmp_path / "server.log", "client": tmp_path / "client.log"}
    server = spawn(["server", *common, "--out", str(tmp_path / "out")], logs["server"])
    client = spawn(["client", *common, "--client-id", "0"], logs["client"])
    proxy = None
    try:
        for role, log in logs.items():  # both tried, failed and said when they try again
            until(
                lambda log=log: log.read_text().count("amqp.connect_failed") >= 2,
                180,
                f"the {role}'s second failed attempt",
            )
        assert server.poll() is None and client.poll() is None
        proxy = FreezingProxy(
            parts.hostname or "127.0.0.1", parts.port or 5672, listen_port=port
        )  # the broker comes up
        assert server.wait(240) == 0, logs["server"].read_text()[-3000:]
        assert client.wait(60) == 0, logs["client"].read_text()[-3000:]
        for log in logs.values():
            text = log.read_text()
            failed = next(line for line in text.splitlines() if "amqp.connect_failed" in line)
            assert f"guest:***@127.0.0.1:{port}" in failed and "retry_in_s" in failed and "gives_up_in_s" in failed
            assert (parts.password or "guest") + "@" not in text  # the password is masked
            assert "amqp.connected" in text
        assert [r["model_version"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [1]
        with AmqpTransport(amqp_url) as transport:
            report = account_run(
                transport, topology_for(load_config(config_path)), DirectoryModelStore(tmp_path / "out" / "models")
            )
            assert report.ok and len(report.sent) == 1, report.summary()
    finally:
        for proc in (server, client):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proxy is not None:
            proxy.close()
        with AmqpTransport(amqp_url) as transport:
            topology_for(load_config(config_path)).delete(transport, ["0"])


@pytest.mark.timeout(120)
def test_a_process_gives_up_after_max_reconnect_s_with_exit_3():
    port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "client",
            "--clients",
            "1",
            "--client-id",
            "0",
            "--broker",
            f"amqp://guest:s3cret@127.0.0.1:{port}/",
            "--max-reconnect-s",
            "2",
            "--log-level",
            "info",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    assert (
        f"cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:{port}/: gave up after" in done.stderr
        and "in 2 s (--max-reconnect-s)" in done.stderr
    )
    assert out.count("amqp.connect_failed") >= 2 and "s3cret" not in out


@pytest.mark.timeout(120)
def test_a_refused_login_is_final_at_once(amqp_url):
    parts = urlsplit(amqp_url)
    wrong = f"amqp://{parts.username or 'guest'}:not-the-password@{parts.hostname}:{parts.port or 5672}/"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "server",
            "--clients",
            "1",
            "--run",
            "never-started",
            "--broker",
            wrong,
            "--log-level",
            "info",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 3, out
    assert "cannot connect to RabbitMQ" in done.stderr and "not-the-password" not in out
    assert "amqp.connect_failed" not in out  # not retried
