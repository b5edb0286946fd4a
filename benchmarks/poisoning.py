"""Poisoning: 10 clients on digits (IID), 2 of them (clients 0 and 1) send sign-flipped
updates scaled by 10 every round (``benchmarks/attackers.py``); the final test accuracy of
each aggregation strategy, in-process (``brokerfl.simulate``, same seed and data for all).

    python benchmarks/poisoning.py [--rounds 10] [--strategies fedavg median ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # the attackers handler set (opacus installs a top-level "benchmarks" package)

from brokerfl.config import parse_config  # noqa: E402
from brokerfl.log import configure_logging  # noqa: E402
from brokerfl.metrics import read_metrics  # noqa: E402
from brokerfl.simulate import SimulationError, simulate  # noqa: E402

STRATEGIES = {  # name -> (strategy, options): f = 2 attackers of 10
    "fedavg (no attack)": ("fedavg", {}),
    "fedavg": ("fedavg", {}),
    "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {"beta": 0.2}),
    "krum": ("krum", {"f": 2}),
    "multi_krum": ("multi_krum", {"f": 2}),
    "bulyan": ("bulyan", {"f": 2}),
    "norm_bounding": ("norm_bounding", {"max_norm": 2.0}),
}


def run(label: str, rounds: int, seed: int, out: Path) -> dict:
    """A poisoned FedAvg model diverges to inf/NaN: the clients' updates are then refused as
    non-finite (dead-lettered), the round gets no answer by its deadline and the run stops;
    its final accuracy is that of its last stored version. Every round waits for all 10
    answers (min_clients 10): a round closed early by its deadline would hold the clients
    that answered first (0 and 1, the attackers, in a simulation), whatever the strategy."""
    name, options = STRATEGIES[label]
    config = parse_config({
        "run": "poisoning", "seed": seed, "rounds": rounds, "clients": 10,
        "strategy": {"name": name, "options": options, "min_clients": 10, "round_deadline_s": 120, "on_too_few": "stop"},
        "client_handlers": "handlers.workflows.client" if "no attack" in label else "attackers",
    })
    started = time.perf_counter()
    note = ""
    try:
        simulate(config, out)
    except SimulationError as exc:
        note = f"stopped: {exc}"
    records = read_metrics(out / "metrics.jsonl")
    return {"label": label, "final": records[-1]["accuracy"], "best": max(r["accuracy"] for r in records), "rounds": len(records), "seconds": time.perf_counter() - started, "note": note}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    args = parser.parse_args()
    configure_logging("error")
    torch.set_num_threads(1)  # as the client processes do; many threads on a shared machine only contend
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="poisoning-"))
    for i, label in enumerate(args.strategies):
        rows.append(run(label, args.rounds, args.seed, workdir / str(i)))
        print(f"  {label}: final {rows[-1]['final']:.4f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(f"\n2 of 10 clients send -10 x their update; {args.rounds} rounds, digits IID, seed {args.seed}\n")
    print(f"| {'strategy':<20} | final accuracy | best accuracy | versions | seconds | note")
    print(f"|{'-' * 22}|----------------|---------------|----------|---------|-----")
    for row in rows:
        print(f"| {row['label']:<20} | {row['final']:>14.4f} | {row['best']:>13.4f} | {row['rounds']:>8} | {row['seconds']:>7.0f} | {row['note']}")


if __name__ == "__main__":
    main()
