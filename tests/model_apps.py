"""A small torch app for tests of the model as a product (``app: tests.model_apps``):
Gaussian blobs, 4 classes, 8 features, a 2-layer MLP; float64 or float32.

``app_options``:

- ``dtype``: ``float64`` (default) or ``float32``, of the model and the data;
- ``double_partitions``: partitions whose ``train`` calls ``model.double()`` after training
  on a float32 model (a side effect on the module that must not reach other clients);
- ``samples``: samples per partition (default 60).

``train`` takes a ``context``; each call records ``(client_id, round, settings.lr,
context.config)`` in :data:`CALLS` and counts its rounds in ``context.state["rounds"]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from brokerfl.app.torch_adapter import sgd

CALLS: list[dict] = []
FEATURES, CLASSES = 8, 4


def _dtype(options):
    return {"float64": torch.float64, "float32": torch.float32}[options.get("dtype", "float64")]


def model(options):
    net = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    return net.to(_dtype(options))


def _blobs(n: int, seed: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(scale=2.0, size=(CLASSES, FEATURES))
    y = rng.integers(0, CLASSES, n)
    x = centres[y] + rng.normal(size=(n, FEATURES))
    return x.astype(np.float64 if dtype == torch.float64 else np.float32), y.astype(np.int64)


def load_partition(index, num_partitions, options, seed):
    x, y = _blobs(int(options.get("samples", 60)), seed * 1000 + index, _dtype(options))
    return x, y


def load_server_test(options, seed):
    return _blobs(400, seed * 1000 + 999, _dtype(options))


def train(model, data, settings, seed, context, options):
    CALLS.append(
        {"client_id": context.client_id, "round": context.round, "lr": settings.lr, "config": dict(context.config)}
    )
    context.state["rounds"] = context.state.get("rounds", 0) + 1
    loss = sgd(model, data, **settings.model_dump(), seed=seed)
    if int(context.client_id) in options.get("double_partitions", []):
        model.double()
    return {"loss": loss}


def configure_train(round_, options):
    """With ``phases`` in the options: that round's phase name reaches ``context.config``."""
    phases = options.get("phases")
    return {"phase": phases[min(round_, len(phases)) - 1]} if phases else {}
