"""Operating a running federation over the real RabbitMQ: status, admin commands (through
the same `ask` the CLI uses, and the CLI itself), the Prometheus endpoint, and admin state
that survives a kill -9 of the server. One run of separate processes, short rounds."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from brokerfl.assembly.roles import topology_for
from brokerfl.config import load_config
from brokerfl.runtime.operator_commands import (
    AdminReply,
    PauseRounds,
    RemoveClient,
    ResumeRounds,
    SetMinClients,
    SetRounds,
    StatusRequest,
    ask,
)
from brokerfl.storage.accounting import account_run
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.storage.store import DirectoryModelStore
from brokerfl.transports.amqp import AmqpTransport
from brokerfl.transports.base import TransportError
from brokerfl.wire.message import TrainTask, from_wire

pytestmark = pytest.mark.broker
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, run: str) -> dict[str, float]:
    """The endpoint's samples, by name (with labels, if any, but the run's: every brokerfl
    series carries it, and it must be ``run``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    assert all(f'run="{run}"' in name for name, _ in lines if name.startswith("brokerfl_"))
    return {
        re.sub(r'(?<=[{,])run="[^"]*",?', "", name).replace(",}", "}").replace("{}", ""): float(value)
        for name, value in lines
    }


class Run:
    def __init__(self, url: str, run: str, out: Path) -> None:
        self.url, self.run, self.out = url, run, out
        self.config_path = out / "run.yaml"
        out.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"run: {run}\nclients: 4\nrounds: 3\n"
            "train: {epochs: 1, max_batches: 2}\n"
            "strategy: {min_clients: 3, join_timeout_s: 1, round_deadline_s: 20}\n"
        )
        self.config = load_config(self.config_path)
        self.topology = topology_for(self.config)
        self.transport = AmqpTransport(url)
        self.spawned = 0

    def spawn(self, *args: str) -> subprocess.Popen:
        self.spawned += 1
        log = open(self.out / f"{self.spawned:02d}-{args[0]}.log", "w")  # noqa: SIM115 - closed with the process
        common = [str(self.config_path), "--broker", self.url, "--log-level", "warning"]
        return subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", *args[:1], *common, *args[1:]],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def ask(self, message, timeout: float = 20.0):
        reply = ask(self.transport, self.topology, message, timeout=timeout)
        assert reply is not None, f"no reply to {message.TYPE}"
        return reply

    def status(self) -> dict:
        return self.ask(StatusRequest()).status

    def until(self, what: str, done, timeout: float = 180.0) -> dict:
        """Poll the server's status until ``done(status)``; returns that status. The default
        deadline is long: a process starting (torch, data, warm-up) takes long on a loaded machine."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = ask(self.transport, self.topology, StatusRequest(), timeout=5)
            except TransportError:  # no server has declared the run yet
                reply = None
            status = reply.status if reply is not None else None
            if status is not None and done(status):
                return status
            assert time.monotonic() < deadline, f"timed out waiting for {what}; last status {status}"
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.out.glob("*.log")))


def live(status: dict) -> list[str]:
    return [c["id"] for c in status["clients"] if c["live"]]


@pytest.mark.slow
def test_status_admin_commands_and_metrics_on_a_running_federation(amqp_url, run_name, tmp_path):
    run = Run(amqp_url, run_name, tmp_path)
    metrics_port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        server = run.spawn("server", "--out", str(tmp_path), "--metrics-port", str(metrics_port))
        clients = [run.spawn("client", "--client-id", "0-1")]
        procs += [server, *clients]

        # two of four clients live, min clients 3: the server waits; set-min-clients 2 begins it
        status = run.until("clients 0 and 1", lambda s: live(s) == ["0", "1"])
        assert not status["begun"] and status["round"] == 0 and status["min_clients"] == 3
        assert run.ask(SetRounds(rounds=1000)).ok  # extends the configured 3
        assert run.ask(SetMinClients(min_clients=2)).ok
        run.until("the first round", lambda s: s["begun"] and s["round"] >= 1, timeout=30)

        clients.append(run.spawn("client", "--client-id", "2-3"))
        procs.append(clients[-1])
        status = run.until(
            "four live clients in a round", lambda s: live(s) == ["0", "1", "2", "3"] and s["round"] >= 4
        )
        assert status["rounds"] == 1000 and status["round"] > 3  # past the configured 3 rounds
        assert status["model_version"] == status["round"] - (1 if status["round_open"] else 0)
        # the CLI says the same
        cli = subprocess.run(
            [sys.executable, "-m", "brokerfl.cli", "status", str(run.config_path), "--broker", amqp_url, "--json"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        view = json.loads(cli.stdout)
        assert live(view["server"]) == ["0", "1", "2", "3"] and view["server"]["round"] >= status["round"]
        assert view["queues"]["server"]["consumers"] == 1

        removed = run.ask(RemoveClient(client_id="3"))
        assert removed.ok
        # an id outside the federation: without --config the CLI cannot tell, the server refuses it
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "brokerfl.cli",
                "admin",
                "remove-client",
                "99",
                "--run",
                run.run,
                "--broker",
                amqp_url,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 1 and cli.stdout.startswith(
            f"REFUSED: client 99 is not in the federation of run {run.run} (client ids 0-3)"
        ), cli.stdout + cli.stderr

        # pause: the open round finishes, then none starts within 3 round-times
        assert run.ask(PauseRounds()).ok
        paused = run.until("the open round to finish", lambda s: not s["round_open"], timeout=30)
        records = read_metrics(tmp_path / "metrics.jsonl")
        round_time = max(0.5, sum(r["duration_s"] for r in records[-3:]) / 3)
        watch_until = time.monotonic() + 3 * round_time
        while time.monotonic() < watch_until:
            now = run.status()
            assert (now["model_version"], now["round"], now["round_open"]) == (
                paused["model_version"],
                paused["round"],
                False,
            )
            time.sleep(0.2)

        # Prometheus, mid-run (paused, so nothing moves): counters equal metrics.jsonl
        records = read_metrics(tmp_path / "metrics.jsonl")
        scraped = scrape(metrics_port, run.run)
        assert scraped["brokerfl_rounds_total"] == len(records) == paused["model_version"]
        assert scraped["brokerfl_updates_folded_total"] == sum(r["num_updates"] for r in records)
        assert scraped["brokerfl_paused"] == 1 and scraped["brokerfl_live_clients"] == 3  # 3 was removed
        assert scraped["brokerfl_held_updates"] == 0 and paused["held_updates"] == 0  # between rounds: all acked

        # kill -9 the server: the admin state is the broker's, a new server keeps it
        server.send_signal(signal.SIGKILL)
        server.wait(30)
        procs.append(server := run.spawn("server", "--out", str(tmp_path)))
        restarted = run.until("the restarted server", lambda s: s["begun"])
        assert (restarted["paused"], restarted["removed"], restarted["rounds"], restarted["min_clients"]) == (
            True,
            ["3"],
            1000,
            2,
        )
        time.sleep(3 * round_time)  # the assertion window: still no new round
        assert run.status()["model_version"] == paused["model_version"]

        assert run.ask(ResumeRounds()).ok
        run.until("two more rounds", lambda s: s["model_version"] >= paused["model_version"] + 2, timeout=60)

        # abort through the CLI: exit 0 everywhere, the last version stored, accounting holds
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "brokerfl.cli",
                "admin",
                "abort",
                "--config",
                str(run.config_path),
                "--broker",
                amqp_url,
                "--reason",
                "test",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0 and cli.stdout.startswith("OK: run finished at model version"), (
            cli.stdout + cli.stderr
        )
        assert server.wait(60) == 0, run.logs()
        assert [c.wait(60) for c in clients] == [0, 0], (
            run.logs()
        )  # client 3 on Exit at its removal, the rest on the abort's

        store = DirectoryModelStore(tmp_path / "models")
        last = int(re.search(r"model version (\d+)", cli.stdout).group(1))
        assert store.versions()[-1] == last == read_metrics(tmp_path / "metrics.jsonl")[-1]["model_version"]
        report = account_run(run.transport, run.topology, store)
        assert report.ok, report.summary()
        journal = [d for d in read_journal(run.transport, run.topology)]
        replies = [from_wire(d.envelope, d.body) for d in journal if d.envelope.type == AdminReply.TYPE]
        assert [(r.command, r.ok) for r in replies] == [
            ("set_rounds", True),
            ("set_min_clients", True),
            ("remove_client", True),
            ("remove_client", False),
            ("pause_rounds", True),
            ("resume_rounds", True),
            ("abort_run", True),
        ]
        assert all(r.by.startswith("admin:") for r in replies)
        assert {r.user for r in replies} == {urlsplit(amqp_url).username or "guest"}  # the broker-validated publisher
        after_removal = [
            from_wire(d.envelope, d.body)
            for d in journal
            if d.envelope.type == TrainTask.TYPE and d.envelope.timestamp > removed.timestamp
        ]
        assert after_removal and all("3" not in task.participants for task in after_removal)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        run.topology.delete(run.transport, ["0", "1", "2", "3"])
        run.transport.close()
