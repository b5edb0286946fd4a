"""Federated LoRA fine-tuning of a small language model (examples/lora_lm): what travels, and
how the federated adapter compares with one trained centrally.

    python benchmarks/lora_finetune.py [--base FILE] [--rounds 10] [--local-steps 10]
                                       [--topk-fraction 0.1] [--out DIR]

Stages, each ``brokerfl simulate`` in this process:

1. **base**: ``examples/lora_lm/pretrain.yaml`` (full-weight FedAvg from random
   initialisation on a mix of all domains), or ``--base FILE`` (a previous run's
   ``final_model.npz``) to skip it.
2. **federated LoRA**: ``examples/lora_lm/lora.yaml`` from that base: 6 clients, one
   domain each, ``--rounds`` rounds of ``--local-steps`` AdamW steps (batch 16) per client.
   Then the same run with ``compression: bfloat16`` and with ``compression: topk``
   (``--topk-fraction``, error feedback on, ``min_size`` 256 so every adapter matrix is
   compressed). Each run's journal is replayed (``replay --check``: every version's hash).
3. **central LoRA**: one adapter, same base, same LoRA and optimiser settings, trained on the
   union of the 6 clients' training data. Two step budgets, both seeing as many samples
   as the federation's clients together: *summed* = as many AdamW steps of batch 16 as the
   clients made together (rounds x local steps x clients), the figure the goal is judged
   on; *rounds* = rounds x local steps steps of batch 16 x clients (as many sequential steps
   as the federation's rounds allow, each as large as a round's batches together).

Printed: the full model's and the adapter's bytes per round (the run's metrics lines:
``model_bytes``, the version a task ships, plus ``update_bytes``, the round's folded updates
as they travelled; for the full model, its bytes times 1 + clients) and their ratio (goal
<= 2%); the base's perplexity per client domain; the federated and
central adapters' perplexity per client domain (each client's held-out split); the means
(goal: federated within 5% of central, and every client below the base); per compression
method, bytes per round and mean perplexity (goal: within 2% of uncompressed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokerfl.config import RunConfig, TrainConfig, load_config  # noqa: E402

PRETRAIN = ROOT / "examples/lora_lm/pretrain.yaml"
LORA = ROOT / "examples/lora_lm/lora.yaml"
GOAL_RATIO, GOAL_CENTRAL, GOAL_COMPRESSION = 0.02, 0.05, 0.02


def load() -> str:
    return ", ".join(f"{v:.1f}" for v in os.getloadavg())


def pretrain(out: Path) -> Path:
    from brokerfl.assembly.simulate import simulate

    config = load_config(str(PRETRAIN))
    started = time.perf_counter()
    result = simulate(config, out)
    last = [r for r in result.records if r.get("evaluation") == "federated"][-1]["metrics"]
    print(
        f"base: {config.rounds} rounds of full-weight FedAvg, {config.clients} clients on a mix of domains, "
        f"{time.perf_counter() - started:.0f} s; perplexity {last['perplexity']:.3f}; load {load()}",
        flush=True,
    )
    return out / "final_model.npz"


def lora_config(base: Path, rounds: int, local_steps: int, compression: dict[str, Any] | None = None) -> RunConfig:
    overrides: dict[str, Any] = {"rounds": rounds, "app_options.base": str(base), "train.max_batches": local_steps}
    for key, value in (compression or {}).items():
        overrides[f"compression.{key}"] = value
    return load_config(str(LORA), overrides)


def domains_of(config: RunConfig) -> list[str]:
    from examples.lora_lm import data

    return [data.DOMAINS[i % len(data.DOMAINS)] for i in range(config.clients)]


def federated(config: RunConfig, out: Path) -> dict[str, Any]:
    """A simulated run: the last federated evaluation's metrics, what travelled per round
    (the rounds' lines: ``model_bytes``, the version a task ships, plus ``update_bytes``, the
    folded updates as they travelled), the stored model's names, and its journal replayed."""
    from brokerfl.assembly.roles import topology_for
    from brokerfl.assembly.simulate import simulate
    from brokerfl.ops.replay import replay
    from brokerfl.storage.journal import read_journal
    from brokerfl.storage.model_file import read_model_file
    from brokerfl.transports.local import LocalTransport

    started = time.perf_counter()
    result = simulate(config, out, journal=True)
    seconds = time.perf_counter() - started
    rounds = [r for r in result.records if r.get("model_bytes") is not None]
    replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config).ok
    model, _ = read_model_file(out / "final_model.npz")
    return {
        "metrics": [r for r in result.records if r.get("evaluation") == "federated"][-1]["metrics"],
        "model_bytes": rounds[-1]["model_bytes"],
        "update_bytes": float(np.mean([r["update_bytes"] for r in rounds])),
        "bytes_per_round": float(np.mean([r["model_bytes"] + r["update_bytes"] for r in rounds])),
        "names": sorted(model),
        "replay_ok": replayed,
        "seconds": seconds,
    }


