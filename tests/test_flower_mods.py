"""Flower's own client-side mods through brokerfl's grid: central DP with client-side
clipping, and SecAgg+ (four stages of exchanges), whose unmasked sum must be plain FedAvg's
within its quantisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from brokerfl.assembly.simulate import simulate  # noqa: E402
from brokerfl.config import RunConfig  # noqa: E402
from brokerfl.storage.metrics_log import read_metrics  # noqa: E402

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]
APP = Path(__file__).resolve().parent / "flower_apps" / "mods"


def run(mode: str, tmp_path: Path) -> tuple[list[np.ndarray], list[dict]]:
    final = tmp_path / f"{mode}.npz"
    config = RunConfig.model_validate(
        {
            "run": "mods",
            "clients": 3,
            "flower_app": str(APP),
            "flower_config": {"mode": mode, "final-model": str(final)},
        }
    )
    simulate(config, tmp_path / mode)
    lines = read_metrics(tmp_path / mode / "metrics.jsonl")
    if not final.exists():
        return [], lines
    with np.load(final) as saved:
        return [saved[k] for k in saved.files], lines


def test_flowers_dp_clipping_mod_runs_every_round(tmp_path):
    _, lines = run("dp", tmp_path)
    assert [(r["round"], r["num_updates"], r["errors"]) for r in lines] == [(1, 3, 0), (2, 3, 0)]


def test_secagg_plus_through_the_grid_sums_to_plain_fedavg(tmp_path):
    secure, secure_lines = run("secagg", tmp_path)
    plain, _ = run("plain", tmp_path)
    assert len(secure_lines) > 2 * 2  # its stages are exchanges of their own: more than train + evaluate
    assert all(r["errors"] == 0 for r in secure_lines)
    assert len(secure) == len(plain) == 2
    for s, p in zip(secure, plain):
        assert np.abs(p).max() > 0.1  # trained: not the initial zeros
        np.testing.assert_allclose(s, p, atol=2e-3)  # SecAgg+'s quantisation, nothing more
