"""Module paths that moved when brokerfl's modules went into layer folders: the old path still
imports the same module object, with a DeprecationWarning that names the new one.

Decision: one table and a finder instead of a stub file per old path. A stub would be a second
module object; aliasing makes ``brokerfl.message`` and ``brokerfl.wire.message`` the very same
module, so message types register once and ``isinstance`` checks agree whichever path a
user's code imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED: dict[str, str] = {
    "brokerfl.accounting": "brokerfl.storage.accounting",
    "brokerfl.admin": "brokerfl.runtime.operator_commands",
    "brokerfl.app_metrics": "brokerfl.wire.app_metrics",
    "brokerfl.broker_store": "brokerfl.storage.broker_store",
    "brokerfl.builtins": "brokerfl.config.builtins",
    "brokerfl.certs": "brokerfl.ops.certs",
    "brokerfl.cli_operate": "brokerfl.cli.operate",
    "brokerfl.codec": "brokerfl.wire.codec",
    "brokerfl.compression": "brokerfl.wire.compression",
    "brokerfl.cross_site": "brokerfl.storage.cross_site_results",
    "brokerfl.handler_table": "brokerfl.runtime.handler_table",
    "brokerfl.identity": "brokerfl.runtime.identity",
    "brokerfl.inspect": "brokerfl.ops.inspection",
    "brokerfl.journal": "brokerfl.storage.journal",
    "brokerfl.log": "brokerfl.runtime.log",
    "brokerfl.memory": "brokerfl.transports.memory",
    "brokerfl.message": "brokerfl.wire.message",
    "brokerfl.metrics": "brokerfl.storage.metrics_log",
    "brokerfl.model_file": "brokerfl.storage.model_file",
    "brokerfl.model_refs": "brokerfl.storage.model_refs",
    "brokerfl.monitoring": "brokerfl.ops.monitoring",
    "brokerfl.names": "brokerfl.wire.names",
    "brokerfl.private_files": "brokerfl.storage.private_files",
    "brokerfl.provision": "brokerfl.ops.provision",
    "brokerfl.replay": "brokerfl.ops.replay",
    "brokerfl.roles": "brokerfl.assembly.roles",
    "brokerfl.round_config": "brokerfl.app.round_config",
    "brokerfl.scaffold": "brokerfl.ops.scaffold",
    "brokerfl.simulate": "brokerfl.assembly.simulate",
    "brokerfl.store": "brokerfl.storage.store",
    "brokerfl.stream_reader": "brokerfl.transports.stream_reader",
    "brokerfl.swarm": "brokerfl.assembly.swarm_peers",
    "brokerfl.threads": "brokerfl.runtime.threads",
    "brokerfl.timing": "brokerfl.runtime.timing",
    "brokerfl.topology": "brokerfl.transports.topology",
    "brokerfl.torch_app": "brokerfl.app.torch_adapter",
    "brokerfl.transport": "brokerfl.transports.base",
    "brokerfl.transports.amqp_connection": "brokerfl.transports.amqp.connection",
    "brokerfl.transports.amqp_consuming": "brokerfl.transports.amqp.consuming",
    "brokerfl.transports.amqp_deliveries": "brokerfl.transports.amqp.deliveries",
    "brokerfl.transports.amqp_settling": "brokerfl.transports.amqp.settling",
    "brokerfl.transports.chunks": "brokerfl.transports.amqp.chunks",
    "brokerfl.transports.connect": "brokerfl.transports.amqp.connect",
    "brokerfl.transports.envelope": "brokerfl.transports.amqp.properties",
    "brokerfl.transports.partial": "brokerfl.transports.amqp.partial",
    "brokerfl.transports.pika_body": "brokerfl.transports.amqp.pika_body",
    "brokerfl.worker": "brokerfl.runtime.worker",
}


class _MovedModuleLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

        self.new_spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.new_name)
        self.new_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # the import system has just set the old path's spec on the module: give its own back
        module.__spec__ = self.new_spec


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module path to its new module (see :data:`MOVED`)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        warnings.warn(
            f"{fullname} moved to {new_name}; import it from there (the old path goes in a later release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.machinery.ModuleSpec(fullname, _MovedModuleLoader(new_name))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
