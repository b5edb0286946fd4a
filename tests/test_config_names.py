"""Configs name built-ins by short names (brokerfl.config.builtins); user code by import path; a
built-in's old import path still works with a DeprecationWarning. A strategy is checked
when its config is loaded: complete (no abstract method left) and given options it takes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from brokerfl.config import ConfigError, builtins, load_config, parse_config
from brokerfl.handlers.strategies.base import BUILT_IN, Strategy, strategy_class, strategy_for_run
from brokerfl.handlers.strategies.fedavg import FedAvg

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted([*ROOT.glob("configs/*.yaml"), *ROOT.glob("examples/*/config.yaml")])
NAMED = ("app", "server_handlers", "client_handlers")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_names_built_ins_by_short_names(path):
    raw = yaml.safe_load(path.read_text())
    for key in NAMED:
        name = raw.get(key)
        assert name is None or not name.startswith("handlers."), f"{key}: {name}"
    assert all(not name.startswith("handlers.") for name in raw.get("extra_handlers", []))
    assert ":" not in (raw.get("strategy") or {}).get("name", "")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        load_config(path)


def test_the_defaults_are_short_names():
    config = parse_config({})
    assert (config.app, config.client_handlers, config.strategy.name) == ("mlp", "client", "fedavg")


@pytest.mark.parametrize(
    ("key", "old", "short"),
    [
        ("app", "brokerfl.handlers.apps.mlp", "mlp"),
        ("client_handlers", "brokerfl.handlers.workflows.client", "client"),
        ("server_handlers", "brokerfl.handlers.workflows.async_server", "async_server"),
    ],
)
def test_an_old_built_in_path_works_with_a_warning_naming_the_short_name(key, old, short):
    with pytest.warns(
        DeprecationWarning, match=f"{key}: '{old}' is the old spelling of the built-in '{short}'; write {key}: {short}"
    ):
        config = parse_config({key: old})
    assert getattr(config, key) == short


def test_old_spellings_of_strategies_and_extra_handlers_work_with_a_warning():
    with pytest.warns(DeprecationWarning, match="write strategy: fedadam"):
        assert (
            parse_config({"strategy": {"name": "brokerfl.handlers.strategies.fedopt:FedAdam"}}).strategy.name
            == "fedadam"
        )
    with pytest.warns(DeprecationWarning, match="write extra_handlers: gradients"):
        assert parse_config({"extra_handlers": ["brokerfl.handlers.gradients"]}).extra_handlers == ["gradients"]


def test_a_strategy_may_be_named_alone():
    assert parse_config({"strategy": "median"}).strategy.name == "median"


def test_an_unknown_strategy_lists_the_built_ins():
    with pytest.raises(
        ConfigError,
        match=(
            r"strategy\.name: unknown strategy 'fedavgg': use one of \[.*'fedavg'.*'fedbuff'.*\] or your own "
            r"'module:Class'"
        ),
    ):
        parse_config({"strategy": {"name": "fedavgg"}})


def test_an_unknown_short_name_lists_the_built_ins():
    with pytest.raises(
        ConfigError,
        match=(
            r"server_handlers: unknown server_handlers 'async-server': use one of \['async_server', 'cyclic', "
            r"'flower_server', 'server'\]"
        ),
    ):
        parse_config({"server_handlers": "async-server"})


def test_an_app_that_is_no_module_and_no_built_in_lists_the_built_ins(tmp_path, monkeypatch):
    from brokerfl.app import load_app

    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        ConfigError, match=r"cannot import app module 'mpl'.*it is not a built-in app either: those are \['mlp'\]"
    ):
        load_app(parse_config({"app": "mpl"}))


class Mine(FedAvg):
    name = "mine"


def test_user_code_is_named_by_its_import_path():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        config = parse_config({"app": "examples.logreg_numpy.app", "strategy": {"name": "test_config_names:Mine"}})
        assert builtins.resolve("app", config.app) == "examples.logreg_numpy.app"
    assert config.strategy.name == "test_config_names:Mine"
    assert type(strategy_for_run(config)) is Mine


def test_every_built_in_resolves_to_what_exists():
    import importlib

    for kind, names in builtins.BUILTINS.items():
        for short, target in names.items():
            module, _, attr = target.partition(":")
            loaded = importlib.import_module(module)
            assert not attr or hasattr(loaded, attr), f"{kind} {short}: {target}"
    for name in BUILT_IN:
        assert strategy_class(name).name == name
        assert strategy_class(name).server_handlers in builtins.BUILTINS["server_handlers"]


# ---------------------------------------------------------------- the strategy contract


class Incomplete(Strategy):
    """Forgot ``folded``."""

    name = "incomplete"

    def start_round(self, global_parameters):
        pass

    def fold(self, parameters, num_samples):
        pass

    def finish_round(self, global_parameters):
        return dict(global_parameters)


def test_a_strategy_missing_an_abstract_method_is_refused_when_the_config_is_loaded():
    with pytest.raises(
        ConfigError,
        match=(
            r"strategy 'test_config_names:Incomplete': class Incomplete does not implement folded \(every strategy "
            r"must"
        ),
    ):
        parse_config({"strategy": {"name": "test_config_names:Incomplete"}})


def test_an_unknown_option_is_refused_naming_the_strategy_and_the_option():
    with pytest.raises(
        ConfigError,
        match=(
            r"strategy 'fedadam': no option 'etaa' \(its options: eta, beta_1, beta_2, tau, initial_v, "
            r"bias_correction; a strategy declares its options in its Options class\)"
        ),
    ):
        parse_config({"strategy": {"name": "fedadam", "options": {"etaa": 0.1}}})


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("fedadam", {"eta": "0.1"}, r"strategy 'fedadam': option 'eta': Input should be a valid number \(got '0.1'\)"),
        (
            "fedbuff",
            {"buffer_size": 2.5},
            r"strategy 'fedbuff': option 'buffer_size': Input should be a valid integer \(got 2.5\)",
        ),
        (
            "norm_bounding",
            {"weighted": "yes"},
            r"strategy 'norm_bounding': option 'weighted': Input should be a valid boolean \(got 'yes'\)",
        ),
        (
            "fedasync",
            {"alpha": 1.5},
            r"strategy 'fedasync': option 'alpha': Input should be less than or equal to 1 \(got 1.5\)",
        ),
        (
            "dp_fedavg",
            {"mode": "both"},
            r"strategy 'dp_fedavg': option 'mode': Input should be 'central' or 'local' \(got 'both'\)",
        ),
    ],
)
def test_a_mistyped_option_is_refused_naming_the_strategy_and_the_option(name, options, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"strategy": {"name": name, "options": options}})


def test_every_built_in_option_is_documented():
    for name in BUILT_IN:
        for option, field in strategy_class(name).Options.model_fields.items():
            assert field.description, f"{name}.{option}"


def test_options_are_attributes_with_their_defaults():
    strategy = strategy_class("fedadam")()
    assert (
        strategy.eta,
        strategy.beta_1,
        strategy.beta_2,
        strategy.tau,
        strategy.initial_v,
        strategy.bias_correction,
    ) == (0.01, 0.9, 0.99, 1e-3, 1e-6, False)
    assert strategy.options.initial_v is None  # tau^2 is the strategy's reading of "none"


def test_a_built_in_moved_under_brokerfl_keeps_its_old_spelling(monkeypatch):
    monkeypatch.setitem(builtins.BUILTINS["app"], "mlp", "brokerfl.handlers.apps.mlp")
    with pytest.warns(DeprecationWarning, match="write app: mlp"):
        assert builtins.short_name("app", "brokerfl.handlers.apps.mlp") == "mlp"
    assert builtins.resolve("app", "mlp") == "brokerfl.handlers.apps.mlp"
