"""A Flower app directory: its components and its run config, read the way Flower reads them.

A Flower app is a directory with a ``pyproject.toml`` whose ``[tool.flwr.app.components]``
names the ServerApp and the ClientApp (``"module:attribute"``, importable from the
directory) and whose ``[tool.flwr.app.config]`` is the run config (nested tables flattened
to dotted keys). A run's ``flower_config`` overrides keys of that config, never adds any.
"""

from __future__ import annotations

import importlib
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brokerfl.flower import check_flwr

UserConfigValue = bool | int | float | str


class FlowerAppError(ValueError):
    """A directory that is not a Flower app, or a component that cannot be loaded."""


@dataclass(frozen=True)
class FlowerApp:
    directory: Path
    serverapp: str  # "module:attribute"
    clientapp: str
    run_config: dict[str, UserConfigValue] = field(default_factory=dict)  # the app's, overrides applied
    name: str = ""

    def load_server_app(self) -> Any:
        from flwr.serverapp import ServerApp

        return self._load(self.serverapp, ServerApp, "serverapp")

    def load_client_app(self) -> Any:
        from flwr.clientapp import ClientApp

        return self._load(self.clientapp, ClientApp, "clientapp")

    def _load(self, ref: str, kind: type, what: str) -> Any:
        module_name, _, attribute = ref.partition(":")
        with _IMPORTING:
            directory = str(self.directory)
            if directory not in sys.path:  # as Flower does: the app's modules import from its directory
                sys.path.insert(0, directory)
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # the app's own import-time failure, whatever it is
                raise FlowerAppError(
                    f"flower_app {self.directory}: {what} {ref!r} failed to import: {type(exc).__name__}: {exc}"
                ) from exc
        try:
            component = getattr(module, attribute)
        except AttributeError:
            raise FlowerAppError(
                f"flower_app {self.directory}: {what} {ref!r}: module {module_name!r} has no {attribute!r}"
            ) from None
        if not isinstance(component, kind):
            raise FlowerAppError(
                f"flower_app {self.directory}: {what} {ref!r} is a {type(component).__name__}, not a {kind.__name__}"
            )
        return component


_IMPORTING = threading.Lock()  # sys.path and the import of an app's modules, once at a time


def load_flower_app(directory: str | Path, overrides: dict[str, Any] | None = None) -> FlowerApp:
    """The Flower app in ``directory``, its run config with ``overrides`` applied;
    :class:`FlowerAppError` saying what is wrong otherwise (flwr missing or of an
    unsupported version too)."""
    check_flwr()
    path = Path(directory).expanduser().resolve()
    if not path.is_dir():
        raise FlowerAppError(f"flower_app {directory}: no such directory")
    pyproject = path / "pyproject.toml"
    if not pyproject.is_file():
        raise FlowerAppError(f"flower_app {directory}: not a Flower app (no pyproject.toml)")
    try:
        toml = tomllib.loads(pyproject.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise FlowerAppError(f"flower_app {directory}: pyproject.toml is not valid TOML: {exc}") from None
    app = toml.get("tool", {}).get("flwr", {}).get("app")
    components = app.get("components") if isinstance(app, dict) else None
    if not isinstance(components, dict):
        raise FlowerAppError(
            f"flower_app {directory}: not a Flower app (pyproject.toml has no [tool.flwr.app.components])"
        )
    refs = {}
    for key in ("serverapp", "clientapp"):
        ref = components.get(key)
        if not (isinstance(ref, str) and ref.count(":") == 1 and all(ref.split(":"))):
            raise FlowerAppError(
                f"flower_app {directory}: [tool.flwr.app.components] {key} must be 'module:attribute', not {ref!r}"
            )
        refs[key] = ref
    defaults = _flattened(app.get("config") or {})
    run_config = dict(defaults)
    for key, value in (overrides or {}).items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise FlowerAppError(
                f"flower_config: {key!r} is not in the app's [tool.flwr.app.config] (its keys: {known})"
            )
        if not _same_kind(value, defaults[key]):
            raise FlowerAppError(
                f"flower_config: {key!r} must be a {type(defaults[key]).__name__} like the app's default, not {value!r}"
            )
        run_config[key] = value
    name = toml.get("project", {}).get("name", path.name) if isinstance(toml.get("project"), dict) else path.name
    return FlowerApp(path, refs["serverapp"], refs["clientapp"], run_config, str(name))


def _same_kind(value: Any, default: Any) -> bool:
    """An override of a run-config value: of its default's type (an int where a float is)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return type(value) is type(default)


def _flattened(table: dict[str, Any], prefix: str = "") -> dict[str, UserConfigValue]:
    out: dict[str, UserConfigValue] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flattened(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            raise FlowerAppError(
                f"[tool.flwr.app.config] {name}: {type(value).__name__} values are not a Flower run config's "
                "(bool, int, float or str)"
            )
    return out


def node_config(partition_id: int, num_partitions: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A node's ``context.node_config``: its partition, as Flower's simulation sets it,
    plus what its site adds (``--node-config``, ``flower_node_config``)."""
    return {"partition-id": partition_id, "num-partitions": num_partitions, **(extra or {})}
