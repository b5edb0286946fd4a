"""A RabbitMQ cluster of three nodes on this machine (started by the fixture): the run's
queues are quorum queues replicated on every node, the processes take the three nodes'
URLs, and kill -9 of the node that leads the server queue mid-run costs nothing.

Node names and ports: ``BROKERFL_CLUSTER_NODE`` (a base name; nodes ``<base>c1..c3``) and
``BROKERFL_CLUSTER_PORT`` (the first node's AMQP port; the others follow), else derived
from the test broker's (``h13@localhost`` on 5687 -> ``h13c1..3@localhost`` on 5887-5889).
Each node's Erlang distribution port is its AMQP port + 20000. Needs ``rabbitmq-server``
and root (to hand the node directories to the rabbitmq user); minutes on a loaded machine
(starting and joining the nodes is about a third of it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from rabbit_nodes import node_env as _node_env
from test_federation_amqp import ROOT, wait_until

from brokerfl.assembly.roles import topology_for
from brokerfl.config import load_config
from brokerfl.ops.replay import replay
from brokerfl.storage.accounting import account_run
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.storage.store import DirectoryModelStore

pytestmark = [pytest.mark.broker, pytest.mark.cluster, pytest.mark.slow]


def _cluster_settings(amqp_url: str) -> list[tuple[str, int]]:
    base = (
        os.environ.get("BROKERFL_CLUSTER_NODE")
        or (os.environ.get("BROKERFL_RABBITMQ_NODE") or "rabbit@localhost").split("@")[0]
    )
    first = int(os.environ.get("BROKERFL_CLUSTER_PORT") or (urlsplit(amqp_url).port or 5672) + 200)
    return [(f"{base}c{i}@localhost", first + i - 1) for i in (1, 2, 3)]


def _ctl(node: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run(["rabbitmqctl", "-n", node, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl -n {node} {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout


def _os_pid(node: str) -> int:
    return int(_ctl(node, "eval", "os:getpid().").strip().strip('"'))


@pytest.fixture(scope="module")
def cluster(amqp_url):
    """Three nodes joined into one cluster; every node stopped and its directory removed
    afterwards, whatever happened."""
    if shutil.which("rabbitmq-server") is None or os.geteuid() != 0:
        reason = (
            "a RabbitMQ cluster on this machine needs rabbitmq-server and root (to hand the node directories to the "
            "rabbitmq user)"
        )
        if os.environ.get("BROKERFL_REQUIRE_BROKER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    nodes = _cluster_settings(amqp_url)
    root = Path(tempfile.mkdtemp(prefix="brokerfl-cluster-"))
    started: list[tuple[str, Path]] = []
    try:
        for node, port in nodes:
            base = root / node.split("@")[0]
            base.mkdir()
            (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n")
            (base / "enabled_plugins").write_text("[].\n")
            subprocess.run(
                ["rabbitmq-server", "-detached"],
                env=_node_env(node, port, base),
                check=True,
                capture_output=True,
                timeout=60,
            )
            started.append((node, base))
        subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(root)], check=False)
        root.chmod(0o755)
        for node, _base in started:
            _ctl(node, "wait", "--timeout", "120", str(base / "pid"), timeout=150)
        first = nodes[0][0]
        for node, _ in nodes[1:]:
            _ctl(node, "stop_app")
            _ctl(node, "join_cluster", first)
            _ctl(node, "start_app")
        running = json.loads(_ctl(first, "cluster_status", "--formatter", "json"))["running_nodes"]
        assert sorted(running) == sorted(n for n, _ in nodes), running
        yield [(node, f"amqp://guest:guest@127.0.0.1:{port}/") for node, port in nodes]
    finally:
        for node, _base in started:
            try:
                pid = _os_pid(node)
                _ctl(node, "stop", timeout=60)
            except Exception:  # noqa: BLE001 - killed by the test, or never came up: kill what is left
                pid = None
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        _kill_leftover_beams(root)
        shutil.rmtree(root, ignore_errors=True)


def _kill_leftover_beams(root: Path) -> None:
    """A node whose rabbitmqctl stop failed: its beam runs with our directory in its arguments."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(root).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def _spawn(log: Path, *args: str) -> subprocess.Popen:
    """A brokerfl process whose output goes to ``log`` (kept when the process hangs). With
    faulthandler on, SIGABRT makes it write every thread's stack there before it dies."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )


def _finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float, brokers_view=lambda: "") -> list[str]:
    """Wait for every process until one deadline, then end what is left with SIGABRT (its
    stacks go to its log) and SIGKILL; the outputs. A process still running at the deadline
    fails the test, with its output, its stacks and ``brokers_view()`` (the channels as the
    broker sees them, taken while the hung process still holds them)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    hung = [proc.args[3] for proc in procs if proc.poll() is None]
    view = ""
    if hung:
        try:
            view = brokers_view()
        except Exception as exc:  # noqa: BLE001 - a diagnostic; the failure below is what counts
            view = f"(no broker view: {exc})"
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGABRT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    assert not hung, (
        f"{hung} still running after {timeout:g} s:\n"
        + "\n".join(f"--- {log.name}\n{out[-20000:]}" for log, out in zip(logs, outputs))
        + f"\n--- channels\n{view}"
    )
    return outputs


