import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from brokerfl.handlers.datasets import (
    DATASETS,
    Dataset,
    dirichlet_partition,
    iid_partition,
    load_dataset,
    partition,
)


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    merged = np.concatenate(parts)
    assert len(merged) == n, "partition must not duplicate or drop samples"
    assert np.array_equal(np.sort(merged), np.arange(n))


def skewed_labels(n_per_class: int = 100, num_classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(num_classes), n_per_class)


# --- load_dataset -----------------------------------------------------------


@pytest.mark.parametrize(
    "name, n_total, features",
    [("digits", 1797, 64), ("mnist5k", 5000, 784)],
)
def test_load_dataset_shapes_dtypes_ranges(name: str, n_total: int, features: int) -> None:
    data = load_dataset(name)
    assert isinstance(data, Dataset) and data.name == name
    assert data.num_features == features and data.num_classes == 10
    assert len(data.x_train) + len(data.x_test) == n_total
    assert len(data.x_test) == pytest.approx(0.2 * n_total, abs=1)
    for x, y in [(data.x_train, data.y_train), (data.x_test, data.y_test)]:
        assert x.dtype == np.float32 and x.shape == (len(y), features)
        assert y.dtype == np.int64
        assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
        assert set(np.unique(y)) == set(range(10))


def test_load_dataset_split_is_stratified_and_seeded() -> None:
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=1)
    train_frac = np.bincount(a.y_train) / np.bincount(np.concatenate([a.y_train, a.y_test]))
    assert np.allclose(train_frac, 0.8, atol=0.02)
    assert not np.array_equal(a.y_test, b.y_test)
    # A different test_fraction is a different cache entry.
    assert len(load_dataset("digits", test_fraction=0.5).y_test) == 899


def test_load_dataset_is_cached_and_read_only() -> None:
    assert load_dataset("digits") is load_dataset("digits", test_fraction=0.2, seed=0)
    with pytest.raises(ValueError):
        load_dataset("digits").x_train[0, 0] = 1.0


def test_load_dataset_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="cifar") as info:
        load_dataset("cifar")
    assert all(name in str(info.value) for name in DATASETS)


def test_load_dataset_rejects_bad_test_fraction() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.0)


# --- iid ----------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 500), data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_iid_partition_is_balanced_disjoint_cover(n: int, data: st.DataObject, seed: int) -> None:
    k = data.draw(st.integers(1, n))
    parts = iid_partition(n, k, seed)
    assert len(parts) == k
    assert_disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_partition_deterministic_and_shuffled() -> None:
    a = iid_partition(1000, 7, seed=3)
    b = iid_partition(1000, 7, seed=3)
    c = iid_partition(1000, 7, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(np.concatenate(a), np.arange(1000))


# --- dirichlet ------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    num_clients=st.integers(1, 20),
    alpha=st.sampled_from([0.05, 0.1, 0.5, 1.0, 100.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_dirichlet_partition_disjoint_cover_min_size(num_clients: int, alpha: float, seed: int) -> None:
    labels = skewed_labels()
    parts = dirichlet_partition(labels, num_clients, alpha, seed, min_size=10)
    assert len(parts) == num_clients
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_partition_deterministic() -> None:
    labels = load_dataset("digits").y_train
    a = dirichlet_partition(labels, 10, 0.5, seed=11)
    b = dirichlet_partition(labels, 10, 0.5, seed=11)
    c = dirichlet_partition(labels, 10, 0.5, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def dominant_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Largest fraction of a single class held by any client (0.1 for a perfect IID split of 10 classes)."""
    return max(np.bincount(labels[p], minlength=10).max() / len(p) for p in parts)


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    labels = load_dataset("digits").y_train
    skewed = dirichlet_partition(labels, 10, alpha=0.1, seed=0)
    near_iid = dirichlet_partition(labels, 10, alpha=1000.0, seed=0)
    iid = iid_partition(len(labels), 10, seed=0)
    assert dominant_class_share(labels, skewed) > 0.6
    assert dominant_class_share(labels, near_iid) < 0.2
    assert dominant_class_share(labels, iid) < 0.25
    # With small alpha most clients miss several classes entirely.
    missing = [10 - len(np.unique(labels[p])) for p in skewed]
    assert np.mean(missing) >= 3


def test_dirichlet_partition_impossible_min_size() -> None:
    with pytest.raises(ValueError, match="at least 10 samples"):
        dirichlet_partition(skewed_labels(5), 6, 0.5, seed=0, min_size=10)  # 60 > 50 samples
    # Feasible in principle (exactly 10 each) but practically never drawn: hits the attempt cap.
    with pytest.raises(ValueError, match="attempts"):
        dirichlet_partition(skewed_labels(10), 10, 0.01, seed=0, min_size=10)


def test_dirichlet_partition_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(skewed_labels(), 5, 0.0, seed=0)


# --- partition ---------------------------------------------------------------------


def test_partition_dispatches() -> None:
    labels = skewed_labels()
    assert all(
        np.array_equal(x, y) for x, y in zip(partition(labels, 4, "iid", seed=5), iid_partition(len(labels), 4, 5))
    )
    assert all(
        np.array_equal(x, y)
        for x, y in zip(
            partition(labels, 4, "dirichlet", alpha=0.3, seed=5),
            dirichlet_partition(labels, 4, 0.3, 5),
        )
    )


@pytest.mark.parametrize("num_clients", [0, -1, 1001])
def test_partition_rejects_bad_num_clients(num_clients: int) -> None:
    with pytest.raises(ValueError, match="num_clients"):
        partition(skewed_labels(), num_clients, "iid")


def test_partition_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="shards"):
        partition(skewed_labels(), 3, "shards")
