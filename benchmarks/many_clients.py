"""Seconds per round of ``brokerfl simulate`` against the number of logical clients.

    python benchmarks/many_clients.py [--clients 100 1000 10000] [--rounds 3] [--root DIR]

The run of ``configs/digits_fedavg.yaml`` (FedAvg, every client trains every round, 3 local
epochs), with N clients and ``--rounds`` rounds, each N in a fresh process. N above the
digits training set (1,437 samples) runs on mnist5k (4,000 training samples) with
``data.share_samples`` (client i trains on partition i mod 4,000: at 10,000 clients,
samples are shared). Prints the median seconds per round (rounds 2 on: the first includes
the joins), the whole run's wall time, and the load (``uptime``). ``--root`` runs another
checkout's code (e.g. the base commit, for a before/after).

Goal: the 1,000-client round at most 10x the 100-client round; 10,000 complete.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIGITS_TRAIN = 1437

SCRIPT = """
import json, statistics, sys, time
from brokerfl.cli.commands import _set_torch_threads
from brokerfl.config import load_config
from brokerfl.assembly.simulate import simulate
_set_torch_threads()  # as `brokerfl simulate` does: one thread
started = time.perf_counter()
result = simulate(load_config(sys.argv[1]))
wall = time.perf_counter() - started
steady = result.records[1:] or result.records
print(json.dumps({"round_s": statistics.median(r["duration_s"] for r in steady), "wall_s": wall,
                  "rounds": len(result.records), "accuracy": result.records[-1]["accuracy"]}))
"""


def config_for(clients: int, rounds: int) -> dict:
    big = clients > DIGITS_TRAIN
    return {
        "run": f"many-{clients}",
        "seed": 0,
        "rounds": rounds,
        "clients": clients,
        "data": {
            "dataset": "mnist5k" if big else "digits",
            "partition": "iid",
            "test_fraction": 0.2,
            **({"share_samples": True} if big else {}),
        },
        "model": {"hidden": [128, 64]},
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
        "strategy": {
            "name": "fedavg",
            "fraction": 1.0,
            "min_clients": 2,
            "round_deadline_s": 3600,
            "join_timeout_s": 3600,
        },
    }


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose brokerfl runs (default: this one)")
    parser.add_argument("--label", default="")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one N may take")
    args = parser.parse_args()
    label = f"[{args.label}] " if args.label else ""
    print(f"{label}code: {args.root}; load: {uptime()}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            path = Path(tmp) / f"many-{n}.yaml"
            path.write_text(json.dumps(config_for(n, args.rounds)))
            env = {**os.environ, "PYTHONPATH": str(args.root)}
            try:
                out = subprocess.run(
                    [sys.executable, "-c", SCRIPT, str(path)],
                    cwd=args.root,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                )
            except subprocess.TimeoutExpired:
                print(f"{label}N={n:>6}: did not finish within {args.timeout:.0f} s", flush=True)
                continue
            if out.returncode != 0:
                print(
                    f"{label}N={n:>6}: failed: "
                    f"{out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}",
                    flush=True,
                )
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[n] = r
            dataset = config_for(n, args.rounds)["data"]["dataset"]
            print(
                f"{label}N={n:>6} ({dataset}): median {r['round_s']:.2f} s per round; whole run {r['wall_s']:.1f} s "
                f"for {r['rounds']} rounds "
                f"(accuracy {r['accuracy']:.3f}); load {uptime().split('load average:')[-1].strip()}",
                flush=True,
            )
    if 100 in results and 1000 in results:
        ratio = results[1000]["round_s"] / results[100]["round_s"]
        print(
            f"{label}1,000-client round / 100-client round: {ratio:.1f}x (goal <= 10x: "
            f"{'met' if ratio <= 10 else 'NOT met'})"
        )


if __name__ == "__main__":
    main()
