"""The generated reference pages: the ``brokerfl`` command, the config keys and the message types.

A mkdocs hook (``hooks:`` in ``mkdocs.yml``; ``docs/hooks/`` is excluded from the site). A
page under ``docs/reference/`` holds a hand-written introduction and a marker such as
``<!-- generated: cli -->``; :func:`on_page_markdown` replaces the marker with what this
module generates from the code itself:

- ``cli``: :func:`brokerfl.cli.commands.build_parser`, every command and sub-command;
- ``config``: the pydantic models of :mod:`brokerfl.config`, the built-in strategies'
  ``Options`` (found through the short names of :mod:`brokerfl.config.builtins`) and the
  short names themselves;
- ``messages``: the registry of :mod:`brokerfl.wire.message`, with the routing keys of
  :data:`ROUTES`.

The functions that generate are plain (``cli_reference()``, ``config_reference()``,
``messages_reference()``): ``tests/test_docs_reference.py`` calls them without mkdocs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _this_repository() -> None:
    """Import brokerfl from the repository this file is in, not from an installation
    elsewhere (mkdocs puts sys.path back as it was after loading a hook, so this runs again
    before the pages are generated)."""
    for path in (str(HERE), str(ROOT)):  # sphinx_prose beside this file; the repository's brokerfl
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)
    loaded = sys.modules.get("brokerfl")
    if loaded is not None and not Path(loaded.__file__).resolve().is_relative_to(ROOT):
        raise RuntimeError(
            f"brokerfl was imported from {loaded.__file__}, not from {ROOT}: the reference would be wrong"
        )


_this_repository()
import sphinx_prose  # noqa: E402

MARKER = re.compile(r"^<!-- generated: ([a-z]+) -->$", re.MULTILINE)
CONFIG_PAGE = "config.md"  # links from the command's page to a key: config.md#strategy.fraction


# ---------------------------------------------------------------- markdown text


def escape(text: str) -> str:
    """Plain text (a help text, a description) as markdown that shows it as written."""
    text = re.sub(r"([\\`*_\[\]{}|#>])", r"\\\1", text)
    return text.replace("<", "&lt;")


def code(text: Any) -> str:
    """``text`` as an inline code span (backticks inside it allowed)."""
    return sphinx_prose.code(str(text))


from_docstring = sphinx_prose.from_docstring


def first_paragraph(doc: str | None) -> str:
    return inspect.cleandoc(doc or "").split("\n\n")[0].strip()


def one_line(text: str) -> str:
    """A paragraph on one line (for a table cell)."""
    return " ".join(text.split())


def cell(text: str) -> str:
    """Text for a table cell: one line, its pipes (outside code spans) escaped."""
    parts = re.split(r"(`[^`]*`)", one_line(text))
    return "".join(p if i % 2 else re.sub(r"(?<!\\)\|", r"\\|", p) for i, p in enumerate(parts))


# ---------------------------------------------------------------- the command


@dataclasses.dataclass
class Option:
    """One argument of one command, as the reference shows it."""

    command: str  # "simulate", "journal export"
    action: argparse.Action
    invocation: str  # "--clients CLIENTS", "config"
    help: str | None
    env: list[str]  # BROKERFL_* variables that set it
    config_key: str | None  # the config key it overrides


@dataclasses.dataclass
class Command:
    name: str  # "simulate", "journal export"
    summary: str | None
    description: str | None
    raw_description: bool
    usage: str
    options: list[Option]
    has_subcommands: bool = False


class _Environ(dict):
    """``os.environ`` while the parser is built: empty (the defaults shown are the code's,
    not those of the machine that builds the site), and it records which BROKERFL_*
    variables are read, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[str] = []

    def get(self, key: str, default: Any = None) -> Any:
        if key.startswith("BROKERFL_"):
            self.read.append(key)
        return default


class _Anything(argparse.Namespace):
    def __getattr__(self, name: str) -> str:
        return name