def full_model_bytes(config: RunConfig) -> int:
    """What the whole model weighs as it travels without ``lora`` (each tied weight once)."""
    import torch

    from brokerfl.app.torch_adapter import to_named_arrays
    from examples.lora_lm import app

    torch.manual_seed(config.seed)
    whole = to_named_arrays(app.model({**app.OPTIONS, **config.app_options, "lora": None}))
    return sum(a.nbytes for a in whole.values())


def per_domain(config: RunConfig, module: Any) -> dict[str, float]:
    """``module``'s perplexity on each client's held-out split."""
    from examples.lora_lm import app

    options = {**app.OPTIONS, **config.app_options}
    out = {}
    for index, domain in enumerate(domains_of(config)):
        out[domain] = app.evaluate(module, app.load_partition(index, config.clients, options, config.seed).test)[
            "perplexity"
        ]
    return out


def central(config: RunConfig, steps: int, batch_size: int) -> tuple[dict[str, float], float]:
    """An adapter trained on the union of the clients' training data; its per-domain
    perplexity and seconds."""
    import torch

    from examples.lora_lm import app
    from examples.lora_lm import data as lm_data

    options = {**app.OPTIONS, **config.app_options}
    pairs = [p for i in range(config.clients) for p in app.partition_pairs(i, options, config.seed)[0]]
    union = lm_data.tokenize(pairs, app.gpt2_shape(options)["n_positions"])
    torch.manual_seed(config.seed)  # the adapter's initialisation, as the run's model()
    module = app.model(options)
    settings = TrainConfig(
        epochs=10_000,
        batch_size=batch_size,
        lr=config.train.lr,
        weight_decay=config.train.weight_decay,
        max_batches=steps,
    )
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        app.train(module, union, settings, config.seed)
    return per_domain(config, module), time.perf_counter() - started


def base_perplexity(config: RunConfig) -> dict[str, float]:
    import torch

    from examples.lora_lm import app

    options = {**app.OPTIONS, **config.app_options, "lora": None}
    torch.manual_seed(config.seed)
    return per_domain(config, app.model(options))


