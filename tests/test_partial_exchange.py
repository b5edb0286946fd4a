"""An app may exchange only part of its model (``exchanged``: e.g. a LoRA adapter): only
those entries travel, are folded, hashed, stored, replayed and accounted; compression, DP
and secure aggregation act on them; the frozen rest is built by model() with the run's
seed on every side, checked by a fingerprint, and kept as model() built it."""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from brokerfl.app import AppError, load_app, load_model
from brokerfl.app.torch_adapter import base_digests
from brokerfl.assembly.roles import client_worker, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import parse_config
from brokerfl.ops.replay import replay
from brokerfl.runtime.handler_table import to_clients
from brokerfl.storage.accounting import account_run
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import curve_description, plot_curve
from brokerfl.storage.model_file import read_model_file
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import Leave, ParameterUpdate, TrainTask, from_wire
from tests import adapter_app

pytestmark = pytest.mark.timeout(300)

ADAPTER = ["lora_a", "lora_b", "head.weight", "head.bias"]  # in the state_dict's order
TRAIN = {"epochs": 2, "batch_size": 16, "lr": 0.3}


def config_of(**settings):
    return parse_config({"app": "tests.adapter_app", "clients": 3, "rounds": 3, "seed": 5, "train": TRAIN, **settings})


def travelled(broker: LocalBroker, config) -> list:
    journal = read_journal(LocalTransport(broker), topology_for(config))
    return [from_wire(d.envelope, d.body) for d in journal if d.envelope.type in ("train_task", "parameter_update")]