def config_overrides() -> dict[str, str]:
    """Argument dest -> the config key it overrides, as the command reads them
    (:func:`brokerfl.cli.common.load_run_config`)."""
    from brokerfl.cli import common

    seen: dict[str, Any] = {}

    def capture(path: Any, overrides: dict[str, Any] | None = None) -> None:
        seen.update(overrides or {})

    with mock.patch.object(common, "load_config", capture):
        common.load_run_config(_Anything())
    return {dest: key for key, dest in seen.items() if isinstance(dest, str)}


def _parser_and_env() -> tuple[argparse.ArgumentParser, dict[int, list[str]]]:
    import brokerfl.cli.commands as commands  # imported before os.environ is swapped

    environ = _Environ()
    env_of: dict[int, list[str]] = {}
    add_argument = argparse._ActionsContainer.add_argument

    def recording(self: Any, *args: Any, **kwargs: Any) -> argparse.Action:
        action = add_argument(self, *args, **kwargs)
        env_of[id(action)] = list(dict.fromkeys(environ.read))
        environ.read.clear()
        return action

    with (
        mock.patch.object(os, "environ", environ),
        mock.patch.object(argparse._ActionsContainer, "add_argument", recording),
    ):
        parser = commands.build_parser()
    return parser, env_of


# a variable the command reads when it runs, not when the parser is built: "(default: $BROKERFL_OUT ..."
_HELP_ENV = re.compile(r"default: \$(BROKERFL_[A-Z0-9_]+)")


def commands() -> list[Command]:
    """Every command and sub-command of ``brokerfl``, in the parser's order."""
    parser, env_of = _parser_and_env()
    overrides = config_overrides()
    found: list[Command] = []

    def walk(parser: argparse.ArgumentParser, name: str, summary: str | None) -> None:
        formatter = argparse.HelpFormatter(parser.prog, width=88)
        options = []
        subcommands: list[tuple[str, argparse.ArgumentParser, str | None]] = []
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                subcommands += [(n, p, helps.get(n)) for n, p in action.choices.items()]
                continue
            help_text = formatter._expand_help(action) if action.help else None
            env = [*env_of.get(id(action), []), *_HELP_ENV.findall(help_text or "")]
            options.append(
                Option(
                    command=name,
                    action=action,
                    invocation=formatter._format_action_invocation(action),
                    help=help_text,
                    env=list(dict.fromkeys(env)),
                    config_key=overrides.get(action.dest) if name else None,
                )
            )
        with mock.patch.dict(os.environ, {"COLUMNS": "80"}):
            usage = parser.format_usage().strip()
        found.append(
            Command(
                name=name,
                summary=summary,
                description=parser.description,
                raw_description=parser.formatter_class is argparse.RawDescriptionHelpFormatter,
                usage=usage,
                options=options,
                has_subcommands=bool(subcommands),
            )
        )
        for sub_name, sub_parser, sub_summary in subcommands:
            walk(sub_parser, f"{name} {sub_name}".strip(), sub_summary)

    walk(parser, "", None)
    return found


def sentence(text: str) -> str:
    """A help text as a sentence: its first word capitalised, unless that word is a name
    (``remove-client: ...``, ``abort: ...``, ``topk: ...``)."""
    word = re.split(r"[\s(]", text, maxsplit=1)[0]
    if not word or word.endswith((":", ",")) or re.search(r"[-_./=$]", word) or not word.islower():
        return text
    return text[0].upper() + text[1:]


def anchor(command: str) -> str:
    return command.replace(" ", "-")


def _kind(action: argparse.Action) -> str:
    if action.nargs == 0:
        if isinstance(action, argparse.BooleanOptionalAction):
            return "flag (" + " / ".join(code(s) for s in action.option_strings) + ")"
        return "flag"
    if action.choices is not None:
        return "one of " + ", ".join(code(c) for c in action.choices)
    kind = {int: "integer", float: "number", None: "text"}.get(action.type)
    if kind is None:  # a parsing function: its format is the metavar's, else its docstring's
        if action.metavar:
            kind = code(action.metavar)
        else:
            doc = first_paragraph(getattr(action.type, "__doc__", None))
            kind = f"text such as {from_docstring(doc).rstrip('.')}" if doc else "text"
    if isinstance(action, argparse._AppendAction):
        kind += ", repeatable"
    if action.nargs == "*":
        kind = f"zero or more: {kind}"
    return kind


