"""Peak RSS of one client process hosting many logical clients, over RabbitMQ.

    python benchmarks/client_memory.py [--logical 16] [--size 10M] [--rounds 3]

Runs a server and ONE `brokerfl client` process hosting ``--logical`` logical clients
(FedAvg, every client sampled every round, journal on), and samples the client process's
RSS (VmRSS, and VmHWM, the kernel's peak) until it exits. The same run with a tiny model
(hidden [16, 16]) is the baseline: the difference is what the model costs the process,
quoted as a multiple of the model's size (float32 parameters). With ``--node`` (or
``$BROKERFL_RABBITMQ_NODE``) it also samples the bytes the broker sends and receives on
every connection (``rabbitmqctl list_connections``, sampled in a loop): per round, over the
whole run, start-up included. A lower bound only: what a connection carried after its last
sample before it closed is missed (under load, a whole round's worth).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402

HIDDEN = {"tiny": 16, "100k": 282, "1M": 960, "10M": 3130}


def parameter_count(h: int) -> int:
    return 64 * h + h + h * h + h + h * 10 + 10


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def connection_bytes(node: str) -> dict[str, int]:
    """Bytes received + sent by the broker, per connection name."""
    out = subprocess.run(
        ["rabbitmqctl", "-n", node, "-q", "list_connections", "name", "recv_oct", "send_oct"],
        capture_output=True,
        text=True,
    ).stdout
    result = {}
    for line in out.splitlines():
        parts = line.rsplit("\t", 2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            result[parts[0]] = int(parts[1]) + int(parts[2])
    return result


def run(size: str, *, logical: int, rounds: int, url: str, workdir: Path, node: str | None = None) -> dict[str, float]:
    """Peak RSS (MiB) of the client process hosting ``logical`` clients."""
    run_name = f"cmem-{size}-{uuid.uuid4().hex[:6]}"
    config = {
        "run": run_name,
        "seed": 0,
        "rounds": rounds,
        "clients": logical,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"hidden": [HIDDEN[size]] * 2},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "momentum": 0.0, "max_batches": 1},
        "strategy": {"name": "fedavg", "min_clients": logical, "round_deadline_s": 600},
        "journal": True,
    }
    path = workdir / f"{run_name}.yaml"
    path.write_text(json.dumps(config))
    env = {**os.environ, "BROKERFL_AMQP_URL": url}
    common = [str(path), "--log-level", "warning"]
    server = subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", "server", *common, "--out", str(workdir / run_name)], cwd=ROOT, env=env
    )
    client = subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", "client", *common, "--client-id", f"0-{logical - 1}"], cwd=ROOT, env=env
    )
    peak_rss = peak_hwm = 0
    seen: dict[str, int] = {}
    stop = threading.Event()

    def sample_bytes() -> None:
        while node and not stop.is_set():
            for name, count in connection_bytes(node).items():
                seen[name] = max(seen.get(name, 0), count)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample_bytes, daemon=True)
    sampler.start()
    try:
        deadline = time.monotonic() + 120 + 120 * rounds
        while client.poll() is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"run {run_name} did not finish in time")
            status = _status_kib(client.pid)
            peak_rss = max(peak_rss, status.get("VmRSS", 0))
            peak_hwm = max(peak_hwm, status.get("VmHWM", 0))
            time.sleep(0.05)  # sampling a process's memory, not synchronising
        if client.returncode != 0 or server.wait(timeout=120) != 0:
            raise SystemExit(f"run {run_name}: client exited {client.returncode}, server {server.returncode}")
    finally:
        stop.set()
        for proc in (server, client):
            if proc.poll() is None:
                proc.kill()
        with AmqpTransport(url) as admin:
            RunTopology(run_name).delete(admin, [str(i) for i in range(logical)])
    return {
        "peak_rss_mib": peak_rss / 1024,
        "peak_hwm_mib": peak_hwm / 1024,
        "broker_mb_per_round": sum(seen.values()) / rounds / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logical", type=int, nargs="+", default=[16])
    parser.add_argument("--size", default="10M", choices=sorted(HIDDEN))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--node", default=os.environ.get("BROKERFL_RABBITMQ_NODE"), help="rabbitmqctl node, to count the broker's bytes"
    )
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    model_mib = parameter_count(HIDDEN[args.size]) * 4 / 2**20
    allocator = (
        os.environ.get("BROKERFL_MALLOC")
        or "BROKERFL_MALLOC unset (the CLI chooses: tuned for one logical client, lean for several)"
    )
    print(
        f"allocator: {allocator}; load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
        f"{os.getloadavg()[2]:.2f}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for logical in args.logical:
            base = run("tiny", logical=logical, rounds=args.rounds, url=args.broker, workdir=Path(tmp))
            big = run(
                args.size, logical=logical, rounds=args.rounds, url=args.broker, workdir=Path(tmp), node=args.node
            )
            above = big["peak_hwm_mib"] - base["peak_hwm_mib"]
            print(
                f"{logical:>4} logical clients in one process, {args.rounds} rounds: peak RSS "
                f"{big['peak_hwm_mib']:.0f} MiB with the {args.size} model "
                f"({model_mib:.1f} MiB), {base['peak_hwm_mib']:.0f} MiB with a tiny model: {above:.0f} MiB above = "
                f"{above / model_mib:.2f}x the model"
                + (
                    f"; the broker carried {big['broker_mb_per_round']:.0f} MB per round (in + out, start-up included)"
                    if args.node
                    else ""
                )
            )
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")


if __name__ == "__main__":
    main()
