"""Compressed updates (brokerfl.wire.compression): the arithmetic, hostile input, and runs whose
replay folds exactly what the server folded."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import ConfigError, load_config
from brokerfl.ops.replay import replay
from brokerfl.storage.journal import read_journal
from brokerfl.transports.local import LocalTransport
from brokerfl.wire.compression import (
    INDEX,
    SCALE,
    WHOLE,
    CompressionError,
    compress,
    decompress,
    dequantize8,
    from_bfloat16_bits,
    quantize8,
    to_bfloat16_bits,
)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((30, 20), dtype=np.float32),
        "b": rng.standard_normal(20, dtype=np.float32),
        "steps": np.array(7, np.int64),
    }


def test_bfloat16_rounds_to_nearest():
    values = np.array([1.0, 1.00390625, 1.01171875, -3.5e-3, 0.0], np.float32)
    back = from_bfloat16_bits(to_bfloat16_bits(values))
    assert back.dtype == np.float32 and np.all(np.abs(back - values) <= np.abs(values) * 2**-8)
    assert back[0] == 1.0 and back[1] == 1.0  # a tie rounds to even


def test_qsgd8_is_unbiased_and_bounded():
    rng = np.random.default_rng(1)
    values = rng.standard_normal(1000).astype(np.float32)
    decoded = np.mean([dequantize8(*quantize8(values, rng)) for _ in range(400)], axis=0)
    scale = np.abs(values).max()
    assert np.max(np.abs(decoded - values)) < 0.02 * scale  # the mean of many draws converges on the value
    levels, s = quantize8(values, rng)
    assert levels.dtype == np.int8 and levels.min() >= -127 and s == scale


@pytest.mark.parametrize("method", ["float16", "bfloat16", "qsgd8", "topk"])
def test_roundtrip_and_error_feedback(method):
    base, trained = _model(0), _model(1)
    trained["steps"] = np.array(8, np.int64)
    wire, residual = compress(trained, base, method, fraction=0.1, rng=np.random.default_rng(0))
    got = decompress(wire, base, method, max_fraction=0.1)
    assert set(got) == set(base) and got["steps"] == 8 and all(got[k].dtype == base[k].dtype for k in base)
    # what was sent plus what was kept back is the whole delta, exactly
    for name in ("w", "b"):
        np.testing.assert_allclose(
            got[name] - base[name] + residual[name], trained[name] - base[name], rtol=0, atol=1e-5
        )
    tolerance = {"float16": 4e-3, "bfloat16": 4e-2, "qsgd8": 0.2, "topk": 10.0}[method]  # of deltas ~N(0, 2)
    assert np.max(np.abs(got["w"] - trained["w"])) < tolerance
    # error feedback: the same delta again, plus the residual, is sent next round
    again, residual2 = compress(trained, base, method, residual=residual, fraction=0.1, rng=np.random.default_rng(1))
    assert residual == {}  # consumed: the old residual is let go of as the new one is made
    sent_twice = decompress(again, base, method, max_fraction=0.1)["w"] - base["w"] + got["w"] - base["w"]
    np.testing.assert_allclose(sent_twice + residual2["w"], 2 * (trained["w"] - base["w"]), rtol=0, atol=1e-4)


def test_compressed_sizes():
    base, trained = _model(0), _model(1)
    whole = sum(a.nbytes for a in trained.values())
    size = {
        m: sum(a.nbytes for a in compress(trained, base, m, fraction=0.01)[0].values())
        for m in ("bfloat16", "qsgd8", "topk")
    }
    assert size["bfloat16"] < 0.55 * whole and size["qsgd8"] < 0.3 * whole and size["topk"] < 0.1 * whole


def _wire(method):
    base = _model(0)
    return compress(_model(1), base, method, fraction=0.1, rng=np.random.default_rng(0))[0], base


@pytest.mark.parametrize(
    "method, tamper, match",
    [
        ("bfloat16", lambda w: w.update(w=w["w"][:10]), "expected uint16"),
        ("float16", lambda w: w.update(w=w["w"].astype(np.float32)), "expected float16"),
        ("float16", lambda w: w.pop("b"), "missing"),
        ("float16", lambda w: w.update(extra=np.zeros(3, np.float16)), "unknown tensors"),
        ("qsgd8", lambda w: w.update({"w" + SCALE: np.float32(np.nan)}), "scale"),
        ("qsgd8", lambda w: w.update({"w" + SCALE: np.zeros(2, np.float32)}), "scale"),
        ("qsgd8", lambda w: w.update(w=np.full((30, 20), -128, np.int8)), "levels"),
        ("topk", lambda w: w.update({"w" + INDEX: w["w" + INDEX] + 10_000}), "indices"),
        ("topk", lambda w: w.update({"w" + INDEX: np.zeros_like(w["w" + INDEX])}), "indices"),
        (
            "topk",
            lambda w: w.update(w=np.zeros(600, np.float32), **{"w" + INDEX: np.arange(600, dtype=np.int64)}),
            "k=600 is out of range",
        ),
        ("topk", lambda w: w.update(w=np.full_like(w["w"], np.nan)), "NaN"),
        ("topk", lambda w: w.update({"steps" + WHOLE: np.array(7, np.int32)}), "sent whole"),
        ("topk", lambda w: w.update(steps=w.pop("steps" + WHOLE)), "must be sent whole"),
        ("topk", lambda w: w.update(steps=np.array(7, np.int64)), "unknown tensors"),
        ("qsgd8", lambda w: w.update({"w" + WHOLE: np.zeros((30, 20), np.float64)}), "sent whole"),
        ("qsgd8", lambda w: w.update({"w" + WHOLE: np.full((30, 20), np.inf, np.float32)}), "NaN or infinity"),
        ("topk", lambda w: w.update({"b" + WHOLE: np.zeros(20, np.float32)}), "unknown tensors"),
    ],
)
def test_bad_compressed_input_is_a_clear_error(method, tamper, match):
    wire, base = _wire(method)
    tamper(wire)
    with pytest.raises(CompressionError, match=match):
        decompress(wire, base, method, max_fraction=0.1)


def test_compression_is_refused_where_it_is_not_supported():
    with pytest.raises(ConfigError, match="synchronous server workflow"):
        load_config(None, {"compression.method": "qsgd8", "strategy.name": "fedbuff"})


@pytest.mark.parametrize("method", ["bfloat16", "qsgd8", "topk"])
def test_a_compressed_run_replays_hash_for_hash(method):
    config = load_config(
        None,
        {"rounds": 3, "clients": 3, "train.max_batches": 4, "compression.method": method, "compression.fraction": 0.05},
    )
    result = simulate(config, journal=True)
    assert [r["num_updates"] for r in result.records] == [3, 3, 3]
    replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config)
    assert replayed.ok and len(replayed.rows) == 4, replayed.table()


def test_a_bad_compressed_update_is_dead_lettered_and_the_round_goes_on(monkeypatch):
    """Client 1 sends top-k indices out of range: its update is dead-lettered with the
    reason (nothing folded from it, nothing lost), the rounds close with the others."""
    import brokerfl.handlers.workflows.client as client_handlers

    real = client_handlers.compress

    def compress_badly(parameters, base, method, **kw):
        wire, residual = real(parameters, base, method, **kw)
        if kw["rng"].bit_generator.seed_seq.entropy[1] == zlib.crc32(b"1"):  # client 1
            wire = {k: (v + 10**9 if k.endswith(INDEX) else v) for k, v in wire.items()}
        return wire, residual

    monkeypatch.setattr(client_handlers, "compress", compress_badly)
    config = load_config(
        None,
        {
            "rounds": 2,
            "clients": 3,
            "train.max_batches": 2,
            "strategy.min_clients": 2,
            "strategy.round_deadline_s": 3.0,
            "compression.method": "topk",
            "compression.fraction": 0.05,
        },
    )
    result = simulate(config, journal=True)
    assert [r["num_updates"] for r in result.records] == [2, 2]
    dead = [
        d
        for d in read_journal(LocalTransport(result.broker), topology_for(config))
        if d.routing_key.startswith("dead.")
    ]
    assert len(dead) == 2 and all(
        "compressed update" in d.envelope.headers.get("x-brokerfl-reason", "")
        and "indices" in d.envelope.headers["x-brokerfl-reason"]
        for d in dead
    )
    assert replay(read_journal(LocalTransport(result.broker), topology_for(config)), config).ok


def _batchnorm_model() -> tuple[dict[str, np.ndarray], frozenset[str]]:
    import torch
    from torch import nn

    from brokerfl.app.torch_adapter import to_named_arrays

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32))
    return to_named_arrays(module), frozenset(name for name, _ in module.named_parameters())


@pytest.mark.parametrize("method", ["bfloat16", "qsgd8", "topk"])
def test_buffers_integers_and_small_tensors_travel_whole(method):
    """Only floating trainable weights of min_size entries or more are compressed; BatchNorm's
    running statistics, its integer step counter and the small weights arrive exactly."""
    base, trainable = _batchnorm_model()
    assert "1.running_var" not in trainable and "1.num_batches_tracked" not in trainable
    rng = np.random.default_rng(3)
    trained = {
        k: (v + rng.standard_normal(v.shape).astype(v.dtype) if v.dtype.kind == "f" else v + 5) for k, v in base.items()
    }
    trained["1.running_var"] = np.full(32, 0.01, np.float32)  # a statistic far below the model's 1.0
    residual: dict[str, np.ndarray] = {}
    for round_ in range(5):  # error feedback must not drift what travels whole
        wire, residual = compress(
            trained,
            base,
            method,
            residual=residual,
            fraction=0.01,
            rng=np.random.default_rng(round_),
            trainable=trainable,
            min_size=1024,
        )
        assert set(residual) == {"0.weight"}  # 64 x 32 = 2048 entries: the only compressed tensor
        whole = {k[: -len(WHOLE)] for k in wire if k.endswith(WHOLE)}
        assert whole == set(base) - {"0.weight"}
        got = decompress(wire, base, method, max_fraction=0.01)
        for name in whole:
            assert got[name].dtype == base[name].dtype and np.array_equal(got[name], trained[name]), name
        assert got["1.num_batches_tracked"].dtype == np.int64 and got["1.running_var"].min() > 0


def test_the_residual_carries_over_only_to_a_newer_model():
    from types import SimpleNamespace

    from brokerfl.handlers.workflows.client import _compressed

    base, trainable = _batchnorm_model()
    trained = {k: (v + np.float32(0.5) if v.dtype.kind == "f" else v) for k, v in base.items()}
    config = load_config(None, {"compression.method": "topk", "compression.fraction": 0.01})
    state = SimpleNamespace(
        config=config, client_id="0", residual={}, residual_version=-1, app=SimpleNamespace(trainable=lambda: trainable)
    )

    def send(version: int) -> dict[str, np.ndarray]:
        task = SimpleNamespace(model_version=version, round=version + 1, parameters=base)
        return decompress(_compressed(state, task, trained), base, "topk", max_fraction=0.01)

    first = send(0)
    assert state.residual_version == 0 and np.abs(state.residual["0.weight"]).sum() > 0
    carried = send(1)  # newer: this delta plus what round one held back, so larger entries go
    assert np.abs(carried["0.weight"] - base["0.weight"]).max() > np.abs(first["0.weight"] - base["0.weight"]).max()
    again = send(1)  # the same version again (a round sent twice): afresh, as the first time
    np.testing.assert_array_equal(again["0.weight"], first["0.weight"])


def test_a_batchnorm_cnn_under_topk_stays_finite_and_replays():
    """The CNN app (BatchNorm) under top-k 1%: variances stay positive, the model finite,
    accuracy above chance, and replay folds exactly what the server folded."""
    config = load_config(
        "examples/cnn_mnist/config.yaml",
        {
            "rounds": 3,
            "clients": 3,
            "strategy.min_clients": 3,
            "train.max_batches": 20,
            "compression.method": "topk",
            "compression.fraction": 0.01,
        },
    )
    result = simulate(config, journal=True)
    model = result.server_state.model.parameters
    assert all(np.all(np.isfinite(v)) for v in model.values() if v.dtype.kind == "f")
    assert all(model[k].min() > 0 for k in model if k.endswith("running_var"))
    assert result.records[-1]["accuracy"] > 0.3, result.records
    replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config)
    assert replayed.ok and len(replayed.rows) == 4, replayed.table()