def _default(option: Option) -> str | None:
    action = option.action
    if option.config_key is not None:
        key = option.config_key
        return f"the config's [{code(key)}]({CONFIG_PAGE}#{key})"
    if action.default in (None, argparse.SUPPRESS, [], False):
        return None
    return code(action.default)


def command_markdown(command: Command) -> str:
    title = f"brokerfl {command.name}".strip()
    lines = [f"## {title} {{#{anchor(command.name) or 'brokerfl'}}}", ""]
    if command.summary:
        lines += [escape(command.summary[0].upper() + command.summary[1:]) + ".", ""]
    if command.description and command.description != command.summary:
        if command.raw_description:
            lines += [f"- {escape(line)}" for line in command.description.splitlines() if line.strip()]
        else:
            lines.append(escape(command.description))
        lines.append("")
    lines += ["```text", command.usage, "```", ""]
    if command.has_subcommands and not command.options:
        return "\n".join(lines)
    for option in command.options:
        action = option.action
        lines.append(code(option.invocation))
        text = escape(sentence(option.help)) if option.help else ""
        if text and not text.endswith("."):
            text += "."
        kind = _kind(action)
        facts = [kind[0].upper() + kind[1:] + "."]
        if action.required:
            facts.append("Required.")
        elif not action.option_strings and action.nargs == "?":
            facts.append("Optional.")
        if (default := _default(option)) is not None:
            facts.append(f"Default: {default}.")
        if option.env:
            facts.append("Environment: " + ", ".join(code(e) for e in option.env) + ".")
        lines.append(":   " + " ".join(x for x in (text, *facts) if x))
        lines.append("")
    return "\n".join(lines)


def cli_reference() -> str:
    """Every command, its usage and every option: type, default, environment, help."""
    found = commands()
    top = found[0]
    parts = [
        "In the parser's order: "
        + ", ".join(f"[{code(c.name)}](#{anchor(c.name)})" for c in found[1:] if " " not in c.name)
        + ".",
        "",
    ]
    parts += [command_markdown(c) for c in found[1:]]
    assert top.options == [] or all(o.action.dest == "command" for o in top.options)
    return "\n".join(parts)


# ---------------------------------------------------------------- the config


@dataclasses.dataclass
class Key:
    path: str  # "strategy.fraction"
    field: Any  # pydantic FieldInfo
    model: type  # the pydantic model that holds it
    section: type | None  # the key's own model, for a section (data, strategy, ...)


def _is_model(annotation: Any) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _section_of(annotation: Any) -> type | None:
    """The model of a section key: ``Section``, or ``Section | None`` (off unless given)."""
    if _is_model(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if _is_model(a)]
        if len(models) == 1 and type(None) in typing.get_args(annotation):
            return models[0]
    return None


def config_keys(model: type | None = None, prefix: str = "") -> list[Key]:
    """Every key of the run config (a section, then its keys), by dotted path."""
    if model is None:
        from brokerfl.config import RunConfig

        model = RunConfig
    keys: list[Key] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        section = _section_of(field.annotation)
        keys.append(Key(path, field, model, section))
        if section is not None:
            keys += config_keys(section, f"{path}.")
    return keys


def type_text(annotation: Any) -> str:
    """A type as a config's author reads it."""
    import numpy as np

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return "one of " + ", ".join(code(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in args)
    if origin is list:
        return f"list of {_plural(type_text(args[0])) if args else 'any'}"
    if origin is dict:
        if args == (str, np.ndarray):
            return "tensors (name: array)"
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}" if args else "mapping"
    if _is_model(annotation):
        return "section"
    simple = {int: "integer", float: "number", str: "text", bool: "boolean", Any: "any", np.ndarray: "array"}
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _plural(text: str) -> str:
    return {"integer": "integers", "number": "numbers", "text": "texts", "boolean": "booleans"}.get(text, text)


