"""Short names for the built-in parts a config can name: ``app: mlp``, ``strategy: fedavg``,
``server_handlers: async_server``, ``extra_handlers: [gradients]``.

A config names a built-in by its short name, so that configs do not depend on where the
source of the built-ins lives. User code is named by its import path as before
(``myapp.app``, ``mypkg.strategies:Mine``). Each short name maps to the import path of
its module (``"pkg.mod"``) or class (``"pkg.mod:Class"``); nothing is imported here, so
naming a built-in costs nothing until it is used.

A built-in's old import path (``brokerfl.handlers.apps.mlp``) is still accepted, with a
DeprecationWarning that names the short name.

This module is a leaf: it imports nothing of brokerfl.
"""

from __future__ import annotations

import warnings

BUILTINS: dict[str, dict[str, str]] = {
    "app": {
        "mlp": "brokerfl.handlers.apps.mlp",
    },
    "strategy": {
        "fedavg": "brokerfl.handlers.strategies.fedavg:FedAvg",
        "median": "brokerfl.handlers.strategies.robust:Median",
        "trimmed_mean": "brokerfl.handlers.strategies.robust:TrimmedMean",
        "fedasync": "brokerfl.handlers.strategies.fedasync:FedAsync",
        "fedbuff": "brokerfl.handlers.strategies.fedbuff:FedBuff",
        "fedadam": "brokerfl.handlers.strategies.fedopt:FedAdam",
        "fedyogi": "brokerfl.handlers.strategies.fedopt:FedYogi",
        "fedadagrad": "brokerfl.handlers.strategies.fedopt:FedAdagrad",
        "fedavgm": "brokerfl.handlers.strategies.fedopt:FedAvgM",
        "krum": "brokerfl.handlers.strategies.krum:Krum",
        "multi_krum": "brokerfl.handlers.strategies.krum:MultiKrum",
        "bulyan": "brokerfl.handlers.strategies.krum:Bulyan",
        "norm_bounding": "brokerfl.handlers.strategies.clipping:NormBounding",
        "dp_fedavg": "brokerfl.handlers.strategies.dp:DPFedAvg",
        "cyclic": "brokerfl.handlers.strategies.handover:Handover",
    },
    "server_handlers": {
        "server": "brokerfl.handlers.workflows.server",
        "async_server": "brokerfl.handlers.workflows.async_server",
        "cyclic": "brokerfl.handlers.workflows.cyclic",
        "flower_server": "brokerfl.handlers.workflows.flower_server",
    },
    "client_handlers": {
        "client": "brokerfl.handlers.workflows.client",
        "flower_client": "brokerfl.handlers.workflows.flower_client",
    },
    "extra_handlers": {
        "gradients": "brokerfl.handlers.gradients",
    },
}


OLD_SPELLING = "is the old spelling of the built-in"
# shown to whoever runs a config with an old spelling, not only to developers (Python hides
# DeprecationWarnings raised outside __main__ by default)
warnings.filterwarnings("default", message=f".* {OLD_SPELLING} ", category=DeprecationWarning)


class UnknownBuiltin(ValueError):
    """A name that is neither a built-in's short name nor an import path."""


def short_name(kind: str, name: str) -> str:
    """How a config should spell ``name``: a built-in's short name stays, a built-in's old
    import path becomes its short name (with a DeprecationWarning), an import path of user
    code stays. Not a name at all (a strategy without ``:Class``, ``my-app``):
    :class:`UnknownBuiltin` listing the built-ins."""
    known = BUILTINS[kind]
    if name in known:
        return name
    for short, target in known.items():
        if name in (target, target.removeprefix("brokerfl.")):  # handlers.* from before it was brokerfl.handlers.*
            warnings.warn(
                f"{kind}: {name!r} {OLD_SPELLING} {short!r}; write {kind}: {short}", DeprecationWarning, stacklevel=3
            )
            return short
    if not _is_import_path(kind, name):
        example = "'module:Class'" if kind == "strategy" else "'package.module'"
        raise UnknownBuiltin(f"unknown {kind} {name!r}: use one of {sorted(known)} or your own {example}")
    return name


def resolve(kind: str, name: str) -> str:
    """The import path (``pkg.mod`` or ``pkg.mod:Class``) that ``name`` stands for."""
    return BUILTINS[kind].get(short_name(kind, name), name)


def _is_import_path(kind: str, name: str) -> bool:
    if kind == "strategy":
        module, _, attr = name.partition(":")
        return bool(module) and attr.isidentifier() and all(part.isidentifier() for part in module.split("."))
    return all(part.isidentifier() for part in name.split("."))  # a bare word may be a module of the working directory


def unknown_hint(kind: str, name: str) -> str:
    """For an import of ``name`` that failed: if it looks like a mistyped short name, the
    built-ins it could have meant."""
    if "." in name or ":" in name:
        return ""
    return f" (it is not a built-in {kind} either: those are {sorted(BUILTINS[kind])})"