def test_only_the_adapter_travels_is_stored_replayed_and_loaded(tmp_path):
    config = config_of()
    result = simulate(config, tmp_path, journal=True)
    records = result.records
    assert [r["model_version"] for r in records] == [1, 2, 3]
    assert records[-1]["accuracy"] > 0.6, records  # it learns through the adapter alone
    adapter_bytes = 4 * (32 * 2 + 2 + 32 * 2 + 2 * 2)  # float32 head, bias, lora_a, lora_b
    assert all(r["model_bytes"] == adapter_bytes and r["update_bytes"] == 3 * adapter_bytes for r in records)

    for version in range(4):
        assert list(result.store.get(version).parameters) == ADAPTER
    messages = travelled(result.broker, config)
    assert {type(m) for m in messages} == {TrainTask, ParameterUpdate}
    assert all(list(m.parameters) == ADAPTER for m in messages)
    fingerprint = load_app(config).base_fingerprint()
    assert len(fingerprint) == 32
    assert {m.base_fingerprint for m in messages if isinstance(m, TrainTask)} == {fingerprint}

    replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config)
    assert replayed.ok, replayed.table()
    report = account_run(LocalTransport(result.broker), topology_for(config), result.store)
    assert report.ok, report.summary()

    parameters, _ = read_model_file(tmp_path / "final_model.npz")
    assert sorted(parameters) == sorted(ADAPTER)
    loaded = load_model(config, tmp_path / "final_model.npz")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the base, as every side built it
        fresh = adapter_app.model(dict(adapter_app.OPTIONS))
    assert base_digests(loaded, ADAPTER) == base_digests(fresh, ADAPTER)
    x, y = adapter_app.load_server_test({}, 0)
    with torch.no_grad():
        accuracy = float((loaded(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    assert accuracy == pytest.approx(records[-1]["accuracy"])


def test_the_seed_builds_the_base_so_another_seed_is_another_base():
    one = load_app(config_of(seed=1)).base_fingerprint()
    assert one == load_app(config_of(seed=1)).base_fingerprint()
    assert one != load_app(config_of(seed=2)).base_fingerprint()
    assert load_app(parse_config({"app": "examples.cnn_mnist.app"})).base_fingerprint() == ""  # all travels


@pytest.mark.parametrize(
    "settings",
    [
        {"compression": {"method": "bfloat16"}},
        {"compression": {"method": "topk", "fraction": 0.25, "min_size": 1}},
        {"strategy": {"name": "dp_fedavg", "options": {"noise_multiplier": 0.01, "clip_norm": 5.0}}},
        {"secure_aggregation": {}},
        {"model_transfer": "reference"},
    ],
    ids=["bfloat16", "topk", "dp_fedavg", "secure", "models stream"],
)
def test_compression_dp_secure_aggregation_and_the_models_stream_act_on_what_travels(settings):
    config = config_of(clients=4, rounds=3, **settings)
    result = simulate(config, journal=True)
    assert [r["model_version"] for r in result.records] == [1, 2, 3]
    assert result.records[-1]["accuracy"] > 0.55, result.records
    assert list(result.store.get(3).parameters) == ADAPTER
    assert all(0 < r["update_bytes"] for r in result.records), result.records  # what the updates weighed
    replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config)
    assert replayed.ok, replayed.table()


def test_a_client_whose_base_differs_from_the_servers_leaves_saying_so():
    """A task whose base fingerprint is not the client's (another code version, options or
    checkpoint at the server): the client trains nothing, tells the server why and stops."""
    config = config_of(run="other-base")
    broker = LocalBroker()
    admin = LocalTransport(broker)
    worker = client_worker(LocalTransport(broker), config, "0", journal=False)
    topology = topology_for(config, journal=False)
    parameters = worker.state.app.initial_parameters(config.seed)
    worker.start()
    worker.publish(
        [to_clients(TrainTask(parameters=parameters, participants=["0"], round=1, base_fingerprint="0" * 32))]
    )
    while worker.step(0.0):
        pass
    sent = []
    while (delivery := admin.get(topology.server_queue)) is not None:
        sent.append(from_wire(delivery.envelope, delivery.body))
    worker.transport.close()
    leaves = [m for m in sent if isinstance(m, Leave)]
    assert not any(isinstance(m, ParameterUpdate) for m in sent)
    assert len(leaves) == 1 and leaves[0].reason == "its base model differs from the server's"
    assert "0" * 32 in leaves[0].error and worker.state.app.base_fingerprint() in leaves[0].error


def test_a_train_that_changes_the_base_is_warned_of_and_the_next_task_gets_model_s(recwarn):
    config = config_of(app_options={"tamper_base": True}, rounds=2)
    app = load_app(config)
    before = app.base_fingerprint()
    result = simulate(config)
    assert [r["model_version"] for r in result.records] == [1, 2]
    warned = [str(w.message) for w in recwarn.list if "changed entries that do not travel" in str(w.message)]
    assert warned and "base.0.bias" in warned[0]
    module = app.adapter.module  # type: ignore[attr-defined]
    assert base_digests(module, ADAPTER) == app.adapter.exchange.base  # type: ignore[attr-defined]
    assert app.base_fingerprint() == before


def fake_app(monkeypatch, name: str, **functions) -> str:
    module = types.ModuleType(name)
    module.__dict__.update(
        {
            "model": lambda options: nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2)),
            "load_partition": lambda index, n, options, seed: adapter_app.points(index, 20),
            **functions,
        }
    )
    monkeypatch.setitem(sys.modules, name, module)
    return name


@pytest.mark.parametrize(
    ("exchanged", "message"),
    [
        (lambda model: "1.weight", "must return the names of model().state_dict() entries, got str"),
        (lambda model: ["1.weight", "lora.weight"], "named 1 entry not in model().state_dict(): 'lora.weight'"),
        (lambda model: [], "named no entry: nothing would travel"),
        (lambda model: 1 / 0, "exchanged() failed: ZeroDivisionError"),
    ],
    ids=["a string", "an unknown name", "nothing", "raises"],
)
def test_exchanged_mistakes_are_named_at_start(monkeypatch, exchanged, message):
    name = fake_app(monkeypatch, f"exchange_mistake_{abs(hash(message))}", exchanged=exchanged)
    with pytest.raises(AppError, match=f"app '{name}'") as raised:
        load_app(parse_config({"app": name})).check_model()
    assert message in str(raised.value)


def test_exchanging_every_entry_is_the_whole_model(monkeypatch):
    name = fake_app(monkeypatch, "exchange_all", exchanged=lambda model: list(model.state_dict()))
    app = load_app(parse_config({"app": name}))
    assert app.base_fingerprint() == "" and sorted(app.initial_parameters(0)) == [
        "0.bias",
        "0.weight",
        "1.bias",
        "1.weight",
    ]


