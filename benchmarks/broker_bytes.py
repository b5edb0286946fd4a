"""Bytes the broker carries per round: a real federation over RabbitMQ, with the bytes in
and out of every AMQP connection (``rabbitmqctl list_connections recv_oct send_oct``)
sampled after two steady versions; the difference over the rounds between is per round.

    python benchmarks/broker_bytes.py [--size 10M] [--clients 4] [--rounds 6]

Needs ``rabbitmqctl`` for the node (``$BROKERFL_RABBITMQ_NODE``, e.g. h1@localhost).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from round_time import HIDDEN, parameter_count, run_federation  # noqa: E402

from brokerfl.storage.metrics_log import read_metrics  # noqa: E402


def connection_bytes(node: str) -> dict[str, tuple[int, int]]:
    """(bytes received, bytes sent) by the broker, per connection name."""
    out = subprocess.run(
        ["rabbitmqctl", "-n", node, "-q", "list_connections", "name", "recv_oct", "send_oct"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        parts = line.rsplit("\t", 2)
        if len(parts) == 3 and parts[1].isdigit():
            result[parts[0]] = (int(parts[1]), int(parts[2]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10M", choices=sorted(HIDDEN))
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--model-transfer", default="auto", choices=["auto", "reference", "inline"])
    parser.add_argument("--node", default=os.environ.get("BROKERFL_RABBITMQ_NODE", "rabbit@localhost"))
    args = parser.parse_args()
    first, last = 2, args.rounds - 1  # versions between which bytes are counted (start-up and finish left out)
    samples: dict[int, dict[str, tuple[int, int]]] = {}
    done = threading.Event()

    def sample(out_dir: Path) -> None:
        metrics = out_dir / "metrics.jsonl"
        while not done.is_set() and len(samples) < 2:
            versions = len(read_metrics(metrics)) if metrics.exists() else 0
            for v in (first, last):
                if versions >= v and v not in samples:
                    samples[v] = connection_bytes(args.node)
            time.sleep(0.05)  # polling a file the server appends to

    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        watcher: list[threading.Thread] = []
        original = run_federation.__globals__["subprocess"].Popen

        def popen_watching(cmd, *a, **kw):  # start the sampler once the server's --out is known
            if "server" in cmd and not watcher:
                out_dir = Path(cmd[cmd.index("--out") + 1])
                watcher.append(threading.Thread(target=sample, args=(out_dir,), daemon=True))
                watcher[0].start()
            return original(cmd, *a, **kw)

        run_federation.__globals__["subprocess"].Popen = popen_watching
        try:
            run_federation(
                args.size,
                rounds=args.rounds,
                clients=args.clients,
                url=args.broker,
                journal=True,
                workdir=workdir,
                **({"model_transfer": args.model_transfer} if args.model_transfer != "auto" else {}),
            )
        finally:
            run_federation.__globals__["subprocess"].Popen = original
            done.set()
    if len(samples) < 2:
        raise SystemExit("the run ended before both samples were taken")
    a, b = samples[first], samples[last]
    common = set(a) & set(b)
    recv = sum(b[c][0] - a[c][0] for c in common)
    sent = sum(b[c][1] - a[c][1] for c in common)
    rounds = last - first
    model_mb = parameter_count(HIDDEN[args.size]) * 4 / 1e6
    print(
        f"{args.size} ({model_mb:.1f} MB float32), {args.clients} client processes, journal on, model_transfer "
        f"{args.model_transfer}: per round the broker received "
        f"{recv / rounds / 1e6:.1f} MB and sent {sent / rounds / 1e6:.1f} MB "
        f"({(recv + sent) / rounds / 1e6 / model_mb:.2f} models), "
        f"over versions {first}..{last} on {len(common)} connections"
    )
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
