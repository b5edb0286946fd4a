"""Poisoning: a federation of 6 clients on digits (IID) of which one (client 0) joins with
its real partition and then poisons every update it sends (``tests.tools.hostile.poisoning``);
the final test accuracy of each aggregation strategy at its defaults against each attack,
beside the clean run (every client honest), in-process (``brokerfl.assembly.simulate``, same seed
and data for all). Attacks:

- ``sign_flip``: the honest step reversed and scaled by 10;
- ``noise_claim``: N(0, 1) noise claiming 1,000,000 samples;
- ``claim``: the honest update claiming 1,000,000 samples;
- ``huge``: every value 1e30 (finite in float32);
- ``nan``: every value NaN.

Each cell also says how many of the attacker's updates the server refused (dead-lettered
with a reason). Every round waits for all 6 answers (a refused update is an answer), so
the rounds do not depend on this machine's speed.

    python benchmarks/poisoning.py [--rounds 20] [--clients 6] [--attackers 0] [--strategies fedavg median ...]
    [--attacks sign_flip nan ...]

With ``--honest``, no attack: how far honest updates move from the model they were trained
on, against the bound of ``strategy.max_update_ratio`` (||w_client - w|| / (||w|| + sqrt(N)),
the largest of every update of the run and of its first round), for the repository's
apps at their configs (and the digits MLP at 10x its learning rate), ``--honest-rounds``
rounds each:

    python benchmarks/poisoning.py --honest [--honest-rounds 5]
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

from brokerfl.runtime.log import configure_logging  # noqa: E402
from tests.tools.hostile.poisoning import ATTACKS, simulated_run  # noqa: E402

STRATEGIES = {  # label -> (strategy, options): every one at its defaults
    "fedavg": ("fedavg", {}),
    "median": ("median", {}),
    "trimmed_mean": ("trimmed_mean", {}),
    "krum": ("krum", {}),
    "multi_krum": ("multi_krum", {}),
    "bulyan": ("bulyan", {}),
    "norm_bounding": ("norm_bounding", {}),
}
CLEAN = "clean"

HONEST = [  # (config, overrides): the repository's apps at their configs' settings, and a learning rate 10x
    ("configs/digits_fedavg.yaml", {}),
    ("configs/digits_fedavg.yaml", {"train.lr": 0.5}),
    ("configs/digits_fedavg.yaml", {"train.lr": 1.0, "train.momentum": 0.0}),
    ("configs/mnist5k_fedavg.yaml", {}),
    ("examples/logreg_numpy/config.yaml", {}),
    ("examples/cnn_mnist/config.yaml", {}),
    ("examples/regression/config.yaml", {}),
    ("examples/wine/config.yaml", {}),
]


def honest_distances(rounds: int) -> None:
    """Each honest update's distance from its model over the bound's scale, as the server
    checks it (``brokerfl.handlers.workflows.server_state.check_update`` observed, not replaced)."""
    import math

    import numpy as np

    from brokerfl.assembly.simulate import simulate
    from brokerfl.config import load_config
    from brokerfl.handlers.workflows import server_state as server

    check = server.check_update
    ratios: list[float] = []

    def observed(parameters, reference, **bounds):
        distance2 = norm2 = 0.0
        elements = 0
        for name, ref in reference.items():
            if np.issubdtype(ref.dtype, np.floating):
                delta = np.asarray(parameters[name], np.float64) - ref
                distance2 += float(np.dot(delta.ravel(), delta.ravel()))
                norm2 += float(np.dot(ref.ravel().astype(np.float64), ref.ravel().astype(np.float64)))
                elements += ref.size
        ratios.append(math.sqrt(distance2) / (math.sqrt(norm2) + math.sqrt(elements)))
        return check(parameters, reference, **bounds)

    server.check_update = observed
    print(f"\nhonest updates: ||w_client - w|| / (||w|| + sqrt(N)), {rounds} rounds each (the default bound is 10)\n")
    print("| config | overrides | largest, first round | largest, all rounds | final accuracy (loss without one) |")
    print("|---|---|---|---|---|")
    for path, overrides in HONEST:
        config = load_config(ROOT / path, {"rounds": rounds, **overrides})
        ratios.clear()
        result = simulate(config)
        first = ratios[: config.clients]
        final = result.records[-1]
        score = final.get("accuracy") if final.get("accuracy") is not None else final.get("loss")
        print(f"| {path} | {overrides or '-'} | {max(first):.3f} | {max(ratios):.3f} | {score:.3f} |", flush=True)
    server.check_update = check


def run(strategy: str, attack: str, args: argparse.Namespace, out: Path) -> dict:
    name, options = STRATEGIES[strategy]
    config = {
        "run": "poisoning",
        "seed": args.seed,
        "rounds": args.rounds,
        "clients": args.clients,
        "strategy": {
            "name": name,
            "options": options,
            "min_clients": args.clients - len(args.attackers.split(",")),
            "round_deadline_s": args.deadline,
            "on_too_few": "stop",
        },
    }
    started = time.perf_counter()
    result = simulated_run(config, None if attack == CLEAN else attack, out, attackers=args.attackers)
    refused = sum(1 for uid in result.attackers_updates if uid in result.dead or uid in result.dropped)
    return {
        "accuracy": result.accuracy,
        "versions": len(result.records),
        "refused": refused,
        "sent": len(result.attackers_updates),
        "stopped": result.stopped,
        "seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--attackers", default="0", help="client ids of the attackers, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=60.0, help="round_deadline_s")
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="*", default=[CLEAN, *ATTACKS], choices=[CLEAN, *ATTACKS])
    parser.add_argument("--honest", action="store_true", help="measure honest updates' distances instead (no attack)")
    parser.add_argument("--honest-rounds", type=int, default=5)
    args = parser.parse_args()
    configure_logging("error")
    torch.set_num_threads(1)  # as the client processes do; many threads on a shared machine only contend
    if args.honest:
        honest_distances(args.honest_rounds)
        return
    workdir = Path(tempfile.mkdtemp(prefix="poisoning-"))
    cells: dict[tuple[str, str], dict] = {}
    for strategy in args.strategies:
        for attack in args.attacks:
            cell = cells[strategy, attack] = run(strategy, attack, args, workdir / f"{strategy}-{attack}")
            print(
                f"  {strategy} / {attack}: {cell['accuracy']:.4f}, {cell['refused']}/{cell['sent']} refused "
                f"({cell['seconds']:.0f} s)" + (f" stopped: {cell['stopped']}" if cell["stopped"] else ""),
                file=sys.stderr,
                flush=True,
            )
    attackers = len(args.attackers.split(","))
    print(
        f"\n{attackers} of {args.clients} clients poison every update; final test accuracy after {args.rounds} rounds "
        f"(digits IID, seed {args.seed}); (r/s): the attacker's updates refused / sent\n"
    )
    print("| strategy | " + " | ".join(args.attacks) + " |")
    print("|---|" + "---|" * len(args.attacks))
    for strategy in args.strategies:
        row = []
        for attack in args.attacks:
            cell = cells[strategy, attack]
            text = f"{cell['accuracy']:.3f}"
            if attack != CLEAN:
                text += f" ({cell['refused']}/{cell['sent']})"
            if cell["stopped"]:
                text += f" stopped at version {cell['versions']}"
            row.append(text)
        print(f"| {strategy} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
