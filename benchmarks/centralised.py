"""Centralised (non-federated) reference: train the runtime's MLP on the full training set.

Uses the same handlers.trainer code path the federated clients use, one
train_local call per epoch, so the figure is directly comparable with
federated runs. Note that each call starts a fresh SGD optimizer, so the
momentum buffer resets at epoch boundaries (negligible at these sizes).

    python benchmarks/centralised.py --dataset digits --epochs 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Allow running as a plain script from anywhere, not only as `python -m`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from handlers.datasets import DATASETS, load_dataset  # noqa: E402
from handlers.trainer import evaluate, init_parameters, train_local  # noqa: E402


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=DATASETS, default="digits")
    parser.add_argument("--hidden", type=int, nargs="*", default=[128, 64], help="hidden layer sizes")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = load_dataset(args.dataset, test_fraction=args.test_fraction, seed=args.seed)
    arch = dict(hidden=args.hidden, num_classes=data.num_classes)
    params = init_parameters(data.num_features, args.hidden, data.num_classes, seed=args.seed)
    print(
        f"dataset={data.name} train={len(data.y_train)} test={len(data.y_test)} "
        f"hidden={args.hidden} epochs={args.epochs} lr={args.lr} momentum={args.momentum} "
        f"batch_size={args.batch_size}"
    )
    result = evaluate(params, data.x_test, data.y_test, **arch)
    for epoch in range(1, args.epochs + 1):
        params, stats = train_local(
            params,
            data.x_train,
            data.y_train,
            epochs=1,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            seed=args.seed * 100_003 + epoch,  # a different shuffle every epoch
            **arch,
        )
        result = evaluate(params, data.x_test, data.y_test, **arch)
        print(
            f"epoch {epoch:3d}  train_loss {stats['loss']:.4f}  "
            f"test_loss {result['loss']:.4f}  test_acc {result['accuracy']:.4f}"
        )
    elapsed = time.perf_counter() - start
    print(f"final test accuracy: {result['accuracy']:.4f}")
    print(f"wall time: {elapsed:.2f} s")
    return result["accuracy"]


if __name__ == "__main__":
    main()
