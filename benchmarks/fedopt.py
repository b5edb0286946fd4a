"""Adaptive server optimizers against FedAvg on a label-skewed split: digits, 10 clients,
Dirichlet alpha 0.3, in-process (``brokerfl.assembly.simulate``, same seed, data and client
training for all). Reports the first round at which each reaches the target accuracy
and writes the curves to a PNG.

    python benchmarks/fedopt.py [--rounds 25] [--target 0.90] [--png runs/fedopt.png]
                                [--runs fedavg fedadam:eta=0.01 fedyogi:eta=0.01,tau=0.001 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.assembly.simulate import simulate  # noqa: E402
from brokerfl.config import parse_config  # noqa: E402
from brokerfl.runtime.log import configure_logging  # noqa: E402

DEFAULT_RUNS = ["fedavg", "fedadam:eta=0.01", "fedyogi:eta=0.01", "fedadam:eta=0.03", "fedyogi:eta=0.03"]


def parse_run(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = yaml.safe_load(value)
    return name, options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--target", type=float, default=0.90)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS)
    parser.add_argument("--png", default="runs/fedopt.png")
    args = parser.parse_args()
    configure_logging("error")
    torch.set_num_threads(1)  # as the client processes do; many threads on a shared machine only contend
    results = []
    for text in args.runs:
        name, options = parse_run(text)
        config = parse_config(
            {
                "run": "fedopt",
                "seed": args.seed,
                "rounds": args.rounds,
                "clients": 10,
                "data": {"partition": "dirichlet", "alpha": args.alpha},
                "strategy": {"name": name, "options": options},
            }
        )
        started = time.perf_counter()
        records = simulate(config).records
        accuracies = [r["accuracy"] for r in records]
        first = next((r["round"] for r in records if r["accuracy"] >= args.target), None)
        results.append((text, first, accuracies, time.perf_counter() - started))
        print(
            f"  {text}: first round >= {args.target}: {first}, final {accuracies[-1]:.4f}", file=sys.stderr, flush=True
        )
    print(f"\ndigits, 10 clients, Dirichlet alpha {args.alpha}, seed {args.seed}, {args.rounds} rounds\n")
    print(f"| {'run':<28} | first round >= {args.target:.2f} | final accuracy | best accuracy |")
    print(f"|{'-' * 30}|---------------------|----------------|---------------|")
    for text, first, accuracies, _ in results:
        print(
            f"| {text:<28} | {str(first if first is not None else 'not reached'):>19} | {accuracies[-1]:>14.4f} | "
            f"{max(accuracies):>13.4f} |"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for text, _, accuracies, _ in results:
        ax.plot(range(1, len(accuracies) + 1), accuracies, marker="o", markersize=3, label=text)
    ax.axhline(args.target, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="round", ylabel="test accuracy", title=f"digits, Dirichlet alpha {args.alpha}, 10 clients")
    ax.legend()
    ax.grid(alpha=0.3)
    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(args.png, dpi=100)
    print(f"\nplot: {args.png}")


if __name__ == "__main__":
    main()
