import numpy as np
import pytest

from brokerfl.handlers.strategies.aggregate import (
    BadUpdate,
    check_update,
    fold_update,
    magnitude_limit,
    new_running_sum,
    weighted_average,
)
from brokerfl.handlers.strategies.fedavg import FedAvg


def test_fedavg_matches_hand_computation():
    global_model = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    updates = [
        ({"w": np.array([[1, 2], [3, 4]], np.float32), "b": np.array([1, 1, 1], np.float32)}, 10),
        ({"w": np.array([[5, 6], [7, 8]], np.float32), "b": np.array([0, 2, 4], np.float32)}, 30),
    ]
    strategy = FedAvg()
    strategy.start_round(global_model)
    for params, n in updates:
        strategy.fold(params, n)
    result = strategy.finish_round(global_model)
    # (10 * a + 30 * b) / 40, by hand
    assert np.array_equal(result["w"], np.array([[4, 5], [6, 7]], np.float32))
    assert np.array_equal(result["b"], np.array([0.25, 1.75, 3.25], np.float32))
    assert result["w"].dtype == np.float32
    assert strategy.folded() == 2


def test_fold_is_in_float64_and_order_independent_in_float32():
    rng = np.random.default_rng(0)
    like = {"w": np.zeros(1000, np.float32)}
    updates = [({"w": rng.normal(size=1000).astype(np.float32)}, float(rng.integers(1, 100))) for _ in range(20)]
    results = []
    for order in (updates, updates[::-1], updates[5:] + updates[:5]):
        acc = new_running_sum(like)
        for params, weight in order:
            fold_update(acc, params, weight)
        results.append(weighted_average(acc, like)["w"])
    assert all(np.array_equal(results[0], r) for r in results[1:])
    assert acc.sums["w"].dtype == np.float64


def test_weighted_average_needs_an_update():
    with pytest.raises(ValueError, match="no update"):
        weighted_average(new_running_sum({"w": np.zeros(1)}), {"w": np.zeros(1)})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"w": np.zeros((2, 3), np.float32)}, "shape"),
        ({"w": np.zeros((2, 2), np.float32), "extra": np.zeros(1)}, "unexpected"),
        ({}, "missing"),
        ({"w": np.array([[0, np.nan], [0, 0]], np.float32)}, "NaN"),
        ({"w": np.array([[0, np.inf], [0, 0]], np.float32)}, "NaN or infinite"),
    ],
)
def test_check_update_rejects_bad_updates(params, message):
    with pytest.raises(BadUpdate, match=message):
        check_update(params, {"w": np.zeros((2, 2), np.float32)})


def test_fold_rejects_non_positive_weight():
    acc = new_running_sum({"w": np.zeros(1)})
    with pytest.raises(BadUpdate):
        fold_update(acc, {"w": np.ones(1)}, 0)


def test_sampling_by_fraction_and_count_is_deterministic():
    clients = [str(i) for i in range(10)]
    by_fraction = FedAvg(fraction=0.3)
    picked = by_fraction.sample(1, clients, np.random.default_rng(1))
    assert len(picked) == 3 and set(picked) <= set(clients)
    assert picked == by_fraction.sample(1, clients, np.random.default_rng(1))
    assert len(FedAvg(clients_per_round=4).sample(1, clients, np.random.default_rng(1))) == 4
    assert FedAvg().sample(1, clients, np.random.default_rng(1)) == sorted(clients)
    assert FedAvg(fraction=0.01).sample(1, clients, np.random.default_rng(1)) != []


def test_a_reused_running_sum_starts_from_zero():
    like = {"w": np.zeros(3, np.float32)}
    acc = new_running_sum(like)
    fold_update(acc, {"w": np.ones(3, np.float32)}, 2.0)
    again = new_running_sum(like, reuse=acc)
    assert again is acc and again.count == 0 and again.total_weight == 0 and not again.sums["w"].any()
    assert new_running_sum({"w": np.zeros(4, np.float32)}, reuse=acc) is not acc  # shapes differ


GLOBAL = {"w": np.full((100, 10), 0.1, np.float32), "b": np.zeros(10, np.float32), "steps": np.array(7, np.int64)}


def near(scale: float, **replace) -> dict:
    rng = np.random.default_rng(0)
    update = {
        "w": (GLOBAL["w"] + scale * rng.normal(size=(100, 10))).astype(np.float32),
        "b": np.zeros(10, np.float32),
        "steps": np.array(8, np.int64),
    }
    return {**update, **replace}


def test_an_honest_step_passes_the_distance_check():
    # a step of RMS 0.5 per value: far more than local SGD moves the repository's models in a round
    check_update(near(0.5), GLOBAL, max_distance_ratio=10.0)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (
            near(0.0, w=np.full((100, 10), 1e30, np.float32)),
            "strategy.max_update_ratio",
        ),  # finite, but ~1e28 times the bound
        (near(0.0, b=np.full(10, -1e37, np.float32)), "beyond the .* a fold of float32 takes"),
        (near(0.0, w=np.full((100, 10), np.nan, np.float32)), "NaN"),
        (near(0.0, steps=np.array(2**60, np.int64)), "beyond 2\\*\\*53"),
    ],
)
def test_an_update_that_would_poison_or_overflow_the_fold_is_refused(update, message):
    with pytest.raises(BadUpdate, match=message):
        check_update(update, GLOBAL, max_distance_ratio=10.0)


