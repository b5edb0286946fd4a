"""Swarm on digits: 6 peer processes (no server), 20 rounds, in simulate and over RabbitMQ,
then over RabbitMQ again with the aggregating process killed -9 in 3 different rounds.

    python benchmarks/swarm.py [--broker URL] [--kill-rounds 5 10 15]

The aggregating peer is found from the peers' logs ("aggregator role taken": the newest
such line of a live process holds the role). It is killed mid-round (shortly after the
previous round's version is stored, while the clients train) and started again at once.
Prints final accuracies, the best model kept, accounting and replay results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workflows import ROOT, check_run, metrics, run_simulate  # noqa: E402

CONFIG = ROOT / "configs" / "digits_swarm.yaml"


def start_peer(run: str, url: str, cid: str, out: Path, generation: int) -> tuple[subprocess.Popen, Path]:
    log = out / f"peer-{cid}.{generation}.log"
    env = {**os.environ, "BROKERFL_OUT": str(out)}
    proc = subprocess.Popen([sys.executable, "-m", "brokerfl.cli", "client", str(CONFIG), "--broker", url, "--run", run, "--client-id", cid],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return proc, log


def over_rabbitmq(url: str, out: Path, kill_rounds: list[int]) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = f"bench-swarm-{uuid.uuid4().hex[:6]}"
    clients = 6
    started = time.perf_counter()
    peers = {str(i): start_peer(run, url, str(i), out, 0) for i in range(clients)}
    for generation, round_ in enumerate(kill_rounds, start=1):
        while len(metrics(out)) < round_ - 1:
            time.sleep(0.1)
        time.sleep(0.5)  # round `round_` is under way: its clients are training
        holders = [cid for cid, (proc, log) in peers.items() if proc.poll() is None and "aggregator role taken" in log.read_text()]
        victim = _newest_holder(peers, holders)
        peers[victim][0].kill()
        peers[victim][0].wait()
        print(f"round {round_}: killed peer {victim} (kill -9), the aggregator; {len(metrics(out))} versions stored; starting it again")
        peers[victim] = start_peer(run, url, victim, out, generation)
    for proc, _ in peers.values():
        proc.wait(timeout=1800)
    records = metrics(out)
    takers = [f.name for f in sorted(out.glob("peer-*.log")) if "aggregator role taken" in f.read_text()]
    print(f"--- over RabbitMQ ({time.perf_counter() - started:.0f} s), run {run}: exit codes {[p.returncode for p, _ in peers.values()]}, "
          f"{len(records)} versions (rounds {[r['round'] for r in records]}), final accuracy {records[-1]['accuracy']:.4f}; role held by {takers}")
    best = out / "best_model.json"
    print(f"best model kept: {best.read_text() if best.exists() else 'none'}")
    check_run(CONFIG, run, out, url)
    from brokerfl.topology import RunTopology
    from brokerfl.transports.amqp import AmqpTransport

    with AmqpTransport(url) as admin:
        RunTopology(run, swarm=True).delete(admin, [str(i) for i in range(clients)])


def _newest_holder(peers, holders: list[str]) -> str:
    """Of several logs that took the role, the one that took it last (by its log's time stamp)."""
    def last_taken(cid: str) -> str:
        lines = [line for line in peers[cid][1].read_text().splitlines() if "aggregator role taken" in line]
        return lines[-1][:8]  # HH:MM:SS

    return max(holders, key=last_taken)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL"))
    parser.add_argument("--kill-rounds", type=int, nargs="*", default=[5, 10, 15])
    parser.add_argument("--skip-clean", action="store_true", help="only the run with kills over RabbitMQ")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()}")
    if not args.skip_clean:
        run_simulate(CONFIG, ROOT / "runs" / "bench-swarm-sim")
        best = ROOT / "runs" / "bench-swarm-sim" / "best_model.json"
        print(f"best model kept: {json.loads(best.read_text()) if best.exists() else 'none'}")
        if args.broker:
            over_rabbitmq(args.broker, ROOT / "runs" / "bench-swarm-amqp", [])
    if args.broker and args.kill_rounds:
        over_rabbitmq(args.broker, ROOT / "runs" / "bench-swarm-kills", args.kill_rounds)
    print(f"load: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
