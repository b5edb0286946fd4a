"""Centralised (non-federated) reference: train the runtime's MLP on the full training set.

Uses the same brokerfl.handlers.trainer code path the federated clients use, one
train_local call per epoch, so the figure is directly comparable with
federated runs. Note that each call starts a fresh SGD optimizer, so the
momentum buffer resets at epoch boundaries (negligible at these sizes).

    python benchmarks/centralised.py --dataset digits --epochs 30

With ``--config``, the config's app instead (see brokerfl.app): its model trained by its
own ``train`` on the pooled training data of all its clients' partitions, for as many
epochs as the federated run's clients make passes over their data (rounds x epochs), and
scored with its ``evaluate`` on the server's test data:

    python benchmarks/centralised.py --config examples/cnn_mnist/config.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# Allow running as a plain script from anywhere, not only as `python -m`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brokerfl.handlers.datasets import DATASETS, load_dataset  # noqa: E402
from brokerfl.handlers.trainer import evaluate, init_parameters, train_local  # noqa: E402


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
    parser.add_argument("--config", help="a run config: train its app centrally instead of the MLP")
    args = parser.parse_args(argv)
    if args.config:
        return centralise_app(args.config)

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


def pool(parts: list) -> tuple:
    """One (x, y) pair from the partitions' (x, y) training pairs."""
    xs, ys = zip(*parts)
    if hasattr(xs[0], "numpy") and not isinstance(xs[0], np.ndarray):  # torch tensors
        import torch

        return torch.cat(xs), torch.cat(ys)
    return np.concatenate(xs), np.concatenate(ys)


def centralise_app(config_path: str) -> float:
    import torch

    from brokerfl.app import load_app
    from brokerfl.config import load_config

    torch.set_num_threads(1)  # as brokerfl's processes
    start = time.perf_counter()
    config = load_config(config_path)
    app = load_app(config)
    data = pool(
        [app.load_partition(i, config.clients, config.seed, client_id=str(i)).train for i in range(config.clients)]
    )
    test = app.load_server_test(config.seed)
    epochs = config.rounds * config.train.epochs
    settings = config.train.model_copy(update={"epochs": 1, "max_batches": None})
    print(
        f"app={config.app} pooled train={len(data[1])} test={len(test[1])} epochs={epochs} "
        f"train={settings.model_dump()}"
    )
    params = app.initial_parameters(config.seed)
    for epoch in range(1, epochs + 1):
        params, stats = app.train(params, data, settings, config.seed * 100_003 + epoch)
        result = app.evaluate(params, test)
        print(
            f"epoch {epoch:3d}  train_loss {stats['loss']:.4f}  test_loss {result['loss']:.4f}  test_acc "
            f"{result['accuracy']:.4f}",
            flush=True,
        )
    print(f"final test accuracy: {result['accuracy']:.4f}")
    print(f"wall time: {time.perf_counter() - start:.2f} s")
    return result["accuracy"]


if __name__ == "__main__":
    main()