def test_the_distance_check_turned_off_still_refuses_what_would_overflow():
    check_update(near(0.0, w=np.full((100, 10), 1e30, np.float32)), GLOBAL, max_distance_ratio=None)
    with pytest.raises(BadUpdate, match="beyond"):
        check_update(near(0.0, w=np.full((100, 10), 3e38, np.float32)), GLOBAL, max_distance_ratio=None)


def test_the_distance_bound_scales_with_the_model_and_has_a_floor_for_a_zero_model():
    zero = {"w": np.zeros(10_000, np.float32)}
    check_update({"w": np.full(10_000, 5.0, np.float32)}, zero, max_distance_ratio=10.0)  # RMS 5 < 10 x 1
    with pytest.raises(BadUpdate, match="max_update_ratio"):
        check_update({"w": np.full(10_000, 11.0, np.float32)}, zero, max_distance_ratio=10.0)
    big = {"w": np.full(10_000, 100.0, np.float32)}  # norm 1e4: 10 x (1e4 + 100) allows a move of 101,000
    check_update({"w": np.full(10_000, 1100.0, np.float32)}, big, max_distance_ratio=10.0)


def test_the_check_reads_a_large_model_block_by_block():
    # more values than one scratch block: every block is measured (the bad value is in the last)
    like = {"w": np.zeros(300_000, np.float32)}
    update = np.zeros(300_000, np.float32)
    update[-1] = 1e30
    with pytest.raises(BadUpdate, match="max_update_ratio"):
        check_update({"w": update}, like, max_distance_ratio=10.0)