def test_a_model_that_builds_another_base_each_time_is_refused(monkeypatch):
    """Initialised outside torch's RNG (numpy's unseeded generator): the server's initial
    model and each client's base would differ; refused at the server's start."""

    def model(options):
        net = nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2))
        with torch.no_grad():
            net[0].weight.copy_(torch.from_numpy(np.random.default_rng().normal(size=(4, 2)).astype(np.float32)))
        return net

    name = fake_app(monkeypatch, "exchange_unseeded", model=model, exchanged=lambda model: ["1.weight", "1.bias"])
    config = parse_config({"app": name, "seed": 3})
    with pytest.raises(AppError, match="built a different base twice with the same seed") as raised:
        load_app(config).initial_parameters(config.seed)
    assert "0.weight" in str(raised.value)


def test_federated_evaluation_keeps_each_clients_scores_and_the_curve_draws_them(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter_app, "load_server_test", lambda options, seed: None)  # federated evaluation
    config = config_of(rounds=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        records = simulate(config).records
    federated = [r for r in records if r.get("evaluation") == "federated"]
    assert federated and set(federated[-1]["client_metrics"]) == {"0", "1", "2"}
    scores = federated[-1]["client_metrics"]
    assert all(s["num_samples"] == 60 and 0.0 <= s["accuracy"] <= 1.0 for s in scores.values())
    weighted = sum(s["accuracy"] * s["num_samples"] for s in scores.values()) / 180
    assert federated[-1]["accuracy"] == pytest.approx(weighted)
    png = plot_curve(records, tmp_path / "curve.png", metrics=["accuracy", "model_bytes", "update_bytes"])
    assert curve_description(png) == "panels: accuracy, model_bytes, update_bytes"


class TiedLanguageModel(nn.Module):
    """An embedding and an output layer that share one weight (as GPT-2's do)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 4)
        self.out = nn.Linear(4, 8, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(x))


def test_tied_weights_travel_once_and_stay_tied(monkeypatch, recwarn):
    """Evaluation borrows the global model's arrays and training then loads fresh ones, both
    by assignment, which makes a Parameter per name: the tie is made again each time, so the
    model stays as model() made it (no warning, no rebuild) and trains one weight."""

    def load_partition(index, n, options, seed):
        tokens = np.random.default_rng(index).integers(0, 8, size=40)
        return tokens, (tokens + 1) % 8  # predict the next token id

    name = fake_app(monkeypatch, "tied_model", model=lambda options: TiedLanguageModel(), load_partition=load_partition)
    config = parse_config(
        {"app": name, "clients": 2, "rounds": 2, "train": TRAIN, "strategy": {"min_clients": 2}, "evaluate_every": 1}
    )
    app = load_app(config)
    assert list(app.initial_parameters(config.seed)) == ["embed.weight"]  # out.weight is the same tensor
    assert app.base_fingerprint() == ""  # nothing stays behind
    result = simulate(config)
    assert [r["model_version"] for r in result.records if "evaluation" not in r] == [1, 2]
    assert all(r["model_bytes"] == 8 * 4 * 4 for r in result.records if "evaluation" not in r)
    module = app.adapter.module  # type: ignore[attr-defined]
    assert module.out.weight is module.embed.weight  # loading never untied them
    assert not [w for w in recwarn.list if "changed the model" in str(w.message)]
    np.testing.assert_array_equal(module.embed.weight.detach().numpy(), result.store.get(2).parameters["embed.weight"])


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_a_server_whose_model_exceeds_max_message_mib_stops_at_start_saying_so(
    monkeypatch, amqp_url, run_name, tmp_path, capsys
):
    """Every client would refuse each version as too large to reassemble: said at once."""
    from brokerfl.cli import main

    name = fake_app(monkeypatch, "too_large_model", model=lambda options: nn.Linear(1024, 300))  # 1.2 MiB
    path = tmp_path / "large.yaml"
    path.write_text(f"run: {run_name}\napp: {name}\nmax_message_mib: 1\n")
    assert main(["server", str(path), "--broker", amqp_url, "--out", str(tmp_path / "out")]) == 2
    assert "the model travels as 1.2 MiB, more than max_message_mib (1)" in capsys.readouterr().err
