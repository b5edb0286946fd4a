"""``brokerfl new NAME``: a ready-to-run app package, like ``flwr new``.

It writes an installable package whose app trains a small torch model on scikit-learn's
digits (shipped with scikit-learn, so it runs offline), a config, a test and a README:

    NAME/
      pyproject.toml        pip install -e NAME
      brokerfl.yaml         the run: app NAME.app, clients, rounds, strategy
      NAME/app.py           model(), load_partition(), load_server_test(): edit these
      tests/test_app.py     runs the federation in-process (pytest NAME/tests)
      Dockerfile            the worker image with this app in it (FROM the brokerfl image)
      README.md             how to run it in simulation, over RabbitMQ and in containers

The app uses the defaults of the app API (brokerfl.app): a cross-entropy SGD loop and
accuracy/loss, so it holds only the model and the data; it says where ``train`` and
``evaluate`` go when the user wants their own.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class ScaffoldError(ValueError):
    pass


def check_app_name(name: str) -> str:
    """A package name: lower case letters, digits and underscores, starting with a letter."""
    if (
        not _NAME.match(name)
        or keyword.iskeyword(name)
        or name in {"brokerfl", "handlers", "examples", "tests", "torch", "numpy"}
    ):
        raise ScaffoldError(
            f"app name {name!r}: use a Python package name (lower case letters, digits and '_', "
            "starting with a letter; not a keyword or an existing package such as brokerfl)"
        )
    return name


def create_app(name: str, parent: str | Path = ".") -> Path:
    """Write the package ``parent/name`` and return its folder; refuses to overwrite."""
    check_app_name(name)
    root = Path(parent) / name
    if root.exists():
        raise ScaffoldError(f"{root} already exists: choose another name or folder")
    files = {
        "pyproject.toml": PYPROJECT,
        "brokerfl.yaml": CONFIG,
        f"{name}/__init__.py": '"""{name}: a brokerfl app."""\n',
        f"{name}/app.py": APP,
        "tests/test_app.py": TEST,
        "Dockerfile": DOCKERFILE,
        "README.md": README,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.replace("{name}", name))
    return root


PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "A brokerfl app"
requires-python = ">=3.11"
dependencies = ["brokerfl[torch]"]   # brings torch, numpy and scikit-learn

[tool.setuptools.packages.find]
include = ["{name}*"]
"""

CONFIG = """\
# The run: brokerfl simulate brokerfl.yaml (in this folder), or brokerfl server / client.
run: {name}
app: {name}.app
app_options:
  hidden: 64          # read by {name}/app.py: model()
clients: 5
rounds: 10
train:
  epochs: 1
  batch_size: 16
  lr: 0.05
strategy:
  name: fedavg
"""

APP = '''\
"""{name}: the model, the data and (optionally) the training loop of a brokerfl app.

brokerfl calls these functions (see ``brokerfl.app`` for the whole API):

- ``model(options)``: the torch model. Its whole ``state_dict`` (weights and buffers)
  travels between server and clients.
- ``load_partition(index, num_partitions, options, seed)``: client ``index``'s training
  data, here ``(x, y)`` arrays. In a real deployment each site loads its own data here.
- ``load_server_test(options, seed)``: the server's test data (optional; without it the
  server asks the clients to evaluate: federated evaluation).
- ``train(model, data, settings, seed)`` / ``evaluate(model, data)``: optional; the
  defaults are a cross-entropy SGD loop (settings: the config's ``train`` section) and
  accuracy/loss. Define them here to use your own loop.

``options`` is the config's ``app_options``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OPTIONS = {"hidden"}


def check_options(options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; this app takes {sorted(OPTIONS)}")
    if int(options.get("hidden", 64)) < 1:
        raise ValueError("hidden must be at least 1")


def model(options: dict[str, Any]) -> nn.Module:
    hidden = int(options.get("hidden", 64))
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _split(seed: int) -> list[np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return train_test_split(x, y.astype(np.int64), test_size=0.2, random_state=seed, stratify=y)


def load_partition(
    index: int, num_partitions: int, options: dict[str, Any], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    x_train, _, y_train, _ = _split(seed)
    order = np.random.default_rng(seed).permutation(len(y_train))
    rows = np.array_split(order, num_partitions)[index]
    return x_train[rows], y_train[rows]


def load_server_test(options: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = _split(seed)
    return x_test, y_test


# Your own training loop, if the default does not fit (uncomment and edit):
#
# import torch
#
# def train(model: nn.Module, data, settings, seed: int) -> dict[str, float]:
#     x, y = (torch.as_tensor(a) for a in data)
#     optimiser = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
#     generator = torch.Generator().manual_seed(seed)
#     model.train()
#     for _ in range(settings.epochs):
#         for rows in torch.randperm(len(y), generator=generator).split(settings.batch_size):
#             optimiser.zero_grad()
#             loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
#             loss.backward()
#             optimiser.step()
#     return {"loss": float(loss), "num_samples": len(y)}
'''

TEST = '''\
"""The app runs a short federation in this process (no broker): pytest tests/"""

from pathlib import Path

from brokerfl.config import load_config
from brokerfl.assembly.simulate import simulate

CONFIG = Path(__file__).resolve().parent.parent / "brokerfl.yaml"


def test_a_short_federation_learns(tmp_path):
    config = load_config(CONFIG, {"rounds": 3})
    result = simulate(config, tmp_path)
    assert len(result.records) == 3
    assert result.records[-1]["accuracy"] > 0.8
'''

DOCKERFILE = """\
# The brokerfl worker image with this app installed: every container of the federation runs
# it (docker/compose.yaml's server and clients). From this folder:
#   docker build -t {name} --build-arg BROKERFL_IMAGE=brokerfl:latest .
#   BROKERFL_IMAGE={name} BROKERFL_CONFIG=/app/brokerfl.yaml \\
#     docker compose -f <brokerfl>/docker/compose.yaml up --no-build
ARG BROKERFL_IMAGE=brokerfl:latest
FROM ${BROKERFL_IMAGE}
USER root
COPY . /app
# brokerfl and its dependencies are in the base image already
RUN pip install --no-deps /app
USER brokerfl
ENV BROKERFL_CONFIG=/app/brokerfl.yaml
"""

README = """\
# {name}

A brokerfl app: `{name}/app.py` holds the model and the data, `brokerfl.yaml` the run.

```bash
pip install -e .                    # once (from this folder)
brokerfl simulate brokerfl.yaml     # the whole federation in one process, no broker
python -m pytest tests              # the app's test
```

Over RabbitMQ, one server and the clients as separate processes (or containers):

```bash
brokerfl server brokerfl.yaml --broker amqp://guest:guest@127.0.0.1:5672/
brokerfl client brokerfl.yaml --broker amqp://guest:guest@127.0.0.1:5672/ --client-id 0-4
```

In containers: build `Dockerfile` (the brokerfl worker image plus this app) and start
brokerfl's `docker/compose.yaml` with it:

```bash
docker build -t {name} --build-arg BROKERFL_IMAGE=brokerfl:latest .
BROKERFL_IMAGE={name} BROKERFL_CONFIG=/app/brokerfl.yaml docker compose -f <brokerfl>/docker/compose.yaml up --no-build
```

Edit `model()` and `load_partition()` in `{name}/app.py` for your own model and data;
`app_options` in `brokerfl.yaml` reaches every function as `options`.
"""