def yaml_value(value: Any) -> str:
    """A value as a config writes it."""
    import yaml

    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    if isinstance(value, str):
        return value or '""'
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()


def default_text(field: Any) -> str:
    from pydantic_core import PydanticUndefined

    if field.default_factory is not None:
        value = field.default_factory()
        if _is_model(type(value)):
            return "see its keys"
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    return code(yaml_value(value))


def constraints(field: Any) -> list[str]:
    """What pydantic checks beyond the type (ranges, lengths, patterns)."""
    import annotated_types as at

    said = []
    for item in field.metadata:
        if isinstance(item, at.Ge):
            said.append(f"≥ {item.ge}")
        elif isinstance(item, at.Gt):
            said.append(f"> {item.gt}")
        elif isinstance(item, at.Le):
            said.append(f"≤ {item.le}")
        elif isinstance(item, at.Lt):
            said.append(f"< {item.lt}")
        elif isinstance(item, at.MinLen):
            if item.min_length:
                said.append(f"at least {item.min_length} items")
        elif isinstance(item, at.MaxLen):
            said.append(f"at most {item.max_length} items")
        elif getattr(item, "pattern", None):
            said.append(f"matches {code(item.pattern)}")
    return said


def _type_cell(field: Any) -> str:
    text = type_text(field.annotation)
    said = constraints(field)
    return text + (", " + ", ".join(said) if said else "")


def _keys_table(keys: list[Key], *, anchors: bool = True, prefix: str = "") -> list[str]:
    lines = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key in keys:
        name = key.path.removeprefix(prefix)
        shown = code(name)
        if key.section is not None:
            shown = f"[{shown}](#{key.path})"
        elif anchors:
            shown = f'<a id="{key.path}"></a>{shown}'
        lines.append(
            f"| {shown} | {cell(_type_cell(key.field))} | {cell(default_text(key.field))} "
            f"| {cell(escape(key.field.description or ''))} |"
        )
    return lines


