"""The package's shape: no import cycles, every package installed, the layer map true."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over every import, function-level ones included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_counting_function_level_imports() -> None:
    # an import only a type checker reads (under TYPE_CHECKING) does not run: it makes no cycle
    graph = grimp.build_graph("brokerfl", cache_dir=None, exclude_type_checking_imports=True)
    assert len(graph.modules) > 80, "the graph missed modules (is brokerfl/handlers there?)"
    assert strongly_connected(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        graph.add_import(importer=importer, imported=imported)
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_the_wheel_lists_every_package() -> None:
    on_disk = {  # brokerfl/handlers is a link to handlers/: followed
        ".".join(Path(folder).relative_to(ROOT).parts)
        for folder, _, files in os.walk(ROOT / "brokerfl", followlinks=True)
        if "__init__.py" in files
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == on_disk


def test_the_layer_map_names_the_contracts_layers() -> None:
    (layers,) = [c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["name"].startswith("Layers:")]
    page = (ROOT / "docs" / "concepts" / "layers.md").read_text()
    for layer in layers["layers"]:
        folder = layer.replace(".", "/")
        shown = f"`{folder}/`" if (ROOT / folder).is_dir() else f"`{folder}.py`"
        if layer == "brokerfl.handlers":
            shown = "`brokerfl.handlers`"
        assert shown in page, f"docs/concepts/layers.md does not show the layer {layer} as {shown}"


def test_an_old_module_path_is_the_new_module_with_a_deprecation_warning() -> None:
    import importlib
    import sys
    import warnings

    import brokerfl.wire.message as message

    sys.modules.pop("brokerfl.message", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("brokerfl.message")
    assert old is message
    assert message.__spec__ is not None and message.__spec__.name == "brokerfl.wire.message"
    assert [str(w.message) for w in caught if w.category is DeprecationWarning] == [
        "brokerfl.message moved to brokerfl.wire.message; import it from there (the old path goes in a later release)"
    ]
