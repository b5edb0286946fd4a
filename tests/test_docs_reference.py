"""The generated reference pages (docs/hooks/reference.py): every CLI option and every config
key has a description, and the pages the generator writes show every command, option, key,
strategy option and message type. The generator is called directly (no mkdocs build)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hooks_{name}", ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


reference = _load("reference")
sphinx_prose = _load("sphinx_prose")


@pytest.fixture(scope="module")
def commands():
    return reference.commands()


@pytest.fixture(scope="module")
def cli_page():
    return reference.cli_reference()


@pytest.fixture(scope="module")
def config_page():
    return reference.config_reference()


@pytest.fixture(scope="module")
def messages_page():
    return reference.messages_reference()


# ---------------------------------------------------------------- descriptions


def test_every_command_and_option_has_help(commands):
    names = {c.name for c in commands}
    assert {"simulate", "server", "client", "journal export", "admin", "ping"} <= names
    missing = [c.name for c in commands[1:] if not c.summary]
    missing += [f"{o.command} {o.invocation}" for c in commands for o in c.options if not (o.help or "").strip()]
    assert not missing, f"no help text: {missing}"


def test_every_config_key_has_a_description():
    keys = reference.config_keys()
    assert {"run", "strategy.fraction", "train.epochs", "compression.method"} <= {k.path for k in keys}
    missing = [k.path for k in keys if not (k.field.description or "").strip()]
    for name, cls in reference.strategy_classes().items():
        missing += [
            f"strategy {name}: {option}"
            for option, field in cls.Options.model_fields.items()
            if not (field.description or "").strip()
        ]
    assert not missing, f"no description: {missing}"


# ---------------------------------------------------------------- the pages


def test_cli_page_shows_every_command_and_option(commands, cli_page):
    for command in commands[1:]:
        assert f"## brokerfl {command.name} {{#{reference.anchor(command.name)}}}" in cli_page
        section = cli_page.split(f"## brokerfl {command.name} ", 1)[1].split("\n## ", 1)[0]
        for option in command.options:
            assert reference.code(option.invocation) in section, (command.name, option.invocation)


def test_cli_page_says_environment_and_config_key():
    by_name = {
        (o.command, o.action.option_strings[0] if o.action.option_strings else o.action.dest): o
        for c in reference.commands()
        for o in c.options
    }
    assert by_name["server", "--clients"].env == ["BROKERFL_CLIENTS"]
    assert by_name["server", "--clients"].config_key == "clients"
    assert by_name["simulate", "--enforce-identity"].config_key == "identity.enforce"
    assert by_name["client", "--client-id"].env == ["BROKERFL_CLIENT_ID"]
    assert by_name["server", "--broker"].env == ["BROKERFL_AMQP_URL"]  # read when the command runs
    assert by_name["server", "--out"].env == ["BROKERFL_OUT"]
    assert by_name["server", "--log-level"].env == []
    assert by_name["admin", "--config"].env == ["BROKERFL_CONFIG"]


def test_cli_page_shows_the_codes_defaults_not_this_machines(monkeypatch):
    monkeypatch.setenv("BROKERFL_TLS_CA", "/machine/ca.pem")
    monkeypatch.setenv("BROKERFL_MAX_RECONNECT_S", "7")
    page = reference.cli_reference()
    assert "/machine/ca.pem" not in page
    assert "Default: `60.0`. Environment: `BROKERFL_MAX_RECONNECT_S`." in page


def test_config_page_shows_every_key_and_strategy_option(config_page):
    for key in reference.config_keys():
        shown = f"{{#{key.path}}}" if key.section is not None else f'<a id="{key.path}"></a>'
        assert shown in config_page, key.path
    for name, cls in reference.strategy_classes().items():
        section = config_page.split(f"{{#strategy-{name}}}", 1)[1].split("\n### ", 1)[0]
        for option in cls.Options.model_fields:
            assert f"| `{option}` |" in section, (name, option)
    from brokerfl.config.builtins import BUILTINS

    for kind, names in BUILTINS.items():
        for short in names:
            shown = f"{{#strategy-{short}}}" if kind == "strategy" else f"| [`{kind}`](#{kind}) | `{short}` |"
            assert shown in config_page, (kind, short)


def test_config_page_types_defaults_and_ranges(config_page):
    assert '<a id="strategy.fraction"></a>`strategy.fraction` | number, > 0, ≤ 1 | `1.0` |' in config_page
    assert '<a id="model.hidden"></a>`model.hidden` | list of integers | `[128, 64]` |' in config_page
    assert "| `eta` | number, > 0 | `0.01` |" in config_page  # fedadam's option


def test_messages_page_shows_every_type_with_its_fields(messages_page):
    registry = reference.message_types()
    wire = {name: cls for name, cls in registry.items() if not cls.LOCAL}
    assert set(reference.ROUTES) == set(wire), "ROUTES must name every message type that travels, and no other"
    for name, cls in wire.items():
        assert f"### `{name}` {{#{name}}}" in messages_page
        section = messages_page.split(f"{{#{name}}}", 1)[1].split("\n### ", 1)[0]
        for field, _, _ in reference.payload_fields(cls):
            assert f"| `{field}` |" in section, (name, field)
    for name, cls in registry.items():
        if cls.LOCAL:
            assert f"| `{name}` | `{cls.__module__}.{cls.__qualname__}` |" in messages_page


def test_every_built_in_type_is_registered_by_the_modules_the_generator_imports():
    import brokerfl

    registry = reference.message_types()
    for module in pkgutil.walk_packages(brokerfl.__path__, "brokerfl."):
        if module.name.endswith("__main__") or module.name.endswith("torch_adapter"):
            continue
        importlib.import_module(module.name)
    from brokerfl.wire.message import MESSAGE_TYPES

    built_in = {n for n, c in MESSAGE_TYPES.items() if c.__module__.startswith("brokerfl.")}
    assert built_in <= set(registry)


def test_routes_are_what_simulated_runs_publish(tmp_path, monkeypatch):
    """Every routing key a few small simulated runs publish on the run's exchange is one the
    message page names for its type."""
    from brokerfl.assembly.simulate import simulate
    from brokerfl.config import parse_config
    from brokerfl.transports.local import LocalTransport

    seen: set[tuple[str, str]] = set()
    publish = LocalTransport._publish

    def recording(self, exchange, routing_key, envelope, body, *args, **kwargs):
        if exchange == "brokerfl.default":
            seen.add((envelope.type, routing_key))
        return publish(self, exchange, routing_key, envelope, body, *args, **kwargs)

    monkeypatch.setattr(LocalTransport, "_publish", recording)
    small = {"clients": 2, "rounds": 1, "train": {"epochs": 1, "max_batches": 1}}
    # the synchronous server with federated and cross-site evaluation; the asynchronous server;
    # secure aggregation's stages
    for i, extra in enumerate(
        [
            {"federated_evaluation": "always", "cross_site_eval": True},
            {"strategy": "fedbuff"},
            {"clients": 3, "secure_aggregation": {}},
        ]
    ):
        simulate(parse_config({**small, **extra}), tmp_path / str(i), journal=True)
    assert {t for t, _ in seen} >= {"join", "train_task", "parameter_update", "evaluate_task", "local_model", "exit"}
    assert ("train_task", "client.0.train_task") in seen  # the asynchronous server's own task
    assert ("secure_shares_for", "client.2.secure_shares_for") in seen
    for kind, key in sorted(seen):
        patterns = [re.escape(r).replace(re.escape("<id>"), "[^.]+") for r in reference.ROUTES.get(kind, ())]
        assert any(re.fullmatch(p, key) for p in patterns), f"{kind} published as {key}: not in ROUTES[{kind!r}]"


# ---------------------------------------------------------------- the machinery


def test_reference_pages_hold_their_markers():
    for name in reference.GENERATORS:
        page = {"cli": "cli.md", "config": "config.md", "messages": "messages.md"}[name]
        assert f"<!-- generated: {name} -->" in (ROOT / "docs" / "reference" / page).read_text()
    assert "<!-- generated" not in reference.render("a\n<!-- generated: messages -->\nb")
    with pytest.raises(ValueError, match="unknown generated section"):
        reference.render("<!-- generated: nope -->")


def test_escape_keeps_text_as_written():
    assert reference.escape("runs/<run> a_b *x* [y] {z} a|b") == r"runs/&lt;run\> a\_b \*x\* \[y\] \{z\} a\|b"
    assert reference.cell("a | b `c|d`") == r"a \| b `c|d`"


def test_sphinx_markup_becomes_markdown():
    text = """Summary with :class:`~brokerfl.app.AppContext` and :mod:`brokerfl.wire`.

    A block follows::

        x = "<kept>"

    ``term(a)`` (required)
        Its definition, ``<id>`` and <run>.
    ``other``
        The next one.
    """
    assert sphinx_prose.from_docstring(text).split("\n") == [
        "Summary with `AppContext` and `brokerfl.wire`.",
        "",
        "A block follows:",
        "",
        '    x = "<kept>"',
        "",
        "`term(a)` (required)",
        ":   Its definition, `<id>` and &lt;run>.",
        "",
        "`other`",
        ":   The next one.",
    ]


def test_argparse_flags_are_described_as_flags(commands):
    kinds = {
        o.invocation: reference._kind(o.action)
        for c in commands
        for o in c.options
        if isinstance(o.action, argparse.BooleanOptionalAction) or o.invocation == "--no-progress"
    }
    assert kinds["--no-progress"] == "flag"
    assert kinds["--password-login, --no-password-login"].startswith("flag (")


def test_config_page_example_is_a_valid_config():
    import yaml

    from brokerfl.config import parse_config

    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    example = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = parse_config(yaml.safe_load(example))
    assert config.strategy.name == "fedadam" and config.strategy.options == {"eta": 0.01}
