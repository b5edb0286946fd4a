"""Many logical clients over RabbitMQ: N logical clients in P client processes (one
consumer, so one channel, per logical client; a connection holds channel_max - 3 of them),
a FedAvg run of R rounds on mnist5k (4,000 training images: 2 per client at N = 2,000).

    python benchmarks/many_clients_amqp.py [--clients 2000] [--processes 4] [--rounds 5]

Prints seconds per round (from the server's metrics), the broker's memory (``rabbitmqctl
status``: memory total, sampled every second; peak and at the end) and the client
processes' peak RSS, with the load. Liveness is relaxed for this size (heartbeat every
10 s, silent 300 s = dead): a process trains its hundreds of clients one after another.
Needs ``rabbitmqctl`` for the node (``$BROKERFL_RABBITMQ_NODE``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402


def broker_memory_mib(node: str) -> float | None:
    out = subprocess.run(["rabbitmqctl", "-n", node, "status", "--formatter", "json"], capture_output=True, text=True)
    try:
        return json.loads(out.stdout)["memory"]["total"]["erlang"] / 2**20
    except (ValueError, KeyError, TypeError):
        return None


def _hwm_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dataset", default="mnist5k")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--node", default=os.environ.get("BROKERFL_RABBITMQ_NODE", "rabbit@localhost"))
    args = parser.parse_args()
    run = f"many-{args.clients}-{uuid.uuid4().hex[:6]}"
    config = {
        "run": run,
        "seed": 0,
        "rounds": args.rounds,
        "clients": args.clients,
        "data": {"dataset": args.dataset, "partition": "iid"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "max_batches": 1},
        "strategy": {"name": "fedavg", "min_clients": args.clients, "round_deadline_s": 1800, "join_timeout_s": 1800},
        "liveness": {"heartbeat_s": 10.0, "timeout_s": 300.0},
    }
    print(
        f"load before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; broker memory "
        f"{broker_memory_mib(args.node):.0f} MiB"
    )
    memory: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            value = broker_memory_mib(args.node)
            if value is not None:
                memory.append(value)
            done.wait(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{run}.yaml"
        path.write_text(json.dumps(config))
        out = Path(tmp) / run
        env = {**os.environ, "BROKERFL_AMQP_URL": args.broker}
        common = [str(path), "--log-level", "warning"]
        per = -(-args.clients // args.processes)
        ranges = [f"{lo}-{min(lo + per, args.clients) - 1}" for lo in range(0, args.clients, per)]
        started = time.perf_counter()
        sampler.start()
        server = subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "server", *common, "--out", str(out)], cwd=ROOT, env=env
        )
        clients = [
            subprocess.Popen(
                [sys.executable, "-m", "brokerfl.cli", "client", *common, "--client-id", r], cwd=ROOT, env=env
            )
            for r in ranges
        ]
        peak_rss = {c.pid: 0.0 for c in clients}
        try:
            deadline = time.monotonic() + 600 + 600 * args.rounds
            while any(p.poll() is None for p in [server, *clients]):
                if time.monotonic() > deadline:
                    raise SystemExit(f"run {run} did not finish in time")
                for c in clients:
                    peak_rss[c.pid] = max(peak_rss[c.pid], _hwm_mib(c.pid))
                time.sleep(0.5)  # sampling memory, not synchronising
            if server.returncode != 0 or any(c.returncode != 0 for c in clients):
                raise SystemExit(
                    f"run {run}: server exited {server.returncode}, clients {[c.returncode for c in clients]}"
                )
            whole = time.perf_counter() - started
            records = [r for r in read_metrics(out / "metrics.jsonl") if "evaluation" not in r]
        finally:
            done.set()
            for proc in [server, *clients]:
                if proc.poll() is None:
                    proc.kill()
            with AmqpTransport(args.broker) as admin:
                RunTopology(run).delete(admin, [str(i) for i in range(args.clients)])
    durations = [r["duration_s"] for r in records]
    print(
        f"{args.clients} logical clients in {args.processes} processes ({', '.join(ranges)}), {args.dataset}: "
        f"{len(records)} rounds, "
        f"seconds per round {[round(d, 2) for d in durations]} (median {statistics.median(durations):.2f} s); whole "
        f"run {whole:.0f} s with start-up"
    )
    print(
        f"broker memory (erlang total): peak {max(memory):.0f} MiB, first sample {memory[0]:.0f} MiB, last "
        f"{memory[-1]:.0f} MiB; "
        f"client process peak RSS {', '.join(f'{v:.0f}' for v in peak_rss.values())} MiB"
    )
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
