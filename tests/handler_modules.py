"""A test's own ``extra_handlers`` module: handler sets a config names for one run only.

Tests that change what clients or the server do in a simulation compose it into that run's
tables, as a user's module would be, instead of patching a process-wide table."""

from __future__ import annotations

import sys
import types
import uuid

import pytest

from brokerfl.runtime.handler_table import HandlerSet


def extra_handlers(
    monkeypatch: pytest.MonkeyPatch, *, client: HandlerSet | None = None, server: HandlerSet | None = None
) -> str:
    """The name of a module (importable for this test only) exporting these sets as
    ``CLIENT_HANDLERS`` and ``SERVER_HANDLERS``: put it in the config's ``extra_handlers``."""
    name = f"test_extra_handlers_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    module.CLIENT_HANDLERS = () if client is None else client
    module.SERVER_HANDLERS = () if server is None else server
    monkeypatch.setitem(sys.modules, name, module)
    return name