def options_table(options_model: type) -> list[str]:
    """A strategy's options: name, type, default, description."""
    fields = list(options_model.model_fields.items())
    if not fields:
        return ["No options."]
    lines = ["| Option | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in fields:
        lines.append(
            f"| {code(name)} | {cell(_type_cell(field))} | {cell(default_text(field))} "
            f"| {cell(escape(field.description or ''))} |"
        )
    return lines


def strategy_classes() -> dict[str, type]:
    """Each built-in strategy's short name -> its class."""
    from brokerfl.config.builtins import BUILTINS
    from brokerfl.handlers.strategies.base import strategy_class

    return {name: strategy_class(name) for name in BUILTINS["strategy"]}


def strategy_doc(cls: type) -> str:
    """A strategy's docstring: its class's, an intermediate base's, else its module's."""
    from brokerfl.handlers.strategies.base import Strategy

    for klass in cls.__mro__:
        if klass is Strategy:
            break
        if klass.__dict__.get("__doc__"):
            return klass.__doc__
    return sys.modules[cls.__module__].__doc__ or ""


def _summary_of(target: str) -> str:
    """The first paragraph of the docstring of ``pkg.mod`` or ``pkg.mod:Class``."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    if attr:
        obj = getattr(obj, attr)
    return first_paragraph(obj.__doc__)


def config_reference() -> str:
    """Every key of the run config (type, default, range, description), the built-in
    strategies with their options, and the short names a config may use."""
    from brokerfl.config.builtins import BUILTINS

    keys = config_keys()
    top = [k for k in keys if "." not in k.path]
    parts = ["## Top-level keys {#top-level-keys}", "", *_keys_table(top), ""]
    for key in keys:  # each section after its parent's table (tracking, then tracking.mlflow)
        if key.section is None:
            continue
        depth = key.path.count(".")
        inner = [k for k in keys if k.path.startswith(key.path + ".") and k.path.count(".") == depth + 1]
        parts += [f"{'#' * (2 + depth)} {code(key.path)} {{#{key.path}}}", ""]
        if key.field.description:
            parts += [escape(key.field.description[0].upper() + key.field.description[1:]) + ".", ""]
        if key.section.__doc__ and key.section.__doc__ != key.section.__base__.__doc__:
            parts += [from_docstring(key.section.__doc__), ""]
        parts += [*_keys_table(inner), ""]

    parts += [
        "## Strategies and their options {#strategies}",
        "",
        f"The built-in strategies a config names in [{code('strategy.name')}](#strategy.name) (or as "
        f"{code('strategy: NAME')}), and the options each takes in "
        f"[{code('strategy.options')}](#strategy.options). An option a strategy does not take, or of the "
        "wrong type, is an error when the config is loaded (types are strict: `true` is no number, "
        '`"0.1"` no float).',
        "",
    ]
    for name, cls in strategy_classes().items():
        parts += [f"### {code(name)} {{#strategy-{name}}}", ""]
        doc = first_paragraph(strategy_doc(cls))
        if doc:
            parts += [from_docstring(doc), ""]
        facts = [f"Class {code(cls.__module__ + '.' + cls.__qualname__)}."]
        if cls.server_handlers != "server":
            facts.append(f"Its server runs the {code(cls.server_handlers)} handler set.")
        if cls.requires:
            facts.append(
                "Needs "
                + ", ".join(code(m) for m in cls.requires)
                + " (the torch extra: `pip install 'brokerfl[torch]'`)."
            )
        parts += [" ".join(facts), "", *options_table(cls.Options), ""]

    parts += [
        "## Short names {#short-names}",
        "",
        "A config names a built-in part by its short name, and your own code by its import path "
        "(a module, `package.module`; a strategy, `package.module:Class`). The strategies' short names are "
        "the headings of [Strategies and their options](#strategies); the others are:",
        "",
        "| Key | Short name | What it names | Summary |",
        "|---|---|---|---|",
    ]
    for kind, names in BUILTINS.items():
        if kind == "strategy":
            continue
        for short, target in names.items():
            summary = cell(from_docstring(_summary_of(target)))
            parts.append(f"| [{code(kind)}](#{kind}) | {code(short)} | {code(target)} | {summary} |")
    parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------- the message types

# Where each message type travels: the routing keys its senders use on the run's exchange
# (brokerfl.<run>). ``client.<id>`` is one client's queue; ``clients`` every client's;
# ``audit`` and ``admin`` records for the journal and the admin queue. A routing key is
# ``<receiver>.<type>`` (brokerfl/transports/topology.py), so the table says who receives
# what; tests/test_docs_reference.py checks it against what simulated runs publish, and that
# every type of the registry is in it.
REPLY = "reply"  # direct reply-to: straight to the requester, not routed and not journaled
BY_QUEUE = "server queue"  # published to the server queue by name (default exchange): not journaled
ROUTES: dict[str, tuple[str, ...]] = {
    "join": ("server.join",),
    "leave": ("server.leave",),
    "heartbeat": ("server.heartbeat",),
    "heartbeats": ("server.heartbeats",),
    "train_task": ("clients.train_task", "client.<id>.train_task"),
    "parameter_update": ("server.parameter_update",),
    "train_failed": ("server.train_failed",),
    "gradients": ("clients.gradients", "client.<id>.gradients"),
    "evaluate_task": ("clients.evaluate_task",),
    "evaluate_result": ("server.evaluate_result",),
    "update_dropped": ("audit.update_dropped",),
    "model_version_stored": ("audit.model_version_stored",),
    "exit": ("clients.exit", "client.<id>.exit"),
    "run_finished": ("audit.run_finished",),
    "server_standby": ("server.server_standby",),
    "status_request": (BY_QUEUE,),
    "status_reply": (REPLY,),
    "admin_command": (),  # the base of the commands below: never sent itself
    "abort_run": ("server.abort_run",),
    "pause_rounds": ("server.pause_rounds",),
    "resume_rounds": ("server.resume_rounds",),
    "remove_client": ("server.remove_client",),
    "set_min_clients": ("server.set_min_clients",),
    "set_rounds": ("server.set_rounds",),
    "shutdown_clients": ("server.shutdown_clients",),
    "admin_reply": (REPLY, "audit.admin_reply"),
    "admin_state_record": ("admin.admin_state_record",),
    "run_record": ("runs.run_record",),
    "journal_mark": ("audit.journal_mark",),
    "local_model_request": ("clients.local_model_request",),
    "local_model": ("server.local_model",),
    "cross_site_eval_task": ("clients.cross_site_eval_task",),
    "cross_site_eval_result": ("server.cross_site_eval_result",),
    "flower_request": ("client.<id>.flower_request",),
    "flower_reply": ("server.flower_reply",),
    "flower_exchange": ("audit.flower_exchange",),
    "secure_keys": ("server.secure_keys",),
    "secure_key_list": ("clients.secure_key_list",),
    "secure_shares": ("server.secure_shares",),
    "secure_shares_for": ("client.<id>.secure_shares_for",),
    "secure_masked": ("server.secure_masked",),
    "secure_unmask": ("clients.secure_unmask",),
    "secure_reveal": ("server.secure_reveal",),
    "secure_round": ("audit.secure_round",),
    # on the run's logs exchange (brokerfl.<run>.logs.in), not the run's
    "log_records": ("server.log_records", "client.<id>.log_records", "clients.log_records"),
    "log_mark": ("mark.log_mark",),
}

# the modules whose import registers the built-in message types, in the order they are shown
MESSAGE_MODULES = {  # module: (title, anchor)
    "brokerfl.wire.message": ("Federated learning", "federated-learning"),
    "brokerfl.runtime.operator_commands": ("Operating a run", "operating"),
    "brokerfl.storage.journal": ("The journal", "the-journal"),
    "brokerfl.handlers.workflows.cross_site": ("Cross-site evaluation", "cross-site-evaluation"),
    "brokerfl.runtime.remote_log": ("A process's log", "logs"),
}
# modules with only LOCAL types (a worker's own events)
LOCAL_MODULES = (
    "brokerfl.runtime.handler_table",
    "brokerfl.handlers.workflows.server_state",
    "brokerfl.handlers.workflows.client",
    "brokerfl.handlers.workflows.evaluation",
    "brokerfl.handlers.workflows.scoring",
    "brokerfl.handlers.workflows.cyclic",
    "brokerfl.handlers.workflows.swarm",
    "brokerfl.flower.grid",
    "brokerfl.handlers.workflows.flower_server",
    "brokerfl.handlers.workflows.flower_client",
    "brokerfl.handlers.workflows.secure_server",
)


def message_types() -> dict[str, type]:
    """The built-in types of the registry, after importing every module that defines one
    (a process that registered types of its own, an app or a test, does not add them)."""
    for module in (*MESSAGE_MODULES, *LOCAL_MODULES):
        importlib.import_module(module)
    from brokerfl.wire.message import MESSAGE_TYPES

    return {name: cls for name, cls in MESSAGE_TYPES.items() if cls.__module__.startswith("brokerfl.")}


def field_comments(cls: type) -> dict[str, str]:
    """The comments written beside a dataclass's fields in its source (``x: int = 0  # what x is``)."""
    import ast
    import io
    import tokenize

    try:
        source, start = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    text = inspect.cleandoc("".join(source)) if source[0].startswith(" ") else "".join(source)
    lines_of: dict[str, range] = {}
    for node in ast.parse(text).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines_of[node.target.id] = range(node.lineno, (node.end_lineno or node.lineno) + 1)
    comments: dict[str, list[str]] = {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            for name, lines in lines_of.items():
                if token.start[0] in lines:
                    comments.setdefault(name, []).append(token.string.lstrip("#").strip())
    return {name: " ".join(parts) for name, parts in comments.items()}


def payload_fields(cls: type) -> list[tuple[str, Any, str]]:
    """A message type's payload fields: name, type hint, default (as shown)."""
    from brokerfl.wire.message import ENVELOPE_FIELDS

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in ENVELOPE_FIELDS:
            continue
        if f.default is not dataclasses.MISSING:
            default = code(yaml_value(f.default))
        elif f.default_factory is not dataclasses.MISSING:
            default = code(yaml_value(f.default_factory()))
        else:
            default = "required"
        out.append((f.name, hints[f.name], default))
    return out


def _route_text(route: str) -> str:
    if route == REPLY:
        return "the requester (direct reply-to)"
    if route == BY_QUEUE:
        return f"the server queue {code('brokerfl.<run>.server')}, by name"
    return code(route)


def own_doc(cls: type) -> str:
    """A class's docstring; "" for a dataclass without one (dataclass makes one up: its signature)."""
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else doc


def message_markdown(name: str, cls: type) -> list[str]:
    lines = [f"### {code(name)} {{#{name}}}", ""]
    base = cls.__mro__[1]
    facts = f"Class {code(cls.__module__ + '.' + cls.__qualname__)}"
    if base.__name__ != "Message":
        facts += f", an {code(base.__name__)}"
    routes = ROUTES.get(name, ())
    if routes:
        facts += f". Routing key{'s' if len(routes) > 1 else ''}: " + ", ".join(_route_text(r) for r in routes) + "."
    else:
        facts += ". Never sent itself: the base of the types that name it."
    lines += [facts, ""]
    if own_doc(cls):
        lines += [from_docstring(own_doc(cls)), ""]
    fields = payload_fields(cls)
    if fields:
        notes = {}
        for klass in reversed(cls.__mro__):  # a field's comment where it is declared
            notes.update(field_comments(klass) if dataclasses.is_dataclass(klass) else {})
        lines += ["| Field | Type | Default | Note |", "|---|---|---|---|"]
        for name, hint, default in fields:
            note = cell(from_docstring(notes.get(name, "")))
            lines.append(f"| {code(name)} | {cell(type_text(hint))} | {default} | {note} |")
    else:
        lines.append("No fields beyond the envelope.")
    lines.append("")
    return lines


def messages_reference() -> str:
    """Every built-in message type: name, routing keys, fields, docstring; the envelope;
    the local events."""
    from brokerfl.wire.message import ENVELOPE_FIELDS, Message

    registry = message_types()
    hints = typing.get_type_hints(Message)
    parts = [
        "## The envelope {#envelope}",
        "",
        "Every message carries these fields, in the transport's properties and headers (not in the body):",
        "",
        "| Field | Type |",
        "|---|---|",
        *[f"| {code(f)} | {type_text(hints[f])} |" for f in ENVELOPE_FIELDS],
        "",
    ]
    for module, (title, section) in MESSAGE_MODULES.items():
        parts += [f"## {title} {{#{section}}}", ""]
        parts.append(f"Defined in {code(module)}.")
        parts.append("")
        for name, cls in registry.items():
            if cls.__module__ == module and not cls.LOCAL:
                parts += message_markdown(name, cls)
    local = [(n, c) for n, c in registry.items() if c.LOCAL]
    parts += [
        "## Local events {#local}",
        "",
        "A worker's own events (a timer, work done aside, its start) are message types too, so that "
        "its handler table handles them like the rest. They never travel: a worker dead-letters one that "
        "arrives over a transport.",
        "",
        "| Type | Class | What it is |",
        "|---|---|---|",
    ]
    for name, cls in local:
        doc = from_docstring(first_paragraph(own_doc(cls)))
        parts.append(f"| {code(name)} | {code(cls.__module__ + '.' + cls.__qualname__)} | {cell(doc)} |")
    parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------- the hook

GENERATORS = {"cli": cli_reference, "config": config_reference, "messages": messages_reference}


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def render(markdown: str) -> str:
    """``markdown`` with each marker replaced by what it names."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise ValueError(f"unknown generated section {name!r} (known: {', '.join(GENERATORS)})")
        with _quiet_warnings():
            return GENERATORS[name]()

    return MARKER.sub(replace, markdown)


def on_config(config: Any) -> Any:
    _this_repository()
    return config


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return render(markdown)
