"""Seconds per round of a real federation over RabbitMQ: one server process and N client
processes, one local batch per round, with the journal on; for models of 100k and 10M
parameters (an MLP on digits whose hidden sizes give that many parameters).

    python benchmarks/round_time.py [--sizes 100k 10M] [--rounds 12] [--clients 4]

Prints the median seconds per round (the first round, which includes start-up, is left
out) and where the time goes: the server's phases (decode, fold, evaluate, store, encode,
publish, ack) and the clients' training, per round, medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402

# hidden sizes [h, h] on digits (64 features, 10 classes): h*h + 74h + 2h + 10 parameters
HIDDEN = {"100k": 282, "1M": 960, "10M": 3130}


def parameter_count(h: int) -> int:
    return 64 * h + h + h * h + h + h * 10 + 10


def run_federation(
    size: str,
    *,
    rounds: int,
    clients: int,
    url: str,
    journal: bool,
    workdir: Path,
    inspect_run=None,
    extra: dict | None = None,
    model_transfer: str = "auto",
    watch=None,
) -> list[dict]:
    """Run a federation to the end; ``inspect_run(run, config_path, out_dir)`` is called
    before the run's queues are deleted; ``extra``: more config keys (e.g. compression);
    ``watch(pids, out_dir)`` once every process is started (round_floor.py meters their CPU)."""
    run = f"bench-{size}-{uuid.uuid4().hex[:6]}"
    config = {
        "run": run,
        "seed": 0,
        "rounds": rounds,
        "clients": clients,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"hidden": [HIDDEN[size]] * 2},
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.01, "momentum": 0.0, "max_batches": 1},
        "strategy": {"name": "fedavg", "min_clients": clients, "round_deadline_s": 300},
        "journal": journal,
        "model_transfer": model_transfer,
        **(extra or {}),
    }
    path = workdir / f"{run}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    out = workdir / run
    env = {**os.environ, "BROKERFL_AMQP_URL": url}
    common = [str(path), "--log-level", "warning"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "server", *common, "--out", str(out)], cwd=ROOT, env=env
        )
    ]
    procs += [
        subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "client", *common, "--client-id", str(i)], cwd=ROOT, env=env
        )
        for i in range(clients)
    ]
    try:
        if watch is not None:
            watch([proc.pid for proc in procs], out)
        for proc in procs:
            if proc.wait(timeout=60 + 30 * rounds) != 0:
                raise SystemExit(f"a process of run {run} exited with {proc.returncode}")
        if inspect_run is not None:
            inspect_run(run, path, out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        with AmqpTransport(url) as admin:
            RunTopology(run).delete(admin, [str(i) for i in range(clients)])
    return read_metrics(out / "metrics.jsonl")


def summarise(size: str, records: list[dict]) -> dict:
    steady = records[1:] or records
    phases: dict[str, list[float]] = {}
    for record in steady:
        for name, seconds in record["server_s"].items():
            phases.setdefault(name, []).append(seconds)
    return {
        "size": size,
        "parameters": parameter_count(HIDDEN[size]),
        "median_round_s": statistics.median(r["duration_s"] for r in steady),
        "server_phases_s": {k: round(statistics.median(v), 4) for k, v in sorted(phases.items())},
        "client_train_s": round(statistics.median(r["client_train_s"] for r in steady), 4),
        "rounds": len(records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["100k", "10M"], choices=sorted(HIDDEN))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--no-journal", action="store_true")
    parser.add_argument(
        "--model-transfer",
        default="auto",
        choices=["auto", "reference", "inline"],
        help="how tasks carry the model (config model_transfer)",
    )
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    goals = {"100k": 0.5, "10M": 2.5}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            started = time.perf_counter()
            records = run_federation(
                size,
                rounds=args.rounds,
                clients=args.clients,
                url=args.broker,
                journal=not args.no_journal,
                workdir=Path(tmp),
                model_transfer=args.model_transfer,
            )
            result = summarise(size, records)
            goal = goals.get(size)
            verdict = (
                ""
                if goal is None
                else f"  (goal <= {goal} s: {'met' if result['median_round_s'] <= goal else 'NOT met'})"
            )
            print(
                f"{size:>5} ({result['parameters']:,} parameters), {args.clients} client processes, journal "
                f"{'off' if args.no_journal else 'on'}, model_transfer {args.model_transfer}: "
                f"median {result['median_round_s']:.3f} s per round over {result['rounds'] - 1} rounds{verdict}; whole "
                f"run {time.perf_counter() - started:.1f} s"
            )
            print(f"       server phases per round (median s): {result['server_phases_s']}")
            print(f"       client training per round (median s): {result['client_train_s']}")


if __name__ == "__main__":
    main()
