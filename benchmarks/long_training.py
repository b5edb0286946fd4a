"""Local training that takes minutes, over RabbitMQ: do the clients keep their connections,
and does the server see them live and training the whole time?

One server process and N client processes (one logical client each) of the test app
``tests/slow_apps.py``, whose ``train`` takes ``--train-s`` seconds (sleeping: an idle
process, as one waiting on a GPU); the transport's default AMQP heartbeat (30 s) and
liveness timeout (10 s), both far shorter than the training.

    python benchmarks/long_training.py [--train-s 150] [--rounds 3] [--clients 3]

Prints, per process, how many times it lost its broker connection (``amqp.connection_lost``
in its log) and the other symptoms of a blocked I/O loop; the seconds of every round; and
the server's status sampled during each round's training (every sampled client live, and
training for how long).
"""

from __future__ import annotations

import argparse
import json
import os
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
from brokerfl.transports.base import TransportError  # noqa: E402

SYMPTOMS = ("amqp.connection_lost", "amqp.reconnected", "settle_dropped", "task already answered")


def status_of(url: str, topology) -> dict | None:
    """The server's status, or None (not started yet, or the broker did not answer: on a
    loaded machine a connection attempt can time out; the next sample tries again)."""
    try:
        with AmqpTransport(url) as transport:
            reply = ask(transport, topology, StatusRequest(), timeout=10)
    except TransportError:
        return None
    return None if reply is None else reply.status


def delete_run(url: str, topology, clients: int) -> None:
    for attempt in range(5):
        try:
            with AmqpTransport(url) as admin:
                topology.delete(admin, [str(i) for i in range(clients)])
            return
        except TransportError as exc:
            print(f"deleting the run's queues failed ({exc}); again", file=sys.stderr)
            time.sleep(2.0 * (attempt + 1))


def losses(log: str) -> list[dict]:
    """The ``amqp.connection_lost`` entries of a process's log (JSON lines)."""
    found = []
    for line in log.splitlines():
        if "amqp.connection_lost" not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = {"cause": line[:200]}
        found.append(entry)
    return found


def training_view(status: dict) -> str:
    clients = {c["id"]: c for c in status["clients"]}
    parts = []
    for cid in status["participants"]:
        c = clients.get(cid)
        if c is None:
            parts.append(f"{cid}: unknown")
            continue
        training = "-" if c["training_s"] is None else f"{c['training_s']:.1f} s"
        parts.append(
            f"{cid}: {'live' if c['live'] else 'SILENT'}, training {training}, seen {c['last_seen_s']:.1f} s ago"
        )
    live = sum(c["live"] for c in status["clients"])
    return (
        f"round {status['round']} open {status['round_age_s']} s; live {live} of {status['clients_expected']}; "
        + "; ".join(parts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-s", type=float, default=150.0, help="seconds each local training takes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()

    run = f"bench-long-{uuid.uuid4().hex[:6]}"
    config = {
        "run": run,
        "seed": 0,
        "rounds": args.rounds,
        "clients": args.clients,
        "app": "tests.slow_apps",
        "app_options": {"train_s": args.train_s},
        "strategy": {
            "name": "fedavg",
            "fraction": 1.0,
            "min_clients": args.clients,
            "round_deadline_s": args.train_s * 3 + 60,
        },
    }
    topology = topology_for(load_config(None, {"run": run, "clients": args.clients}))
    with tempfile.TemporaryDirectory(prefix="brokerfl-long-") as tmp:
        work = Path(tmp)
        path = work / "run.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        common = [str(path), "--broker", args.broker, "--log-level", "info"]
        logs: dict[str, Path] = {}
        procs: dict[str, subprocess.Popen] = {}

        def spawn(name: str, *extra: str) -> None:
            logs[name] = work / f"{name}.log"
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "brokerfl.cli", *extra[:1], *common, *extra[1:]],
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

        started = time.monotonic()
        spawn("server", "server", "--out", str(work / "out"))
        for i in range(args.clients):
            spawn(f"client-{i}", "client", "--client-id", str(i))
        samples: list[str] = []
        sampled_rounds: set[int] = set()
        try:
            while procs["server"].poll() is None:
                status = status_of(args.broker, topology)
                # one sample per round, once its training has gone on a while (past the liveness timeout)
                if (
                    status
                    and status["round_open"]
                    and status["round"] not in sampled_rounds
                    and (status["round_age_s"] or 0) > min(30.0, args.train_s / 2)
                ):
                    sampled_rounds.add(status["round"])
                    samples.append(training_view(status))
                    print(f"[{time.monotonic() - started:6.1f} s] {samples[-1]}", flush=True)
                time.sleep(2.0)
            for proc in procs.values():
                proc.wait(timeout=120)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            delete_run(args.broker, topology, args.clients)
        total = time.monotonic() - started

        print(
            f"\n{args.clients} clients, {args.rounds} rounds, training {args.train_s:g} s, AMQP heartbeat 30 s "
            f"(default), liveness timeout 10 s; {total:.0f} s in all"
        )
        print("\nper process: " + ", ".join(SYMPTOMS) + "; exit code; when each connection was lost (UTC), and why")
        for name, log in logs.items():
            text = log.read_text()
            counts = ", ".join(str(text.count(s)) for s in SYMPTOMS)
            print(f"  {name:10s} {counts}; exit {procs[name].returncode}")
            # a loss at the same moment in every process (the server too, which does not
            # train) is the broker's doing, e.g. `rabbitmqctl close_all_connections`
            for entry in losses(text):
                print(f"    lost at {entry.get('timestamp', '?')[11:19]}: {entry.get('cause', '?')}")
        records = (
            [r for r in read_metrics(work / "out" / "metrics.jsonl") if "evaluation" not in r]
            if (work / "out" / "metrics.jsonl").exists()
            else []
        )
        print(
            "\nround times (s): "
            + ", ".join(
                f"round {r['round']}: {r['duration_s']:.1f} (clients trained {r['client_train_s']:.1f})"
                for r in records
            )
        )
        print("\nstatus during training (one sample per round):")
        for sample in samples:
            print(f"  {sample}")


if __name__ == "__main__":
    main()
