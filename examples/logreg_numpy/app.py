"""Logistic regression in plain numpy on scikit-learn's breast-cancer data, split across
"hospitals": proof that the runtime is not tied to torch (this app never imports it).

``model`` returns named numpy arrays, so the app brings its own ``train`` and
``evaluate`` (minibatch gradient descent on the mean log-loss, plus ``weight_decay`` as L2).
Each hospital standardises its features with its own training statistics and keeps a
stratified local test split; the server holds no data at all, so the run's metrics come
from federated evaluation on the hospitals' test splits.

Options (``app_options``): ``test_fraction`` (0.2 of each hospital's records).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from brokerfl.app import Partition
from brokerfl.config import TrainConfig

DEFAULTS = {"test_fraction": 0.2}


def check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; this app takes {sorted(DEFAULTS)}")
    fraction = options.get("test_fraction", DEFAULTS["test_fraction"])
    if not (isinstance(fraction, float) and 0 < fraction < 1):
        raise ValueError(f"test_fraction: a number in (0, 1), got {fraction!r}")


def model(options: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"weight": np.zeros(30, np.float64), "bias": np.zeros(1, np.float64)}


def load_partition(index: int, num_partitions: int, options: dict[str, Any], seed: int) -> Partition:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import StratifiedKFold, train_test_split

    x, y = load_breast_cancer(return_X_y=True)
    # hospital `index` holds one stratified fold of the records
    folds = StratifiedKFold(n_splits=num_partitions, shuffle=True, random_state=seed).split(x, y)
    rows = list(folds)[index][1]
    fraction = options.get("test_fraction", DEFAULTS["test_fraction"])
    x_train, x_test, y_train, y_test = train_test_split(
        x[rows], y[rows], test_size=fraction, stratify=y[rows], random_state=seed
    )
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-8  # local statistics only
    return Partition(
        train=((x_train - mean) / std, y_train.astype(np.float64)),
        test=((x_test - mean) / std, y_test.astype(np.float64)),
    )


def _probabilities(parameters: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(x @ parameters["weight"] + parameters["bias"][0])))


def train(parameters: dict[str, np.ndarray], data, settings: TrainConfig, seed: int):
    x, y = data
    w, b = parameters["weight"].copy(), parameters["bias"].copy()
    rng = np.random.default_rng(seed)
    total, seen, steps = 0.0, 0, 0
    for _ in range(settings.epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            p = _probabilities({"weight": w, "bias": b}, x[batch])
            total += _log_loss(p, y[batch]) * len(batch)
            seen += len(batch)
            error = p - y[batch]
            w -= settings.lr * (x[batch].T @ error / len(batch) + settings.weight_decay * w)
            b -= settings.lr * error.mean()
            steps += 1
            if settings.max_batches is not None and steps >= settings.max_batches:
                return {"weight": w, "bias": b}, {"loss": total / seen, "num_samples": len(y)}
    return {"weight": w, "bias": b}, {"loss": total / seen, "num_samples": len(y)}


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def evaluate(parameters: dict[str, np.ndarray], data) -> dict[str, float]:
    x, y = data
    p = _probabilities(parameters, x)
    return {"loss": _log_loss(p, y), "accuracy": float(((p > 0.5) == (y == 1)).mean()), "num_samples": len(y)}
