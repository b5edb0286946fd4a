"""A Flower app over RabbitMQ, with faults: kill -9 of a node's process in every round, and
of the server at three random moments. Each run must complete, its accounting must find
every reply used exactly once (or not used with a recorded reason), its journal must
recompute the ServerApp's weighted means, and its final arrays must be the very bits of an
uninterrupted run's (the ServerApp resumed by durable execution)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from brokerfl.assembly.roles import topology_for  # noqa: E402
from brokerfl.assembly.simulate import simulate  # noqa: E402
from brokerfl.config import load_config  # noqa: E402
from brokerfl.flower.audit import check_weighted_means  # noqa: E402
from brokerfl.storage.accounting import account  # noqa: E402
from brokerfl.storage.journal import read_journal  # noqa: E402
from brokerfl.storage.metrics_log import read_metrics  # noqa: E402

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]
ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "tests" / "flower_apps" / "tiny"


def write_config(path: Path, run: str, *, clients: int, rounds: int, final: Path, slow_s: float, nodes: Path) -> Path:
    path.write_text(
        f"run: {run}\nclients: {clients}\nflower_app: {APP}\nclient_state_dir: {nodes}\n"
        f"flower_config: {{num-server-rounds: {rounds}, final-model: {final}, slow-s: {slow_s}}}\n"
        "liveness: {heartbeat_s: 1.0}\n"
    )
    return path


class FlowerFederation:
    def __init__(self, url: str, config: Path, out: Path, clients: int) -> None:
        self.url, self.config, self.out, self.clients = url, config, out, clients
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.server: subprocess.Popen | None = None
        self.nodes: dict[str, subprocess.Popen] = {}
        self.starts = 0

    def _spawn(self, *args: str) -> subprocess.Popen:
        self.starts += 1
        log = open(self.logs / f"{self.starts:03d}-{args[0]}.log", "w")  # noqa: SIM115 - closed with the process
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "brokerfl.cli",
                *args,
                str(self.config),
                "--broker",
                self.url,
                "--log-level",
                "warning",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def start_server(self) -> None:
        self.server = self._spawn("server", "--out", str(self.out))

    def start_node(self, client_id: str) -> None:
        self.nodes[client_id] = self._spawn("client", "--client-id", client_id)

    def start(self) -> None:
        self.start_server()
        for i in range(self.clients):
            self.start_node(str(i))

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def lines(self) -> int:
        path = self.out / "metrics.jsonl"
        return len(read_metrics(path)) if path.exists() else 0

    def wait_for_lines(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.lines() < n:
            assert self.server.poll() in (None, 0), self.tail()
            assert time.monotonic() < deadline, f"only {self.lines()} of {n} metrics lines: {self.tail()}"
            time.sleep(0.05)  # polling a file the server appends to, under a deadline

    def finish(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        procs = [self.server, *self.nodes.values()]
        for proc in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        stuck = [p for p in procs if p.poll() is None]
        for proc in stuck:
            proc.kill()
            proc.wait()
        assert not stuck, f"{len(stuck)} processes did not exit: {self.tail()}"
        assert all(p.returncode == 0 for p in procs), self.tail()

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-12:])
            for p in sorted(self.logs.glob("*.log"))[:1] + sorted(self.logs.glob("*.log"))[-3:]
        )

    def cleanup(self) -> None:
        for proc in [self.server, *self.nodes.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def uninterrupted_arrays(run: str, clients: int, rounds: int, tmp_path: Path) -> list[np.ndarray]:
    """The same run (same name, so the same node ids and sampling) in one process, without
    faults (and without the sleeps, which change no number)."""
    reference = tmp_path / "reference.npz"
    config = write_config(
        tmp_path / "reference.yaml", run, clients=clients, rounds=rounds, final=reference, slow_s=0.0, nodes=tmp_path
    )
    simulate(load_config(config), tmp_path / "simulated")
    return _arrays(reference)


def _arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[key] for key in saved.files]


def check(url: str, config_path: Path, final: Path, tmp_path: Path, *, clients: int, rounds: int) -> None:
    from brokerfl.transports.amqp import AmqpTransport

    config = load_config(config_path)
    with AmqpTransport(url) as transport:
        report = account(read_journal(transport, topology_for(config)), [], run=config.run)
    print(report.summary())
    assert report.ok and report.flower, report.summary()
    with AmqpTransport(url) as transport:
        rows = check_weighted_means(read_journal(transport, topology_for(config)))
    assert rows and all(row.ok for row in rows), rows
    got, expected = _arrays(final), uninterrupted_arrays(config.run, clients, rounds, tmp_path)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and np.array_equal(a, b), "not the bits of an uninterrupted run"


@pytest.fixture
def nodes_and_server(amqp_url, run_name, tmp_path):
    made: list[FlowerFederation] = []

    def make(config: Path, clients: int) -> FlowerFederation:
        made.append(FlowerFederation(amqp_url, config, tmp_path / "out", clients))
        return made[-1]

    yield make
    for fed in made:
        fed.cleanup()
    from brokerfl.transports.amqp import AmqpTransport

    with AmqpTransport(amqp_url) as admin:
        topology_for(load_config(made[0].config)).delete(admin, [str(i) for i in range(made[0].clients)])


def test_kill_9_of_a_node_in_every_round(amqp_url, run_name, tmp_path, nodes_and_server):
    final = tmp_path / "final.npz"
    config = write_config(
        tmp_path / "run.yaml", run_name, clients=3, rounds=4, final=final, slow_s=1.0, nodes=tmp_path / "nodes"
    )
    fed = nodes_and_server(config, 3)
    rng = random.Random(5)
    fed.start()
    for round_ in range(1, 5):
        fed.wait_for_lines(2 * (round_ - 1))  # a train and an evaluate line per round
        time.sleep(rng.uniform(0.2, 0.8))  # inside the round's training (each node trains 1 s)
        victim = str(rng.randrange(3))
        fed.kill(fed.nodes[victim])
        fed.start_node(victim)  # its request comes again; its context is on disk
    fed.finish()
    check(amqp_url, config, final, tmp_path, clients=3, rounds=4)


def test_kill_9_of_the_server_at_three_random_moments(amqp_url, run_name, tmp_path, nodes_and_server):
    final = tmp_path / "final.npz"
    config = write_config(
        tmp_path / "run.yaml", run_name, clients=3, rounds=5, final=final, slow_s=0.4, nodes=tmp_path / "nodes"
    )
    fed = nodes_and_server(config, 3)
    rng = random.Random(13)
    fed.start()
    for line in sorted(rng.sample(range(1, 9), 3)):
        fed.wait_for_lines(line)
        time.sleep(rng.uniform(0.0, 0.4))
        fed.kill(fed.server)
        fed.start_server()  # re-runs the ServerApp; the journal answers what it already asked
    fed.finish()
    check(amqp_url, config, final, tmp_path, clients=3, rounds=5)
