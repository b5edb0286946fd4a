"""Replaying a run against running it: 10 rounds of a 10M-parameter model over RabbitMQ
(one server, 4 client processes, journal on), then ``brokerfl replay --check`` of the same
run, from the broker's journal and from an exported journal file.

    python benchmarks/replay.py [--size 10M] [--rounds 10] [--clients 4]

The original run's time is the sum of its rounds (server round durations, start-up left
out), and also its whole wall time; a replay's is its whole wall time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from round_time import run_federation  # noqa: E402


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="10M")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    env = {**os.environ, "BROKERFL_AMQP_URL": args.broker}
    results: dict[str, float] = {}

    def replay_it(run: str, config: Path, out: Path) -> None:
        cli = [sys.executable, "-m", "brokerfl.cli"]
        results["replay from the broker"], table = timed([*cli, "replay", str(config), "--check"], env)
        print(table.strip().splitlines()[-1])
        journal = out / "run.journal"
        results["journal export"], _ = timed([*cli, "journal", "export", str(config), str(journal)], env)
        results["replay from the file"], table = timed(
            [*cli, "replay", str(config), "--journal", str(journal), "--check"], env
        )
        print(table.strip().splitlines()[-1])
        results["journal file MB"] = journal.stat().st_size / 1e6

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        records = run_federation(
            args.size,
            rounds=args.rounds,
            clients=args.clients,
            url=args.broker,
            journal=True,
            workdir=Path(tmp),
            inspect_run=replay_it,
        )
        wall = time.perf_counter() - started - sum(v for k, v in results.items() if not k.endswith("MB"))
    rounds_s = sum(r["duration_s"] for r in records)
    print(
        f"original run: {len(records)} rounds of a {args.size} model, {args.clients} client processes: rounds "
        f"{rounds_s:.2f} s, whole run {wall:.1f} s (with process start-up)"
    )
    for name, value in results.items():
        print(f"{name}: {value:.2f}" + ("" if name.endswith("MB") else " s (whole command, with start-up)"))
    faster = results["replay from the file"] < rounds_s and results["replay from the broker"] < rounds_s
    print(f"replay faster than the original run's rounds: {'yes' if faster else 'NO'}")


if __name__ == "__main__":
    main()
