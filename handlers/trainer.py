"""Small torch MLP trainer operating on plain ``dict[str, np.ndarray]`` parameters.

The runtime ships parameters between processes as numpy arrays (often
read-only views of shared buffers), so every entry point copies them into
fresh torch tensors and returns fresh numpy arrays. Nothing here touches
torch's global RNG: initialisation and shuffling use explicit Generators, so
results are bitwise reproducible for the same inputs and seed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brokerfl.app.torch_adapter import sgd


def build_mlp(num_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """Linear+ReLU for each hidden size, then a Linear output layer (logits)."""
    layers: list[nn.Module] = []
    width = num_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _skeleton(num_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    # Built on the meta device so no memory is allocated and torch's default
    # initialisation does not consume the global RNG; real tensors are
    # attached afterwards with load_state_dict(assign=True).
    with torch.device("meta"):
        return build_mlp(num_features, hidden, num_classes)


def init_parameters(num_features: int, hidden: Sequence[int], num_classes: int, seed: int) -> dict[str, np.ndarray]:
    """Fresh float32 parameters, deterministic in `seed`.

    Same distribution as torch's default nn.Linear init (U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) for weights and biases), but drawn from a private
    Generator so concurrent callers and the global RNG are unaffected.
    """
    generator = torch.Generator().manual_seed(seed)
    params: dict[str, np.ndarray] = {}
    for index, layer in enumerate(_skeleton(num_features, hidden, num_classes)):
        if not isinstance(layer, nn.Linear):
            continue
        bound = 1.0 / math.sqrt(layer.in_features)
        for kind in ("weight", "bias"):
            tensor = torch.empty(getattr(layer, kind).shape, dtype=torch.float32)
            params[f"{index}.{kind}"] = tensor.uniform_(-bound, bound, generator=generator).numpy()
    return params


def _load_model(
    parameters: Mapping[str, np.ndarray],
    num_features: int,
    hidden: Sequence[int],
    num_classes: int,
    *,
    copy: bool = True,
) -> nn.Sequential:
    """Build the MLP and fill it with copies of `parameters`, validating keys and shapes.
    ``copy=False``: float32 arrays are used in place, so evaluating a model costs no second
    copy of it; only for what never writes the weights (evaluation, or plain SGD, whose
    first step writes elsewhere: torch_app.sgd's ``borrowed``)."""
    model = _skeleton(num_features, hidden, num_classes)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    got = {name: tuple(np.shape(arr)) for name, arr in parameters.items()}
    if got != expected:
        missing = sorted(expected.keys() - got.keys())
        unexpected = sorted(got.keys() - expected.keys())
        wrong = {k: (got[k], expected[k]) for k in expected.keys() & got.keys() if got[k] != expected[k]}
        raise ValueError(
            f"parameters do not match MLP(num_features={num_features}, hidden={list(hidden)}, "
            f"num_classes={num_classes}): missing={missing}, unexpected={unexpected}, "
            f"shape mismatches (got, expected)={wrong}"
        )
    if copy:
        # torch.tensor always copies, so read-only inputs are fine and never aliased.
        tensors = {name: torch.tensor(parameters[name], dtype=torch.float32) for name in expected}
    else:
        with warnings.catch_warnings():  # decoded arrays are read-only; nothing here writes them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensors = {
                name: torch.from_numpy(np.ascontiguousarray(parameters[name], dtype=np.float32)) for name in expected
            }
    model.load_state_dict(tensors, strict=True, assign=True)
    return model


def _as_inputs(x: np.ndarray, y: np.ndarray, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"expected x of shape (n, features) and y of shape (n,), got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise ValueError("no samples given")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)


def train_local(
    parameters: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    hidden: Sequence[int],
    num_classes: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    max_batches: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Run minibatch SGD from `parameters` on (x, y) and return the updated parameters.

    The reported loss is the sample-weighted mean cross-entropy over the
    batches actually trained on (excluding the proximal term, so it stays
    comparable with `evaluate`). A fresh optimizer is created per call, so
    momentum does not carry over between calls.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    if proximal_mu < 0:
        raise ValueError(f"proximal_mu must be >= 0, got {proximal_mu}")
    xt, yt = _as_inputs(x, y, num_classes)
    # Plain SGD needs no copy of the model to start from: the first step writes the new
    # weights into the gradients' memory (torch_app.sgd's `borrowed`). A process hosting
    # many logical clients then holds the shared model and one step's gradients, not a
    # copy of the model as well, while the first batch trains.
    plain = momentum == 0 and weight_decay == 0 and proximal_mu == 0
    model = _load_model(parameters, xt.shape[1], hidden, num_classes, copy=not plain)
    loss = sgd(
        model,
        (xt, yt),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        proximal_mu=proximal_mu,
        max_batches=max_batches,
        seed=seed,
        borrowed=plain,
    )
    n = len(xt)

    state = model.state_dict()
    # Preserve the caller's key order; .numpy() shares memory with tensors we
    # created ourselves, so the arrays are already fresh and writable.
    new_params = {name: state[name].detach().numpy() for name in parameters}
    return new_params, {"loss": loss, "num_samples": n}


@torch.no_grad()
def evaluate(
    parameters: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    hidden: Sequence[int],
    num_classes: int,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Mean cross-entropy, accuracy and sample count of the MLP on (x, y)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    xt, yt = _as_inputs(x, y, num_classes)
    model = _load_model(parameters, xt.shape[1], hidden, num_classes, copy=False)
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(xt), batch_size):
        logits = model(xt[start : start + batch_size])
        labels = yt[start : start + batch_size]
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == labels).sum())
    n = len(xt)
    return {"loss": total_loss / n, "accuracy": correct / n, "num_samples": n}
