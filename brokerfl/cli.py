"""The ``brokerfl`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from brokerfl.config import ConfigError, RunConfig, load_config
from brokerfl.log import configure_logging


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (default: the embedded default run: digits, 10 IID clients, FedAvg)")
    parser.add_argument("--clients", type=int, help="federation size = number of data partitions")
    parser.add_argument("--rounds", type=int, help="number of rounds")
    parser.add_argument("--seed", type=int, help="seed for data split, sampling, initialisation and training")
    parser.add_argument("--run", help="run name (the broker namespace)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _load(args: argparse.Namespace) -> RunConfig:
    overrides: dict[str, Any] = {"clients": args.clients, "rounds": args.rounds, "seed": args.seed, "run": getattr(args, "run", None)}
    return load_config(args.config, overrides)


def _set_torch_threads() -> None:
    # One thread per process: many logical clients share 2 cores, and a fixed thread count
    # keeps training bitwise reproducible across processes and transports.
    import torch

    torch.set_num_threads(1)


def cmd_simulate(args: argparse.Namespace) -> int:
    from brokerfl.simulate import SimulationError, simulate

    config = _load(args)
    _set_torch_threads()
    out = Path(args.out or f"runs/{config.run}")
    try:
        result = simulate(config, out, progress=not args.no_progress)
    except SimulationError as exc:
        print(f"brokerfl simulate: {exc}", file=sys.stderr)
        return 1
    last = result.records[-1] if result.records else {}
    print(
        f"{config.run}: {len(result.records)} rounds in {result.duration_s:.1f} s; "
        f"final accuracy {last.get('accuracy', float('nan')):.4f}, loss {last.get('loss', float('nan')):.4f}; "
        f"wrote {out / 'metrics.jsonl'} and {out / 'curve.png'}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brokerfl", description="Federated learning over a message broker.")
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulate", help="run a whole federation in this process (local transport, no broker)")
    _config_arguments(sim)
    sim.add_argument("--out", help="directory for metrics.jsonl and curve.png (default: runs/<run>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"brokerfl: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
