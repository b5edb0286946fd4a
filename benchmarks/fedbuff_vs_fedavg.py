"""Stragglers: synchronous FedAvg against asynchronous FedBuff over RabbitMQ, with real
processes (one server, one process per client), on the same data, model and seed, where 2 of
the 8 clients are 5x slower (``client_slowdown``: after training, a slow client sleeps
(factor - 1) times its training time).

    python benchmarks/fedbuff_vs_fedavg.py [--target 0.95] [--clients 8] [--slow 6 7] [--factor 5]
                                           [--buffer-size 4] [--hidden 128 64] [--epochs 3]

Each run goes until its test accuracy first reaches ``--target`` (or its budget of rounds /
versions is spent), then its processes are stopped and its queues deleted. Reported for
each: the time to the target, which is the sum of the metrics' ``duration_s`` up to the first
version at the target, i.e. the wall time from the beginning of training (the server's
first tasks) to that version (FedAvg's rounds follow each other; each FedBuff version's
duration runs from the previous one); the rounds / versions and client updates used; the
accuracy of the last stored version. Process start-up and joining (``startup_s``) are not
in the time to target; clients warm torch up at start-up (brokerfl.handlers.workflows.client does), before they join.
"""

from __future__ import annotations

import argparse
import json
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

from brokerfl.storage.metrics_log import read_metrics  # noqa: E402
from brokerfl.transports.amqp import AmqpTransport  # noqa: E402
from brokerfl.transports.topology import RunTopology  # noqa: E402


def config_for(strategy: str, args: argparse.Namespace, run: str) -> dict:
    common = {
        "run": run,
        "seed": args.seed,
        "clients": args.clients,
        "data": {"dataset": "digits", "partition": "iid"},
        "model": {"hidden": args.hidden},
        "train": {"epochs": args.epochs, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "client_slowdown": {cid: float(args.factor) for cid in args.slow},
        "journal": True,
    }
    if strategy == "fedavg":  # synchronous: every round waits for all clients, stragglers included
        return {
            **common,
            "rounds": args.max_rounds,
            "strategy": {"name": "fedavg", "min_clients": args.clients, "round_deadline_s": 300},
        }
    options = {
        "buffer_size": args.buffer_size,
        "server_lr": 1.0,
        "staleness": "polynomial",
        "a": 0.5,
        "max_staleness": args.max_staleness,
    }
    return {
        **common,
        "rounds": args.max_versions,
        "strategy": {"name": "fedbuff", "min_clients": args.clients, "options": options},
    }


def run_until_target(strategy: str, args: argparse.Namespace, workdir: Path) -> dict:
    run = f"bench-{strategy}-{uuid.uuid4().hex[:6]}"
    path = workdir / f"{run}.yaml"
    path.write_text(json.dumps(config_for(strategy, args, run)))  # JSON is YAML
    out = workdir / run
    metrics = out / "metrics.jsonl"
    env = {**os.environ, "BROKERFL_AMQP_URL": args.broker}
    common = [str(path), "--log-level", "warning"]
    launched = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "server", *common, "--out", str(out)], cwd=ROOT, env=env
        )
    ]
    procs += [
        subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", "client", *common, "--client-id", str(i)], cwd=ROOT, env=env
        )
        for i in range(args.clients)
    ]
    records: list[dict] = []
    seen_target_at = None
    try:
        deadline = launched + args.timeout
        while True:
            records = read_metrics(metrics) if metrics.exists() else []
            if any(r["accuracy"] >= args.target for r in records):
                seen_target_at = time.monotonic()
                break
            if procs[0].poll() is not None:  # the server ended: budget spent (or it failed)
                records = read_metrics(metrics) if metrics.exists() else []
                break
            ended = [(i, p.returncode) for i, p in enumerate(procs[1:]) if p.poll() is not None]
            if ended:  # e.g. the broker went away for longer than a client retries
                raise SystemExit(
                    f"{strategy}: client process(es) exited before the target (client id, exit code): {ended}"
                )
            if time.monotonic() > deadline:
                raise SystemExit(f"{strategy}: no result within {args.timeout} s")
            time.sleep(0.05)  # polling the metrics file the server appends to
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with AmqpTransport(args.broker) as admin:
            RunTopology(run).delete(admin, [str(i) for i in range(args.clients)])
    hit = next((i for i, r in enumerate(records) if r["accuracy"] >= args.target), None)
    summed = sum(r["duration_s"] for r in records[: hit + 1]) if hit is not None else None
    startup = (seen_target_at - launched - summed) if hit is not None else None
    return {
        "strategy": strategy,
        "reached": hit is not None,
        "time_to_target_s": summed,
        "startup_s": startup,
        "versions": (hit + 1) if hit is not None else len(records),
        "updates": sum(r["num_updates"] for r in records[: (hit + 1) if hit is not None else len(records)]),
        "accuracy_at_target": records[hit]["accuracy"] if hit is not None else None,
        "final_accuracy": records[-1]["accuracy"] if records else None,
        "final_version": records[-1]["model_version"] if records else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy to reach (default 0.95)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--slow", nargs="*", default=["6", "7"], help="ids of the slow clients")
    parser.add_argument("--factor", type=float, default=5.0, help="how many times slower they are")
    parser.add_argument("--buffer-size", type=int, default=4, help="FedBuff's K")
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument("--max-rounds", type=int, default=40, help="FedAvg's budget")
    parser.add_argument("--max-versions", type=int, default=400, help="FedBuff's budget")
    parser.add_argument(
        "--hidden", type=int, nargs="+", default=[128, 64], help="the MLP's hidden sizes (default: the digits configs')"
    )
    parser.add_argument("--epochs", type=int, default=3, help="local epochs per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--out", help="keep each run's metrics.jsonl and models here (default: a temporary directory)")
    parser.add_argument("--only", choices=["fedavg", "fedbuff"], help="run one of the two")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the queues are still deleted
    print(
        f"digits, {args.clients} client processes + 1 server, clients {args.slow} {args.factor:g}x slower; target test "
        f"accuracy {args.target}"
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.out or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for strategy in [args.only] if args.only else ["fedavg", "fedbuff"]:
            results.append(result := run_until_target(strategy, args, workdir))
            print(json.dumps(result), flush=True)
    print()
    print(
        f"| strategy | time to {args.target} (s) | rounds / versions | client updates | accuracy then | final accuracy "
        "|"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        name = "FedAvg (sync)" if r["strategy"] == "fedavg" else f"FedBuff (K={args.buffer_size})"
        t = f"{r['time_to_target_s']:.2f}" if r["reached"] else "not reached"
        at = f"{r['accuracy_at_target']:.4f}" if r["reached"] else "-"
        final = f"{r['final_accuracy']:.4f}" if r["final_accuracy"] is not None else "-"
        print(f"| {name} | {t} | {r['versions']} | {r['updates']} | {at} | {final} (v{r['final_version']}) |")
    if len(results) == 2 and all(r["reached"] for r in results):
        sync, buff = results
        print(
            f"\nFedBuff reached {args.target} in {buff['time_to_target_s'] / sync['time_to_target_s']:.2f}x FedAvg's "
            "wall time"
        )


if __name__ == "__main__":
    main()
