"""examples/lora_lm: a GPT-2-style model's LoRA adapter is all that travels, the frozen base
stays as it was, the adapter learns each client's domain, and the trained model loads back.

One tiny two-stage run for the module (a full-weight base, then LoRA rounds from it), in
``simulate``; the data's own properties are checked without a run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from brokerfl.app import load_model  # noqa: E402
from brokerfl.app.torch_adapter import untied_state  # noqa: E402
from brokerfl.assembly.simulate import simulate  # noqa: E402
from brokerfl.config import load_config  # noqa: E402
from brokerfl.storage.model_file import read_model_file  # noqa: E402
from examples.lora_lm import app  # noqa: E402
from examples.lora_lm import data as lm_data  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lora_lm"
TINY = {"n_embd": 48, "n_layer": 2, "n_head": 2, "n_positions": 64, "samples": 96, "test_samples": 32}
CLIENTS = 3
LORA_ROUNDS = 4


def _options(**more):
    return {**app.OPTIONS, **TINY, **more}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(base file, LoRA config, LoRA run's output directory, the run's records)."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("lora_lm")
    pretrain = load_config(
        str(EXAMPLE / "pretrain.yaml"),
        {"rounds": 2, "clients": 2, "strategy.min_clients": 2, "train.max_batches": 6, "app_options": TINY},
    )
    simulate(pretrain, out / "pretrain")
    base = out / "pretrain" / "final_model.npz"
    config = load_config(
        str(EXAMPLE / "lora.yaml"),
        {
            "rounds": LORA_ROUNDS,
            "clients": CLIENTS,
            "strategy.min_clients": CLIENTS,
            "train.max_batches": 6,
            "train.lr": 0.01,
            "app_options": {**TINY, "base": str(base), "lora": {"r": 2, "alpha": 4, "target_modules": ["c_attn"]}},
        },
    )
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    result = simulate(config, out / "lora")
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before  # the base file is only read
    return base, config, out / "lora", result.records


def _federated(records):
    return [r for r in records if r.get("evaluation") == "federated"]


@pytest.mark.timeout(120)
def test_the_adapter_is_all_that_travels(runs):
    """The stored model holds the LoRA matrices only, under 2% of the full model's bytes."""
    import torch

    base, config, out, _ = runs
    stored, _ = read_model_file(out / "final_model.npz")
    torch.manual_seed(config.seed)
    module = app.model({**app.OPTIONS, **config.app_options})
    adapter = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(stored) == adapter and adapter and all(".lora_" in n for n in adapter)
    whole = sum(t.numel() * t.element_size() for t in untied_state(module).values())
    assert sum(a.nbytes for a in stored.values()) < 0.02 * whole


@pytest.mark.timeout(120)
def test_the_base_is_unchanged(runs):
    """The trained model's every non-adapter tensor is the base file's, and stays frozen."""
    base, config, out, _ = runs
    weights, _ = read_model_file(base)
    trained = load_model(config, out / "final_model.npz")
    lm = trained.get_base_model()
    frozen = {n: t for n, t in untied_state(lm).items() if ".lora_" not in n}
    assert len(frozen) == len(weights)
    for name, tensor in frozen.items():
        np.testing.assert_array_equal(tensor.numpy(), weights[name.replace(".base_layer", "")], err_msg=name)
    assert not any(p.requires_grad for n, p in lm.named_parameters() if ".lora_" not in n)
    assert any(np.abs(a).max() > 0 for n, a in read_model_file(out / "final_model.npz")[0].items() if "lora_B" in n)


@pytest.mark.timeout(120)
def test_each_client_domain_gets_better_than_the_base(runs):
    """Every client's held-out perplexity on its own domain, after the LoRA rounds, is below
    the base's; and the rounds' mean perplexity falls."""
    import torch

    base, config, _, records = runs
    options = {**app.OPTIONS, **config.app_options, "lora": None}
    torch.manual_seed(config.seed)
    base_model = app.model(options)
    last = _federated(records)[-1]["metrics"]
    for index in range(CLIENTS):
        domain = lm_data.DOMAINS[index % len(lm_data.DOMAINS)]
        test = app.load_partition(index, CLIENTS, options, config.seed).test
        assert last[f"perplexity_{domain}"] < app.evaluate(base_model, test)["perplexity"], domain
    perplexities = [r["metrics"]["perplexity"] for r in _federated(records)]
    assert len(perplexities) == LORA_ROUNDS and perplexities[-1] < perplexities[0]


@pytest.mark.timeout(120)
def test_load_model_scores_as_the_run_did(runs):
    """load_model gives a module whose evaluation on the clients' test splits is the run's
    last federated metrics line."""
    _, config, out, records = runs
    module = load_model(config, out / "final_model.npz")
    options = {**app.OPTIONS, **config.app_options}
    scores = [app.evaluate(module, app.load_partition(i, CLIENTS, options, config.seed).test) for i in range(CLIENTS)]
    last = _federated(records)[-1]["metrics"]
    weights = [s["num_samples"] for s in scores]
    assert np.average([s["perplexity"] for s in scores], weights=weights) == pytest.approx(last["perplexity"], rel=1e-6)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["metrics"]["perplexity"] == pytest.approx(last["perplexity"], rel=1e-9)


def test_partitions_are_deterministic_disjoint_and_non_iid():
    options = _options()
    train, test = app.partition_pairs(7, options, seed=3)
    assert (train, test) == app.partition_pairs(7, options, seed=3)
    assert train != app.partition_pairs(7, options, seed=4)[0]
    assert not {p for p, _ in train} & {p for p, _ in test}  # held out: no test instruction is trained on
    assert {p.split(":")[0] for p, _ in train + test} == {lm_data.DOMAINS[7 % len(lm_data.DOMAINS)]}
    mixed, _ = app.partition_pairs(0, _options(domains="mix"), seed=3)
    assert {p.split(":")[0] for p, _ in mixed} == set(lm_data.DOMAINS)


def test_labels_are_the_answer_shifted_by_one():
    ids, labels = lm_data.tokenize([("add: 1+2\n", "3"), ("upper: ab\n", "AB")], 64)
    for row_ids, row_labels in zip(ids, labels):
        counted = row_labels != lm_data.IGNORE
        positions = np.flatnonzero(counted)
        np.testing.assert_array_equal(row_labels[positions], row_ids[positions + 1])  # the next token
        assert row_labels[positions[-1]] == lm_data.EOS and lm_data.decode(row_labels[positions]).strip() in {"3", "AB"}
    assert lm_data.domain_of(ids[1]) == "upper"


def test_options_are_checked():
    with pytest.raises(ValueError, match="lora: unknown key"):
        app.check_options(_options(lora={"rank": 4}))
    with pytest.raises(ValueError, match="n_embd .* multiple of n_head"):
        app.check_options(_options(n_embd=50, n_head=4))
    with pytest.raises(ValueError, match="unknown key"):
        app.check_options(_options(hidden=3))
    assert app.gpt2_shape({**app.OPTIONS, "size": "gpt2-small"})["vocab_size"] == 50257