def _channels(nodes: list[str]) -> str:
    """What the reachable nodes say about their channels and consumers."""
    out = []
    for node in nodes:
        try:
            out.append(
                f"{node}:\n"
                + _ctl(
                    node,
                    "list_channels",
                    "pid",
                    "connection",
                    "number",
                    "consumer_count",
                    "messages_unacknowledged",
                    "prefetch_count",
                    timeout=30,
                )
                + _ctl(
                    node,
                    "list_consumers",
                    "queue_name",
                    "channel_pid",
                    "consumer_tag",
                    "prefetch_count",
                    "active",
                    timeout=30,
                )
            )
        except Exception as exc:  # noqa: BLE001 - the killed node, or one too slow to answer
            out.append(f"{node}: {exc}")
    return "\n".join(out)


def _queues(node: str, run: str) -> dict[str, dict]:
    rows = json.loads(_ctl(node, "list_queues", "name", "type", "leader", "members", "--formatter", "json"))
    return {row["name"]: row for row in rows if run in row["name"]}


@pytest.mark.timeout(1200)  # the nodes' start and stop included; the run itself is bounded below
def test_killing_the_node_that_leads_the_server_queue_costs_nothing(cluster, run_name, tmp_path):
    """A FedAvg run over a 3-node cluster, every process given the three URLs. The run's
    queues are quorum queues (the journal and models streams) with a member on every node;
    when round 1 is stored, the node leading the server queue is kill -9'd. Every process
    fails over to another node, the run completes, and accounting and replay pass. Bounded:
    a process still running 240 s after the kill fails the test, with its output, its
    stacks and the channels the surviving nodes list. ``BROKERFL_CLUSTER_LOG_LEVEL=info``
    logs each reconnect too."""
    import yaml

    (names, urls) = zip(*cluster)
    clients, rounds = 3, 5
    config_path = tmp_path / "slow.yaml"  # clients train 3x slower: rounds of seconds, so the kill lands mid-run
    data = yaml.safe_load(open("configs/digits_fedavg.yaml"))
    data["client_slowdown"] = {str(i): 3.0 for i in range(clients)}
    # a round whose task could not be sent while the cluster failed over is retried at its
    # deadline (strategy.on_too_few: retry): a short one keeps that within the test's time
    data["strategy"]["round_deadline_s"] = 30
    data["strategy"]["join_timeout_s"] = 300  # the client starts once the server's queues are looked up
    # One process trains the three clients one after another and sends no heartbeat meanwhile:
    # on a loaded machine that is over 10 s (the default timeout), and the first client would
    # not be sampled for the next round (rounds of 2 updates). Liveness is not what this tests.
    data["liveness"] = {"timeout_s": 300}
    config_path.write_text(yaml.safe_dump(data))
    common = [
        str(config_path),
        "--broker",
        ",".join(urls),
        "--replicated-queues",
        "--run",
        run_name,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--log-level",
        os.environ.get("BROKERFL_CLUSTER_LOG_LEVEL", "warning"),
    ]
    logs = {"server": tmp_path / "server.log", "client": tmp_path / "client.log"}
    server = _spawn(logs["server"], "server", *common, "--out", str(tmp_path))
    procs = [server]
    metrics = tmp_path / "metrics.jsonl"
    try:
        # The server's queues are declared before any client starts (the server waits for
        # its clients to join), so the node to kill is known before round 1: rabbitmqctl
        # takes seconds on a loaded machine, and a run of five short rounds would be over
        # before a leader looked up after round 1 was killed.
        server_queue = f"brokerfl.{run_name}.server"
        leader = wait_until(
            lambda: _queues(names[1], run_name).get(server_queue, {}).get("leader"), 180, "the server's queue"
        )
        leader_pid = _os_pid(leader)
        procs.append(_spawn(logs["client"], "client", *common, "--client-id", f"0-{clients - 1}"))
        wait_until(lambda: metrics.exists() and len(read_metrics(metrics)) >= 1, 180, "round 1")
        os.kill(leader_pid, signal.SIGKILL)
        stored_before_kill = len(read_metrics(metrics))
        survivor = next(n for n in names if n != leader)
        # right after the kill a survivor may list the queue without it, or without a leader
        wait_until(
            lambda: _queues(survivor, run_name).get(server_queue, {}).get("leader", "") not in ("", leader),
            60,
            "a new leader",
        )
    finally:
        outputs = _finish(
            procs, list(logs.values())[: len(procs)], timeout=240, brokers_view=lambda: _channels(list(names))
        )
    assert [p.returncode for p in procs] == [0, 0], outputs
    queues = _queues(survivor, run_name)  # quorum: server, dead, admin, a queue per client; streams: journal, models
    expected = {
        f"brokerfl.{run_name}.{q}"
        for q in ("server", "dead", "admin", "journal", *(f"client.{i}" for i in range(clients)))
    }
    assert expected <= set(queues) and {q["type"] for q in queues.values()} == {"quorum", "stream"}, queues
    assert all(sorted(q["members"]) == sorted(names) for q in queues.values()), queues
    assert stored_before_kill < rounds  # the node died mid-run
    assert all("amqp.connection_lost" in out for out in outputs), outputs  # every process failed over
    assert [r["round"] for r in read_metrics(metrics)] == list(range(1, rounds + 1))
    assert all(r["num_updates"] == clients for r in read_metrics(metrics))
    config = load_config(
        config_path, {"run": run_name, "clients": clients, "rounds": rounds, "replicated_queues": True}
    )
    from brokerfl.transports.amqp import AmqpTransport

    with AmqpTransport([u for n, u in cluster if n != leader]) as transport:
        report = account_run(transport, topology_for(config), DirectoryModelStore(tmp_path / "models"))
        assert report.ok, report.summary()
        replayed = replay(read_journal(transport, topology_for(config)), config)
        assert replayed.ok, replayed.table()
