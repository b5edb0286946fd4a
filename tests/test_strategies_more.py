"""Adaptive server optimizers, Krum / Multi-Krum / Bulyan, norm bounding and DP-FedAvg
against hand computations on small fixed inputs (several rounds for the stateful ones),
state resumed mid-run, and the privacy accounting against Opacus's accountant."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from brokerfl.handlers.strategies.base import load_strategy
from brokerfl.handlers.strategies.krum import bulyan_select, mean_closest_to_median, pairwise_squared_distances


def run_round(strategy, global_parameters, updates):
    """One synchronous round: ``updates`` are (parameters, num_samples)."""
    strategy.start_round(global_parameters)
    for parameters, num_samples in updates:
        strategy.fold(parameters, num_samples)
    return strategy.finish_round(global_parameters)


def w(*values):
    return {"w": np.array(values, np.float64)}


# ---------------------------------------------------------------- adaptive server optimizers

OPTIONS = {"eta": 0.1, "beta_1": 0.5, "beta_2": 0.5, "tau": 0.1}


def two_rounds(name, **options):
    """Round 1: x = 0, updates 1 (1 sample) and 3 (3 samples): mean 2.5, delta 2.5.
    Round 2: one update x1 + 1: delta 1."""
    strategy = load_strategy(name, **options)
    x1 = run_round(strategy, w(0.0), [(w(1.0), 1), (w(3.0), 3)])
    x2 = run_round(strategy, x1, [(w(x1["w"][0] + 1.0), 5)])
    return x1["w"][0], x2["w"][0], strategy


def test_fedadam_by_hand_over_two_rounds():
    x1, x2, strategy = two_rounds("fedadam", **OPTIONS)
    # v starts at tau^2 = 0.01 (the paper's plain step)
    m1, v1 = 0.5 * 2.5, 0.5 * 0.01 + 0.5 * 2.5**2  # 1.25, 3.13
    assert x1 == pytest.approx(0.1 * m1 / (math.sqrt(v1) + 0.1), rel=1e-12)
    m2, v2 = 0.5 * m1 + 0.5 * 1.0, 0.5 * v1 + 0.5 * 1.0  # 1.125, 2.065
    assert x2 == pytest.approx(x1 + 0.1 * m2 / (math.sqrt(v2) + 0.1), rel=1e-12)
    state = strategy.state_arrays()
    assert state["m/w"][0] == pytest.approx(m2) and state["v/w"][0] == pytest.approx(v2) and int(state["steps"]) == 2


def test_fedyogi_by_hand_over_two_rounds():
    x1, x2, _ = two_rounds("fedyogi", **OPTIONS)
    m1, v1 = 1.25, 0.01 + 0.5 * 6.25  # v - (1 - b2) d^2 sign(v - d^2), v < d^2: 3.135
    assert x1 == pytest.approx(0.1 * m1 / (math.sqrt(v1) + 0.1), rel=1e-12)
    m2, v2 = 1.125, v1 - 0.5 * 1.0  # v1 > d^2 = 1: 2.635
    assert x2 == pytest.approx(x1 + 0.1 * m2 / (math.sqrt(v2) + 0.1), rel=1e-12)


def test_fedadagrad_by_hand_over_two_rounds():
    x1, x2, _ = two_rounds("fedadagrad", **OPTIONS)
    m1, v1 = 1.25, 0.01 + 6.25
    assert x1 == pytest.approx(0.1 * m1 / (math.sqrt(v1) + 0.1), rel=1e-12)
    m2, v2 = 1.125, v1 + 1.0
    assert x2 == pytest.approx(x1 + 0.1 * m2 / (math.sqrt(v2) + 0.1), rel=1e-12)


def test_fedadam_bias_corrected_step_matches_flowers_formula():
    x1, x2, _ = two_rounds("fedadam", **OPTIONS, bias_correction=True, initial_v=0.0)
    m1, v1 = 1.25, 0.5 * 6.25
    eta_1 = 0.1 * math.sqrt(1 - 0.5**2) / (1 - 0.5**2)  # Flower: exponent round + 1, round 1
    assert x1 == pytest.approx(eta_1 * m1 / (math.sqrt(v1) + 0.1), rel=1e-12)
    m2, v2 = 1.125, 0.5 * v1 + 0.5
    eta_2 = 0.1 * math.sqrt(1 - 0.5**3) / (1 - 0.5**3)
    assert x2 == pytest.approx(x1 + eta_2 * m2 / (math.sqrt(v2) + 0.1), rel=1e-12)


def test_fedavgm_by_hand_over_two_rounds():
    x1, x2, _ = two_rounds("fedavgm", eta=1.0, momentum=0.5)
    assert x1 == pytest.approx(2.5)  # velocity 2.5
    assert x2 == pytest.approx(2.5 + (0.5 * 2.5 + 1.0))  # velocity 2.25


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_a_resumed_server_optimizer_continues_exactly(name):
    """Three rounds straight == two rounds, state stored and taken back by a fresh strategy,
    then the third: what a server killed between rounds does."""
    rng = np.random.default_rng(0)
    model = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    rounds = [
        [({k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in model.items()}, int(n)) for n in (3, 5)]
        for _ in range(3)
    ]
    straight = load_strategy(name)
    x = model
    for updates in rounds:
        x = run_round(straight, x, updates)
    first = load_strategy(name)
    y = model
    for updates in rounds[:2]:
        y = run_round(first, y, updates)
    state = {
        k: np.frombuffer(v.tobytes(), v.dtype).reshape(v.shape) for k, v in first.state_arrays().items()
    }  # read-only, as decoded
    resumed = load_strategy(name)
    resumed.resume(2, state)
    y = run_round(resumed, y, rounds[2])
    assert all(np.array_equal(x[k], y[k]) and y[k].dtype == np.float32 for k in model)


def test_bias_correction_is_refused_for_adagrad():
    with pytest.raises(ValueError, match="bias_correction"):
        load_strategy("fedadagrad", bias_correction=True)


# ---------------------------------------------------------------- Krum, Multi-Krum, Bulyan


def scalars(*values):
    """Updates of two tensors: ``a`` holds the value, ``b`` (float32) is zero."""
    return [({"a": np.array([v], np.float64), "b": np.zeros(1, np.float32)}, 1) for v in values]


GLOBAL = {"a": np.zeros(1), "b": np.zeros(1, np.float32)}


def test_krum_and_multi_krum_by_hand():
    # n = 5, f = 1: n - f - 2 = 2 neighbours. Squared distances: 0-1 1, 0-3 9, 1-3 4, 3-4 1,
    # 1-4 9, 0-4 16, and >= 256 to 20. Scores: 0: 1+9=10, 1: 1+4=5, 3: 1+4=5, 4: 1+9=10, 20: 545.
    updates = scalars(0, 1, 3, 4, 20)
    assert run_round(load_strategy("krum", f=1), GLOBAL, updates)["a"][0] == 1.0  # 1 and 3 tie: the earlier
    assert run_round(load_strategy("multi_krum", f=1, m=3), GLOBAL, updates)["a"][0] == pytest.approx(
        (1 + 3 + 0) / 3
    )  # 0 and 4 tie
    out = run_round(load_strategy("multi_krum", f=1), GLOBAL, updates)  # m = n - f = 4
    assert out["a"][0] == pytest.approx((0 + 1 + 3 + 4) / 4) and out["b"].dtype == np.float32


def test_bulyan_by_hand():
    # n = 7, f = 1: theta = 5 picked by Krum one at a time, beta = 3 closest to the median.
    # (picks worked out in the comments of krum.bulyan_select's test below)
    values = [0, 1, 2, 3, 4, 50, -40]
    distances = pairwise_squared_distances(np.array(values, np.float64)[:, None])
    # 7 left, 4 neighbours: scores 0:30 1:15 2:10 3:15 4:30 -> 2; 6 left, 3 neighbours: 0:26
    # 1:14 3:14 4:26 -> 1 (tie, earlier); 5 left, 2: 0:25 3:10 4:17 -> 3; 4 left, 1: 0:16
    # 4:16 -> 0; 3 left, 1: 4:1936 50:2116 -40:1936 -> 4
    assert [values[i] for i in bulyan_select(distances, 1, 5)] == [2, 1, 3, 0, 4]
    assert run_round(load_strategy("bulyan", f=1), GLOBAL, scalars(*values))["a"][0] == pytest.approx(
        2.0
    )  # mean of 2, 1, 3


def test_mean_closest_to_median_by_hand():
    stacked = np.array([[1.0, 10.0], [2.0, 0.0], [3.0, 5.0], [100.0, 6.0], [4.0, 7.0]])
    # column 0: median 3, closest three 3, 2, 4 -> 3; column 1: median 6, closest 6, 5, 7 -> 6
    assert mean_closest_to_median(stacked, 3).tolist() == [3.0, 6.0]


# ---------------------------------------------------------------- norm bounding


def test_norm_bounding_by_hand():
    strategy = load_strategy("norm_bounding", max_norm=5.0)
    # [3, 4] has norm 5 (kept), [30, 40] norm 50 (scaled to [3, 4]), [0, -1]: each counts once
    x1 = run_round(strategy, w(0.0, 0.0), [(w(3.0, 4.0), 1), (w(30.0, 40.0), 1), (w(0.0, -1.0), 2)])
    assert x1["w"].tolist() == pytest.approx([2.0, 7.0 / 3.0])  # (3 + 3 + 0) / 3, (4 + 4 - 1) / 3
    x2 = run_round(strategy, x1, [(w(2.0 + 60.0, 7.0 / 3.0 + 80.0), 1)])  # delta norm 100 -> [3, 4]
    assert x2["w"].tolist() == pytest.approx([5.0, 19.0 / 3.0])


def test_weighted_norm_bounding_weights_by_sample_count():
    strategy = load_strategy("norm_bounding", max_norm=5.0, weighted=True)
    x1 = run_round(strategy, w(0.0, 0.0), [(w(3.0, 4.0), 1), (w(30.0, 40.0), 1), (w(0.0, -1.0), 2)])
    assert x1["w"].tolist() == pytest.approx([1.5, 1.5])  # (3 + 3 + 0) / 4, (4 + 4 - 2) / 4
    with pytest.raises(
        ValueError, match="strategy 'norm_bounding': option 'weighted': Input should be a valid boolean"
    ):
        load_strategy("norm_bounding", weighted="yes")


def test_unweighted_norm_bounding_moves_the_model_at_most_max_norm_over_n_for_one_liar():
    """One client claiming a million samples cannot pull the clipped mean its way: it moves
    the model by max_norm / n at most, whatever it claims."""
    strategy = load_strategy("norm_bounding", max_norm=1.0)
    honest = [(w(0.0, 0.0), 100)] * 5
    x1 = run_round(strategy, w(0.0, 0.0), honest + [(w(1e6, 0.0), 1_000_000)])
    assert x1["w"].tolist() == pytest.approx([1.0 / 6.0, 0.0])


# ---------------------------------------------------------------- DP-FedAvg


def dp(**options):
    strategy = load_strategy("dp_fedavg", clients_per_round=2, **options)
    strategy.bind_run(seed=7, clients=10)
    return strategy


def test_central_dp_without_noise_clips_and_divides_by_the_expected_count():
    strategy = dp(noise_multiplier=0.0, clip_norm=5.0)
    x1 = run_round(strategy, w(0.0, 0.0), [(w(3.0, 4.0), 1), (w(30.0, 40.0), 100)])  # weights ignored
    assert x1["w"].tolist() == pytest.approx([3.0, 4.0])  # ([3, 4] + [3, 4]) / 2
    x2 = run_round(strategy, x1, [(w(3.0, 4.0 + 10.0), 1)])  # one answer of two expected: halved
    assert x2["w"].tolist() == pytest.approx([3.0, 4.0 + 2.5])


def test_central_dp_noise_is_seeded_by_run_seed_and_version():
    strategy = dp(noise_multiplier=1.0, clip_norm=5.0)
    x1 = run_round(strategy, w(0.0, 0.0), [(w(3.0, 4.0), 1), (w(0.0, 1.0), 1)])
    noise_1 = np.random.default_rng([7, 1, 0]).normal(0.0, 5.0, size=2)  # z C = 5
    assert x1["w"] == pytest.approx((np.array([3.0, 5.0]) + noise_1) / 2, rel=1e-12)
    x2 = run_round(strategy, x1, [(w(*(x1["w"] + [0.0, 1.0])), 1)])
    noise_2 = np.random.default_rng([7, 2, 0]).normal(0.0, 5.0, size=2)
    assert x2["w"] == pytest.approx(x1["w"] + (np.array([0.0, 1.0]) + noise_2) / 2, rel=1e-12)
    # replaying version 2 alone (parent version 1) draws the same noise
    again = dp(noise_multiplier=1.0, clip_norm=5.0)
    update = type("U", (), {"parameters": w(*(x1["w"] + [0.0, 1.0])), "num_samples": 1})()
    assert np.array_equal(again.replay_version(1, x1, [update], {})["w"], x2["w"])


def test_adaptive_clipping_by_hand_over_two_rounds():
    strategy = dp(
        noise_multiplier=0.0,
        clip_norm=5.0,
        adaptive_clipping=True,
        target_quantile=0.25,
        clip_learning_rate=0.2,
        clipped_count_stddev=1e-12,
    )
    # norms 5 (within C) and 50 (clipped): unclipped share 1/2; C <- 5 exp(-0.2 (0.5 - 0.25))
    x1 = run_round(strategy, w(0.0, 0.0), [(w(3.0, 4.0), 1), (w(30.0, 40.0), 1)])
    assert x1["w"].tolist() == pytest.approx([3.0, 4.0])
    c1 = 5.0 * math.exp(-0.2 * 0.25)
    assert float(strategy.state_arrays()["clip_norm"]) == pytest.approx(c1, rel=1e-9)
    # round 2: both clipped (norms 50 > c1): share 0; C <- c1 exp(-0.2 (0 - 0.25))
    x2 = run_round(strategy, x1, [(w(*(x1["w"] + [30.0, 40.0])), 1), (w(*(x1["w"] + [0.0, 50.0])), 1)])
    assert x2["w"].tolist() == pytest.approx(
        (x1["w"] + (np.array([0.6, 0.8]) * c1 + np.array([0.0, 1.0]) * c1) / 2).tolist()
    )
    assert strategy.clip_norm == pytest.approx(c1 * math.exp(0.2 * 0.25), rel=1e-9)
    resumed = dp(noise_multiplier=0.0, clip_norm=5.0, adaptive_clipping=True)
    resumed.resume(2, strategy.state_arrays())
    assert resumed.clip_norm == strategy.clip_norm and resumed.steps == 2


def test_local_dp_client_clips_and_noises_with_its_own_seed():
    options = {"mode": "local", "noise_multiplier": 0.5, "clip_norm": 5.0}
    cls = type(load_strategy("dp_fedavg", **options))
    sent = cls.client_update(
        options, seed=3, client_id="4", round_=2, global_parameters=w(1.0, 1.0), parameters=w(31.0, 41.0)
    )
    noise = np.random.default_rng([3, zlib.crc32(b"4"), 2, 1]).normal(0.0, 2.5, size=2)
    assert sent["w"] == pytest.approx(np.array([1.0 + 3.0, 1.0 + 4.0]) + noise, rel=1e-12)
    central = cls.client_update(
        {}, seed=3, client_id="4", round_=2, global_parameters=w(1.0, 1.0), parameters=w(31.0, 41.0)
    )
    assert central["w"].tolist() == [31.0, 41.0]  # central DP: the client sends its update as is


def test_reported_epsilon_is_the_accountants_for_the_same_rate_noise_and_steps():
    from opacus.accountants import RDPAccountant

    strategy = load_strategy("dp_fedavg", clients_per_round=10, noise_multiplier=1.1, delta=1e-5)
    strategy.bind_run(seed=0, clients=100)
    accountant = RDPAccountant()
    for _ in range(3):
        run_round(strategy, w(0.0), [(w(0.1), 1)])
        accountant.step(noise_multiplier=1.1, sample_rate=0.1)
        assert strategy.round_metrics()["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)


def test_bad_dp_options_are_refused():
    with pytest.raises(ValueError, match="mode"):
        load_strategy("dp_fedavg", mode="both")
    with pytest.raises(ValueError, match="adaptive_clipping needs mode central"):
        load_strategy("dp_fedavg", mode="local", adaptive_clipping=True)


# ---------------------------------------------------------------- in a run: metrics, budget, replay


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """Two short simulated runs with their journals: FedAdam, and central DP-FedAvg with an
    epsilon budget that the third round would exceed."""
    from brokerfl.assembly.roles import topology_for
    from brokerfl.assembly.simulate import simulate
    from brokerfl.config import parse_config
    from brokerfl.handlers.strategies.dp import epsilon_spent
    from brokerfl.storage.journal import read_journal
    from brokerfl.transports.local import LocalTransport

    common = {"clients": 4, "model": {"hidden": [16]}, "train": {"epochs": 1}}
    runs = {}
    budget = (epsilon_spent(0.5, 1.0, 2, 1e-5) + epsilon_spent(0.5, 1.0, 3, 1e-5)) / 2
    for name, options, extra in [
        ("fedadam", {"eta": 0.01}, {}),
        ("dp_fedavg", {"noise_multiplier": 1.0, "clip_norm": 2.0, "epsilon_budget": budget}, {"clients_per_round": 2}),
    ]:
        config = parse_config(
            {
                **common,
                "run": f"t-{name.replace('_', '-')}",
                "rounds": 4,
                "strategy": {"name": name, "options": options, **extra},
            }
        )
        out = tmp_path_factory.mktemp(name)
        result = simulate(config, out, journal=True)
        runs[name] = (config, result, list(read_journal(LocalTransport(result.broker), topology_for(config))), out)
    return runs


def test_dp_run_writes_the_accountants_epsilon_every_round_and_stops_at_its_budget(small_runs):
    from opacus.accountants import RDPAccountant

    from brokerfl.storage.metrics_log import read_metrics

    config, result, _, out = small_runs["dp_fedavg"]
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 2  # a third round would have spent more than the budget
    accountant = RDPAccountant()
    for record in records:
        accountant.step(noise_multiplier=1.0, sample_rate=2 / 4)
        assert record["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-12)
        assert record["delta"] == 1e-5 and record["clip_norm"] == 2.0


@pytest.mark.parametrize("name", ["fedadam", "dp_fedavg"])
def test_replay_check_recomputes_stateful_and_noisy_runs(small_runs, name):
    from brokerfl.ops.replay import replay

    config, result, journal, _ = small_runs[name]
    replayed = replay(journal, config)
    assert replayed.ok, replayed.table()
    assert [row.replayed_hash for row in replayed.rows[1:]] == [r["sha256"] for r in result.records]


@pytest.mark.parametrize(
    "what_if, options",
    [
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedadagrad", {}),
        ("fedavgm", {}),
        ("krum", {"f": 1}),
        ("multi_krum", {"f": 1, "m": 2}),
        ("bulyan", {"f": 0}),
        ("norm_bounding", {"max_norm": 1.0}),
        ("dp_fedavg", {"noise_multiplier": 0.5}),
    ],
)
def test_every_new_strategy_works_as_a_replay_what_if(small_runs, what_if, options):
    from brokerfl.ops.replay import replay

    config, _, journal, _ = small_runs["fedadam"]
    replayed = replay(journal, config, what_if=what_if, what_if_options=options)
    assert replayed.ok and all(0.0 <= row.what_if["accuracy"] <= 1.0 for row in replayed.rows[1:])


def test_options_that_fail_only_with_the_run_are_refused_when_the_config_is_loaded():
    from brokerfl.config import RunConfig

    # the default count noise (10 clients per round / 20 = 0.5) leaves no noise for the updates at z = 1
    with pytest.raises(ValueError, match="raise clipped_count_stddev or lower noise_multiplier"):
        RunConfig.model_validate(
            {"clients": 10, "strategy": {"name": "dp_fedavg", "options": {"adaptive_clipping": True}}}
        )
    RunConfig.model_validate(
        {
            "clients": 10,
            "strategy": {"name": "dp_fedavg", "options": {"adaptive_clipping": True, "noise_multiplier": 0.5}},
        }
    )
    with pytest.raises(ValueError, match="bias_correction applies to fedadam and fedyogi"):
        RunConfig.model_validate({"strategy": {"name": "fedadagrad", "options": {"bias_correction": True}}})
    # a check bind_run makes (trimmed_mean's) is made then too, naming the strategy once
    with pytest.raises(ValueError, match=r"Value error, strategy 'trimmed_mean': beta 0.1 with min_trim 0 trims"):
        RunConfig.model_validate(
            {"clients": 4, "strategy": {"name": "trimmed_mean", "options": {"beta": 0.1, "min_trim": 0}}}
        )