def row(label: str, values: dict[str, float], domains: list[str]) -> str:
    cells = " ".join(f"{values[d]:8.3f}" for d in domains)
    return f"{label:<26} {cells}   mean {np.mean([values[d] for d in domains]):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="a pretrain run's final_model.npz (default: run pretrain.yaml)")
    parser.add_argument("--rounds", type=int, default=None, help="LoRA rounds (default: lora.yaml's)")
    parser.add_argument("--local-steps", type=int, default=None, help="AdamW steps per client and round (lora.yaml's)")
    parser.add_argument("--topk-fraction", type=float, default=0.1)
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    import torch

    from brokerfl.runtime.log import configure_logging

    configure_logging("error")
    torch.set_num_threads(1)  # as the brokerfl command does: reproducible
    print(f"LoRA fine-tuning benchmark; load {load()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        base = args.base or pretrain(out / "pretrain")
        defaults = load_config(str(LORA))
        rounds = args.rounds or defaults.rounds
        local_steps = args.local_steps or defaults.train.max_batches
        config = lora_config(base, rounds, local_steps)
        domains = domains_of(config)

        fed = federated(config, out / "lora")
        full_model = full_model_bytes(config)
        full_round = full_model * (1 + config.clients)  # the version, and one update per client
        ratio = fed["bytes_per_round"] / full_round
        print(
            f"bytes: full model {full_model / 1e6:.3f} MB, {full_round / 1e6:.3f} MB per round if it all travelled "
            f"(the version + {config.clients} updates); adapter {fed['model_bytes'] / 1e3:.1f} kB "
            f"({len(fed['names'])} tensors), {fed['bytes_per_round'] / 1e3:.1f} kB per round as the run's lines count "
            f"it: {100 * ratio:.2f}% of full ({'within' if ratio <= GOAL_RATIO else 'NOT within'} the 2% goal)",
            flush=True,
        )
        base_ppl = base_perplexity(config)
        fed_ppl = {d: fed["metrics"][f"perplexity_{d}"] for d in domains}
        summed, rounds_budget = config.clients * rounds * local_steps, rounds * local_steps
        batch = config.train.batch_size
        central_summed, central_summed_s = central(config, summed, batch)
        central_rounds, central_rounds_s = central(config, rounds_budget, batch * config.clients)
        print(
            f"perplexity per client domain (held-out); {rounds} rounds x {local_steps} steps x {config.clients} clients"
        )
        print(f"{'':<26} " + " ".join(f"{d:>8}" for d in domains))
        print(row("base", base_ppl, domains))
        print(row(f"federated ({fed['seconds']:.0f} s)", fed_ppl, domains))
        print(row(f"central {summed}x{batch} ({central_summed_s:.0f} s)", central_summed, domains))
        print(
            row(f"central {rounds_budget}x{batch * config.clients} ({central_rounds_s:.0f} s)", central_rounds, domains)
        )
        below = all(fed_ppl[d] < base_ppl[d] for d in domains)
        fed_mean = float(np.mean(list(fed_ppl.values())))
        for label, other in (("summed steps", central_summed), ("rounds' steps", central_rounds)):
            other_mean = float(np.mean(list(other.values())))
            gap = fed_mean / other_mean - 1
            goal = (
                ""
                if label != "summed steps"
                else (" (within the 5% goal)" if abs(gap) <= GOAL_CENTRAL else " (NOT within the 5% goal)")
            )
            print(f"mean federated {fed_mean:.3f} vs central ({label}) {other_mean:.3f}: {100 * gap:+.2f}%{goal}")
        print(f"every client below the base: {below}; replay {'all OK' if fed['replay_ok'] else 'DIFF'}; load {load()}")

        methods = {
            "bfloat16": {"method": "bfloat16", "min_size": 256},
            "topk": {"method": "topk", "fraction": args.topk_fraction, "min_size": 256, "error_feedback": True},
        }
        print(
            f"{'none':>9}: {fed['bytes_per_round'] / 1e3:8.1f} kB per round (updates "
            f"{fed['update_bytes'] / 1e3:.1f} kB), mean perplexity {fed_mean:.3f}"
        )
        for name, compression in methods.items():
            run = federated(lora_config(base, rounds, local_steps, compression), out / f"lora-{name}")
            mean = float(np.mean([run["metrics"][f"perplexity_{d}"] for d in domains]))
            gap = mean / fed_mean - 1
            label = f"topk {args.topk_fraction:g}" if name == "topk" else name
            share = run["bytes_per_round"] / fed["bytes_per_round"]
            print(
                f"{label:>9}: {run['bytes_per_round'] / 1e3:8.1f} kB per round ({share:.2f}x; updates "
                f"{run['update_bytes'] / 1e3:.1f} kB), "
                f"mean perplexity {mean:.3f} ({100 * gap:+.2f}% vs none, "
                f"{'within' if abs(gap) <= GOAL_COMPRESSION else 'NOT within'} the 2% goal); "
                f"replay {'all OK' if run['replay_ok'] else 'DIFF'}; {run['seconds']:.0f} s; load {load()}",
                flush=True,
            )
        if not math.isfinite(fed_mean):
            raise SystemExit("the federated run's perplexity is not finite")


if __name__ == "__main__":
    main()
