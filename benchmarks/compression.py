"""Compressed updates: bytes and seconds per round at 10M parameters, and what they cost in
accuracy, for none / bfloat16 / qsgd8 / topk (1%).

    python benchmarks/compression.py [--methods none bfloat16 qsgd8 topk] [--rounds 6]
                                     [--accuracy-rounds 20] [--skip-speed] [--skip-accuracy]

- **bytes per round** (exact): the encoded bodies of one round at 10M parameters and 4
  clients, i.e. the task (the model, not compressed) plus 4 ParameterUpdates as the client
  sends them (``to_wire`` of a compressed update of a trained-like delta).
- **seconds per round**: ``benchmarks/round_time.py``'s federation over RabbitMQ (one server
  and 4 client processes, journal on) with ``compression.method`` set, median over the rounds.
- **accuracy**: ``brokerfl simulate`` (in-process) of ``configs/digits_fedavg.yaml`` and of
  ``examples/cnn_mnist/config.yaml`` for ``--accuracy-rounds`` rounds, the final accuracy per
  method and its difference from uncompressed (the goal for bfloat16 and qsgd8: within 0.5
  points); each compressed run's journal is replayed (``replay --check``: every version's hash).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from brokerfl.config import load_config  # noqa: E402
from brokerfl.transports.memory import tune_allocator  # noqa: E402
from brokerfl.wire.compression import compress  # noqa: E402
from brokerfl.wire.message import ParameterUpdate, TrainTask, to_wire  # noqa: E402

METHODS = ["none", "bfloat16", "qsgd8", "topk"]
FRACTION = 0.01
GOAL_POINTS = 0.5


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def round_bytes(method: str, params: int = 10_034_790, clients: int = 4) -> int:
    rng = np.random.default_rng(0)
    sizes = [params // 2, params // 4, params // 8]
    sizes.append(params - sum(sizes))
    model = {f"layer{i}.weight": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)}
    trained = {k: v + 0.01 * rng.standard_normal(v.shape, dtype=np.float32) for k, v in model.items()}
    task = TrainTask(round=1, model_version=0, parameters=model, participants=[str(i) for i in range(clients)])
    parameters, compression = trained, ""
    if method != "none":
        parameters, _ = compress(trained, model, method, fraction=FRACTION, rng=rng)
        compression = method
    update = ParameterUpdate(
        client_id="0", task_id="t", parameters=parameters, num_samples=100, compression=compression
    )
    return len(to_wire(task)[1]) + clients * len(to_wire(update)[1])


def speed(method: str, rounds: int, url: str, workdir: Path) -> float:
    import statistics

    from round_time import run_federation

    records = run_federation(
        "10M",
        rounds=rounds,
        clients=4,
        url=url,
        journal=True,
        workdir=workdir,
        extra={"compression": {"method": method, "fraction": FRACTION}},
    )
    return statistics.median(r["duration_s"] for r in records[1:])


def accuracy(config_path: str, method: str, rounds: int) -> tuple[float, bool, float]:
    """(final accuracy, replay all OK, seconds) of a simulated run."""
    import torch

    from brokerfl.assembly.roles import topology_for
    from brokerfl.assembly.simulate import simulate
    from brokerfl.ops.replay import replay
    from brokerfl.storage.journal import read_journal
    from brokerfl.transports.local import LocalTransport

    torch.set_num_threads(1)  # as the CLI does: bitwise reproducible
    config = load_config(
        config_path, {"rounds": rounds, "compression.method": method, "compression.fraction": FRACTION}
    )
    started = time.perf_counter()
    result = simulate(config, journal=True)
    seconds = time.perf_counter() - started
    ok = True
    if method != "none":
        ok = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config).ok
    return result.records[-1]["accuracy"], ok, seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each 10M federation over RabbitMQ")
    parser.add_argument("--accuracy-rounds", type=int, default=20)
    parser.add_argument("--apps", nargs="+", default=["configs/digits_fedavg.yaml", "examples/cnn_mnist/config.yaml"])
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--broker", default=os.environ.get("BROKERFL_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    args = parser.parse_args()
    tune_allocator()
    print(f"compression benchmark; load {load()}")
    whole = round_bytes("none")
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            size = round_bytes(method)
            line = f"{method:>9}: {size / 1e6:8.1f} MB per round at 10M, 4 clients ({size / whole:.2f}x of none)"
            if not args.skip_speed:
                seconds = speed(method, args.rounds, args.broker, Path(tmp))
                line += f"; {seconds:.3f} s per round (median of {args.rounds - 1}, RabbitMQ, journal on)"
            print(line + f"; load {load()}", flush=True)
    if args.skip_accuracy:
        return
    for app in args.apps:
        base = None
        for method in args.methods:
            acc, ok, seconds = accuracy(app, method, args.accuracy_rounds)
            base = acc if method == "none" else base
            diff = ""
            if base is not None and method != "none":
                goal = (
                    ""
                    if method == "topk"
                    else ", within goal"
                    if abs(100 * (acc - base)) <= GOAL_POINTS
                    else ", NOT within goal"
                )
                diff = f" ({100 * (acc - base):+.2f} points vs none{goal})"
            print(
                f"{app}: {method:>9} final accuracy {acc:.4f} after {args.accuracy_rounds} rounds{diff}; replay "
                f"{'all OK' if ok else 'DIFF'}; {seconds:.0f} s; load {load()}",
                flush=True,
            )


if __name__ == "__main__":
    main()