def test_the_check_needs_no_memory_in_proportion_to_the_model():
    import tracemalloc

    like = {"w": np.zeros(2_000_000, np.float32)}
    update = {"w": np.full(2_000_000, 0.5, np.float32)}
    tracemalloc.start()
    check_update(update, like, max_distance_ratio=10.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 2**20, peak  # its 1 MiB scratch, not a copy of the 8 MB update


def test_magnitude_limit_leaves_room_for_the_fold_and_a_server_step():
    assert magnitude_limit(np.dtype(np.float16)) == pytest.approx(65504 / 256)
    assert magnitude_limit(np.dtype(np.float32), 1e6) == pytest.approx(float(np.finfo(np.float32).max) / 256)
    # float64: the sum of 2**20 updates of weight 1e6 stays finite, with room for a server step
    limit = magnitude_limit(np.dtype(np.float64), 1e6)
    assert np.isfinite(np.float64(limit) * 1e6 * 2**20 * 255)


def test_median_and_trimmed_mean_resist_one_outlier():
    from brokerfl.handlers.strategies.robust import Median, TrimmedMean

    like = {"w": np.zeros(3, np.float32)}
    updates = [
        {"w": np.array([1, 2, 3], np.float32)},
        {"w": np.array([2, 3, 4], np.float32)},
        {"w": np.array([3, 4, 5], np.float32)},
        {"w": np.array([1000, -1000, 1000], np.float32)},
    ]
    median = Median()
    median.start_round(like)
    for update in updates:
        median.fold(update, 1)
    assert np.array_equal(median.finish_round(like)["w"], np.array([2.5, 2.5, 4.5], np.float32))
    trimmed = TrimmedMean(beta=0.25)
    trimmed.start_round(like)
    for update in updates:
        trimmed.fold(update, 1)
    # per coordinate the largest and smallest value go: (2+3)/2, (2+3)/2, (4+5)/2
    assert np.array_equal(trimmed.finish_round(like)["w"], np.array([2.5, 2.5, 4.5], np.float32))
    with pytest.raises(ValueError):
        TrimmedMean(beta=0.5)


@pytest.mark.parametrize(
    ("n", "beta", "min_trim", "k"),
    [
        (6, 0.1, 1, 1),  # beta x n < 1: min_trim trims one from each end
        (6, 0.1, 0, 0),  # Flower's and scipy's floor(beta x n)
        (10, 0.2, 1, 2),
        (3, 0.1, 1, 1),  # the median
        (2, 0.1, 1, 0),  # nothing to trim while keeping a value: the mean of the two
        (5, 0.45, 3, 2),  # at most (n - 1) // 2
    ],
)
def test_trimmed_count(n, beta, min_trim, k):
    from brokerfl.handlers.strategies.robust import trimmed_count

    assert trimmed_count(n, beta, min_trim) == k


def test_trimmed_mean_at_its_defaults_trims_an_outlier_among_six():
    from brokerfl.handlers.strategies.robust import TrimmedMean

    like = {"w": np.zeros(2, np.float32)}
    trimmed = TrimmedMean()  # beta 0.1: floor(0.6) = 0, min_trim 1
    trimmed.start_round(like)
    for value in [1.0, 2.0, 3.0, 4.0, 5.0]:
        trimmed.fold({"w": np.full(2, value, np.float32)}, 1)
    trimmed.fold({"w": np.full(2, 1e6, np.float32)}, 1_000_000)  # its claim counts for nothing
    assert trimmed.finish_round(like)["w"].tolist() == [3.5, 3.5]  # mean of 2, 3, 4, 5


def test_trimmed_mean_that_cannot_trim_its_rounds_is_refused_when_the_run_starts():
    from brokerfl.handlers.strategies.robust import TrimmedMean

    strategy = TrimmedMean(beta=0.1, min_trim=0)
    with pytest.raises(ValueError, match="trims nothing from rounds of 6 updates"):
        strategy.bind_run(seed=0, clients=6)
    TrimmedMean(beta=0.1, min_trim=0).bind_run(seed=0, clients=10)  # floor(0.1 x 10) = 1
    TrimmedMean(beta=0.1, min_trim=0, clients_per_round=2).bind_run(
        seed=0, clients=6
    )  # 2 per round: nothing could be trimmed anyway


def test_a_reused_running_sum_is_zeroed_at_its_first_use_not_at_round_start():
    like = {"w": np.ones(3, np.float32)}
    acc = new_running_sum(like)
    fold_update(acc, {"w": np.full(3, 2.0, np.float32)}, 1.0)
    memory = acc._sums["w"]
    again = new_running_sum(like, reuse=acc)
    assert again is acc and again.count == 0 and again.total_weight == 0.0
    assert memory[0] == 2.0  # not yet zeroed: the round's task goes out first
    fold_update(again, {"w": np.full(3, 5.0, np.float32)}, 1.0)
    assert again.sums["w"] is memory and list(memory) == [5.0, 5.0, 5.0]
    assert list(new_running_sum(like, reuse=again).sums["w"]) == [0.0, 0.0, 0.0]  # any access zeroes first


def _exact_sum(terms):
    from fractions import Fraction

    return sum(Fraction(w) * (Fraction(float(x)) - Fraction(float(b))) for w, x, b in terms)


@pytest.mark.parametrize("with_base", [False, True], ids=["update", "delta"])
def test_a_float64_fold_is_order_independent_and_rounds_the_exact_sum(with_base):
    """Float64 tensors fold in double-double: every order gives the same bits, and the sum
    is the float64 nearest to the exact one (checked with fractions); a plain float64 sum
    of the same terms depends on the order."""
    rng = np.random.default_rng(1)
    size, n = 2000, 12
    like = {"w": np.zeros(size, np.float64), "f": np.zeros(4, np.float32)}
    updates = [
        {"w": rng.standard_normal(size) * 10.0 ** rng.integers(-4, 4), "f": rng.standard_normal(4).astype(np.float32)}
        for _ in range(n)
    ]
    weights = [float(rng.integers(1, 1000)) for _ in range(n - 1)] + [0.3711]  # one weight not an integer
    base = {"w": rng.standard_normal(size), "f": np.zeros(4, np.float32)} if with_base else None
    orders = [list(range(n)), list(range(n))[::-1]] + [list(rng.permutation(n)) for _ in range(10)]
    averages, plain = [], []
    for order in orders:
        acc = new_running_sum(like)
        for i in order:
            fold_update(acc, updates[i], weights[i], base=base)
        averages.append(weighted_average(acc, like))
        plain.append(sum(weights[i] * (updates[i]["w"] - (base["w"] if base else 0.0)) for i in order))
    assert all(
        np.array_equal(averages[0]["w"], a["w"]) and np.array_equal(averages[0]["f"], a["f"]) for a in averages[1:]
    )
    assert averages[0]["w"].dtype == np.float64
    assert any(not np.array_equal(plain[0], p) for p in plain[1:])  # what the double-double is for
    acc = new_running_sum(like)
    for i in orders[-1]:
        fold_update(acc, updates[i], weights[i], base=base)
    for j in range(0, size, 97):
        exact = _exact_sum([(weights[i], updates[i]["w"][j], base["w"][j] if base else 0.0) for i in range(n)])
        assert acc.sums["w"][j] == float(exact)


def test_reading_a_float64_sum_keeps_folding_exactly():
    """``sums`` (read by FedOpt, DP's noise, clipping) rounds the double-double to its float64;
    folds go on from there, and a reused sum zeroes its low words too."""
    like = {"w": np.zeros(1, np.float64)}
    acc = new_running_sum(like)
    fold_update(acc, {"w": np.array([1.0])}, 1.0)
    fold_update(acc, {"w": np.array([2.0**-60])}, 1.0)
    assert acc._lows["w"][0] == 2.0**-60 and acc.sums["w"][0] == 1.0 and acc._lows["w"][0] == 0.0
    fold_update(acc, {"w": np.array([2.0**-60])}, 1.0)
    again = new_running_sum(like, reuse=acc)
    assert again is acc
    fold_update(again, {"w": np.array([3.0])}, 1.0)
    assert again.sums["w"][0] == 3.0 and again._lows["w"][0] == 0.0
