"""Ordinary operations that must keep the guarantees, over RabbitMQ, with the figures printed:

1. two servers started on one run, then the active one killed -9: the takeover time (kill
   to the first status answered by the standby), how often status changed servers (1 is
   the only right answer), accounting and ``replay --check`` exit codes;
2. ``admin abort`` mid-round while every client is still training: accounting's exit code
   right after the server exits (no server started again) and after the clients' last
   updates came in, and how many updates were published after the run ended.

    python benchmarks/guarantees.py [--broker URL] [--repeat N]

Long training and a failing app have their own script: ``benchmarks/long_training.py``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.assembly.roles import topology_for  # noqa: E402
from brokerfl.config import load_config  # noqa: E402
from brokerfl.runtime.operator_commands import StatusRequest, ask  # noqa: E402
from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402

CONFIG = ROOT / "configs" / "digits_fedavg.yaml"


class Run:
    def __init__(self, url: str, out: Path, *, clients: int, rounds: int, slowdown: dict[str, float]) -> None:
        self.url, self.out, self.clients = url, out, clients
        self.run = f"bench-guarantees-{uuid.uuid4().hex[:6]}"
        config = out / "config.yaml"
        config.write_text(
            CONFIG.read_text() + "client_slowdown: {" + ", ".join(f'"{k}": {v}' for k, v in slowdown.items()) + "}\n"
        )
        self.args = [
            str(config),
            "--broker",
            url,
            "--run",
            self.run,
            "--clients",
            str(clients),
            "--rounds",
            str(rounds),
            "--log-level",
            "warning",
        ]
        self.topology = topology_for(load_config(CONFIG, {"run": self.run}))
        self.procs: list[subprocess.Popen] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.procs.append(proc)
        return proc

    def server(self, name: str) -> subprocess.Popen:
        return self.spawn(name, "server", *self.args, "--out", str(self.out / name))

    def client(self, cid: str) -> subprocess.Popen:
        return self.spawn(f"client-{cid}", "client", *self.args, "--client-id", cid)

    def versions(self, server: str) -> int:
        path = self.out / server / "metrics.jsonl"
        return len(read_metrics(path)) if path.exists() else 0

    def wait(self, what, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting; logs in {self.out}")
            time.sleep(0.1)

    def cli(self, *args: str) -> int:
        return subprocess.run(
            [sys.executable, "-m", "brokerfl.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
        ).returncode

    def accounting(self) -> int:
        return self.cli("accounting", str(CONFIG), "--broker", self.url, "--run", self.run)

    def replay_check(self) -> int:
        return self.cli("replay", str(CONFIG), "--broker", self.url, "--run", self.run, "--check")

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with AmqpTransport(self.url) as admin:
            self.topology.delete(admin, [str(i) for i in range(self.clients)])


def two_servers(url: str, out: Path) -> dict:
    run = Run(url, out, clients=4, rounds=10, slowdown={"0": 10.0})
    try:
        active = run.server("active")
        for i in range(run.clients):
            run.client(str(i))
        run.wait(lambda: run.versions("active") >= 1)
        standby = run.server("standby")
        answers: list[str | None] = []
        with AmqpTransport(url) as transport:

            def status() -> dict:
                reply = ask(transport, run.topology, StatusRequest(), timeout=1.0)
                answers.append(reply.status.get("server") if reply else None)
                return reply.status if reply else {}

            run.wait(lambda: any(s.endswith(f":{standby.pid}") for s in status().get("standbys", [])))
            run.wait(lambda: run.versions("active") >= 3 and bool(status()))
            active.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            run.wait(lambda: (status().get("server") or "").endswith(f":{standby.pid}"))
            takeover = time.monotonic() - killed
            while standby.poll() is None:
                status()
                time.sleep(0.2)
        servers = [a for a in answers if a]
        changes = sum(1 for i in range(1, len(servers)) if servers[i] != servers[i - 1])
        return {
            "takeover_s": round(takeover, 2),
            "status_answers": len(servers),
            "server_changes": changes,
            "standby_exit": standby.returncode,
            "accounting_exit": run.accounting(),
            "replay_check_exit": run.replay_check(),
        }
    finally:
        run.cleanup()


def abort_mid_round(url: str, out: Path) -> dict:
    run = Run(url, out, clients=3, rounds=20, slowdown={str(i): 30.0 for i in range(3)})
    try:
        server = run.server("server")
        clients = [run.client(str(i)) for i in range(run.clients)]
        run.wait(lambda: run.versions("server") >= 2)
        aborted = run.cli("admin", "abort", "--run", run.run, "--broker", url, "--reason", "benchmark")
        server.wait(timeout=300)
        right_after = run.accounting()
        for proc in clients:
            proc.wait(timeout=300)
        done = subprocess.run(
            [sys.executable, "-m", "brokerfl.cli", "accounting", str(CONFIG), "--broker", url, "--run", run.run],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        after_end = next(
            (
                line.split(":")[1].split(",")[0].strip()
                for line in done.stdout.splitlines()
                if "published after the run ended" in line
            ),
            "?",
        )
        return {
            "abort_exit": aborted,
            "accounting_exit_right_after": right_after,
            "accounting_exit_after_clients": done.returncode,
            "published_after_end": after_end,
        }
    finally:
        run.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    for attempt in range(1, args.repeat + 1):
        with tempfile.TemporaryDirectory(prefix="brokerfl-guarantees-") as tmp:
            load = os.getloadavg()[0]
            (Path(tmp) / "a").mkdir()
            (Path(tmp) / "b").mkdir()
            two = two_servers(args.broker, Path(tmp) / "a")
            ab = abort_mid_round(args.broker, Path(tmp) / "b")
            print(f"run {attempt} (load {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)")
            print("  two servers, active killed -9: " + ", ".join(f"{k} {v}" for k, v in two.items()))
            print("  admin abort mid-round:         " + ", ".join(f"{k} {v}" for k, v in ab.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
