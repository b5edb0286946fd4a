"""Swarm on digits: 6 peer processes (no server), 20 rounds, in simulate and over RabbitMQ,
then over RabbitMQ again with the aggregating process killed -9 in 3 different rounds.

    python benchmarks/swarm.py [--broker URL] [--kill-rounds 5 10 15]

The aggregating peer is killed mid-round: when the run's journal shows an update of a round
(at least the kill round) that is neither stored nor dropped while the aggregation queue has
nothing ready, the aggregator holds it unacked; the holder is the sender of the newest
stored version. It is kill -9'd then and started again at once. Prints final accuracies,
the best model kept, accounting and replay results.
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.tools
from workflows import ROOT, check_run, metrics, run_simulate  # noqa: E402

from tests.tools.swarm_probe import held_update  # noqa: E402

CONFIG = ROOT / "configs" / "digits_swarm.yaml"


def start_peer(run: str, url: str, cid: str, out: Path, generation: int) -> tuple[subprocess.Popen, Path]:
    log = out / f"peer-{cid}.{generation}.log"
    env = {**os.environ, "BROKERFL_OUT": str(out)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "client",
            str(CONFIG),
            "--broker",
            url,
            "--run",
            run,
            "--client-id",
            cid,
        ],
        cwd=ROOT,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


def over_rabbitmq(url: str, out: Path, kill_rounds: list[int]) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = f"bench-swarm-{uuid.uuid4().hex[:6]}"
    clients = 6
    started = time.perf_counter()
    peers = {str(i): start_peer(run, url, str(i), out, 0) for i in range(clients)}
    from brokerfl.assembly.roles import topology_for
    from brokerfl.config import load_config
    from brokerfl.transports.amqp import AmqpTransport

    topology = topology_for(load_config(CONFIG, {"run": run}))
    while not metrics(out):  # the run's exchange and journal exist once a version is stored
        time.sleep(0.2)
    with AmqpTransport(url) as watcher:
        for generation, round_ in enumerate(kill_rounds, start=1):
            while (held := held_update(watcher, topology, round_)) is None:
                time.sleep(0.2)  # polling the journal and the queue's depth
            held_round, victim = held.round, held.peer
            peers[victim][0].kill()
            peers[victim][0].wait()
            print(
                f"round {held_round}: killed peer {victim} (kill -9), the aggregator, holding an update of that round; "
                f"{len(metrics(out))} versions stored; starting it again"
            )
            peers[victim] = start_peer(run, url, victim, out, generation)
    for proc, _ in peers.values():
        proc.wait(timeout=1800)
    records = metrics(out)
    takers = [f.name for f in sorted(out.glob("peer-*.log")) if "aggregator role taken" in f.read_text()]
    print(
        f"--- over RabbitMQ ({time.perf_counter() - started:.0f} s), run {run}: exit codes "
        f"{[p.returncode for p, _ in peers.values()]}, "
        f"{len(records)} versions (rounds {[r['round'] for r in records]}), final accuracy "
        f"{records[-1]['accuracy']:.4f}; role held by {takers}"
    )
    best = out / "best_model.json"
    print(f"best model kept: {best.read_text() if best.exists() else 'none'}")
    check_run(CONFIG, run, out, url)
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology

    with AmqpTransport(url) as admin:
        RunTopology(run, swarm=True).delete(admin, [str(i) for i in range(clients)])


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
