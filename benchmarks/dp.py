"""Central DP-FedAvg on digits: 100 clients, 10 sampled per round, 50 rounds, at several
noise multipliers (clip norm C fixed); final test accuracy and the epsilon spent at delta
1e-5 (Opacus's RDP accountant, sampling rate 0.1), in-process (``brokerfl.assembly.simulate``).

    python benchmarks/dp.py [--noise 0.5 1.0 2.0] [--clip 1.0] [--rounds 50] [--hidden 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.assembly.simulate import simulate  # noqa: E402
from brokerfl.config import parse_config  # noqa: E402
from brokerfl.runtime.log import configure_logging  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--hidden", type=int, nargs="*", default=[32])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    configure_logging("error")
    torch.set_num_threads(1)  # as the client processes do; many threads on a shared machine only contend
    rows = []
    for z in args.noise:
        config = parse_config(
            {
                "run": "dp",
                "seed": args.seed,
                "rounds": args.rounds,
                "clients": 100,
                "model": {"hidden": args.hidden},
                "strategy": {
                    "name": "dp_fedavg",
                    "clients_per_round": 10,
                    "options": {"noise_multiplier": z, "clip_norm": args.clip, "delta": 1e-5},
                },
            }
        )
        started = time.perf_counter()
        records = simulate(config).records
        rows.append(
            (
                z,
                records[-1]["accuracy"],
                max(r["accuracy"] for r in records),
                records[-1]["epsilon"],
                time.perf_counter() - started,
            )
        )
        print(f"  z={z}: final {rows[-1][1]:.4f}, epsilon {rows[-1][3]:.3g}", file=sys.stderr, flush=True)
    print(
        f"\ncentral DP-FedAvg, digits, 100 clients, 10 per round, {args.rounds} rounds, clip {args.clip}, MLP hidden "
        f"{args.hidden}, delta 1e-5\n"
    )
    print("| noise multiplier | final accuracy | best accuracy | epsilon | seconds |")
    print("|------------------|----------------|---------------|---------|---------|")
    for z, final, best, eps, seconds in rows:
        print(f"| {z:>16} | {final:>14.4f} | {best:>13.4f} | {eps:>7.3g} | {seconds:>7.0f} |")


if __name__ == "__main__":
    main()
