"""The cost of folding a float64 model in double-double (order-independent sums, see
handlers/strategies/aggregate.py) against a plain float64 sum of the same float64 model
(order-dependent in the last bit) and the float64 fold of a float32 model of the same size:
milliseconds per folded update, best of ``--repeat``, one thread.

    python benchmarks/fold_double_double.py [--parameters 10000000] [--updates 5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.handlers.strategies.aggregate import RunningSum, fold_update, new_running_sum, weighted_average  # noqa: E402


def seconds_per_update(
    dtype: type, size: int, updates: int, repeat: int, base: bool, plain: bool = False
) -> tuple[float, float]:
    """(fold seconds per update, weighted_average seconds), best of ``repeat``; ``plain``: a
    float64 sum without its low word, as float64 models were folded before."""
    rng = np.random.default_rng(0)
    like = {"w": np.zeros(size, dtype)}
    received = [{"w": rng.standard_normal(size).astype(dtype)} for _ in range(updates)]
    reference = {"w": rng.standard_normal(size).astype(dtype)} if base else None
    acc, fold, average = None, [], []
    for _ in range(repeat):
        acc = RunningSum({"w": np.zeros(size, np.float64)}) if plain else new_running_sum(like, reuse=acc)
        started = time.perf_counter()
        for i, update in enumerate(received):
            fold_update(acc, update, float(100 + i), base=reference)
        fold.append((time.perf_counter() - started) / updates)
        started = time.perf_counter()
        weighted_average(acc, like)
        average.append(time.perf_counter() - started)
    return min(fold), min(average)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=10_000_000)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.parameters:,} parameters, {args.updates} updates, best of {args.repeat}")
    for base in (False, True):
        f32, _ = seconds_per_update(np.float32, args.parameters, args.updates, args.repeat, base)
        plain, _ = seconds_per_update(np.float64, args.parameters, args.updates, args.repeat, base, plain=True)
        f64, average = seconds_per_update(np.float64, args.parameters, args.updates, args.repeat, base)
        kind = "update - base (FedBuff, DP)" if base else "update (FedAvg, FedOpt)"
        print(
            f"{kind:28s} float32 {f32 * 1e3:6.1f}  float64 plain {plain * 1e3:6.1f}  float64 double-double "
            f"{f64 * 1e3:6.1f} ms/update"
            f"  (x{f64 / plain:.1f} plain; weighted_average {average * 1e3:.0f} ms)"
        )


if __name__ == "__main__":
    main()
