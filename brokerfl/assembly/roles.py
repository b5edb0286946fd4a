"""Build a server or client worker from a config: a handler table composed for the run,
plus its state.

A run's tables are composed here, from its config alone (:func:`brokerfl.runtime.handler_table.compose`),
so a module imported for one run adds nothing to another run in the same process:

- the coordinator's (server, asynchronous server, cyclic; the swarm's aggregator): the
  workflow module's ``HANDLERS`` (``server_handlers``, by default the strategy's), secure
  aggregation's set when ``secure_aggregation`` (it overrides the rounds' handling of
  updates), the operator's set (``handlers/workflows/admin.py``), cross-site evaluation's coordinator
  set when ``cross_site_eval``, then every ``extra_handlers`` module's ``SERVER_HANDLERS``;
- each client's: the ``client_handlers`` module's ``HANDLERS``, secure aggregation's client
  set when ``secure_aggregation``, cross-site evaluation's
  client set when ``cross_site_eval``, then every ``extra_handlers`` module's
  ``CLIENT_HANDLERS``.

The rule for the modules a config names: a ``server_handlers`` or ``client_handlers``
module exports ``HANDLERS`` (a :class:`~brokerfl.runtime.handler_table.HandlerSet` or a tuple of
them, in order) and ``make_state``; a client module may also export ``PROCESS_HANDLERS``
and ``make_process_state`` (one heartbeat for a process's clients). An ``extra_handlers``
module exports ``CLIENT_HANDLERS`` and/or ``SERVER_HANDLERS`` (a set or a tuple of sets).
A set that handles a type another set of the table handles must say it ``overrides`` it.
Each set's ``needs`` are checked against the run's state, and its ``prepare`` is applied
to it.

Deprecated, still working with a DeprecationWarning: an ``extra_handlers`` module that
registers on ``brokerfl.handlers.workflows.client.table`` or ``brokerfl.handlers.workflows.server.table`` at
import (its registrations go to the runs that name it, no others), and a workflow module
with a ``table`` instead of ``HANDLERS``.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import structlog

from brokerfl.config import ConfigError, RunConfig, builtins
from brokerfl.runtime import identity
from brokerfl.runtime.handler_table import HandlerSet, HandlerTable, LegacyTable, compose
from brokerfl.runtime.log import warnings_only_logger
from brokerfl.runtime.worker import Worker
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.model_refs import ModelCache, by_reference
from brokerfl.storage.store import ModelStore
from brokerfl.transports.base import Transport, TransportError
from brokerfl.transports.topology import SERVER, RunTopology, routing_key
from brokerfl.wire.message import MESSAGE_TYPES, Message, ServerStandby, to_wire

SWARM_HANDLERS = "brokerfl.handlers.workflows.swarm"
FLOWER_HANDLERS = {"server_handlers": "flower_server", "client_handlers": "flower_client"}
LEASE_POLL_S = 0.5  # how often a standby server asks for the role (one queue.declare each)
# A client holds the task it trains on (aside) unacked, and more messages must still reach
# it meanwhile: Exit, a newer task (it waits, held too), an evaluation. A bound all the same:
# each message delivered and not yet handled may hold a whole model.
CLIENT_PREFETCH = 4


def workflow_module(config: RunConfig, key: str) -> ModuleType:
    """The module ``server_handlers`` or ``client_handlers`` names (the swarm's aggregator:
    ``brokerfl.handlers.workflows.swarm``), checked for what it must export."""
    name = SWARM_HANDLERS if key == "server_handlers" and config.workflow == "swarm" else getattr(config, key)
    if config.flower_app is not None and key not in config.model_fields_set:  # a Flower app's own sets
        name = FLOWER_HANDLERS[key]
    if name is None:  # the strategy says which server handler set runs it (sync rounds or async)
        from brokerfl.handlers.strategies.base import strategy_class

        try:
            name = strategy_class(config.strategy.name).server_handlers
        except ValueError as exc:
            raise ConfigError(f"strategy.name: {exc}") from None
    module = _import(builtins.resolve(key, name), key)
    if not hasattr(module, "make_state"):
        raise ConfigError(f"{key}: module {module.__name__!r} has no 'make_state'")
    if not hasattr(module, "HANDLERS") and not isinstance(getattr(module, "table", None), HandlerTable):
        raise ConfigError(f"{key}: module {module.__name__!r} has no 'HANDLERS' (a HandlerSet, or a tuple of them)")
    return module


def _import(name: str, key: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {name!r}: {exc}") from None


def _sets(value: Any, where: str) -> list[HandlerSet]:
    sets = [value] if isinstance(value, HandlerSet) else list(value)
    for item in sets:
        if not isinstance(item, HandlerSet):
            raise ConfigError(f"{where}: {item!r} is not a HandlerSet")
    return sets


def workflow_sets(module: ModuleType, key: str) -> list[HandlerSet]:
    if hasattr(module, "HANDLERS"):
        return _sets(module.HANDLERS, f"{key}: {module.__name__}.HANDLERS")
    warnings.warn(
        f"{key}: module {module.__name__!r} has a 'table' and no 'HANDLERS': export its handlers as HANDLERS = "
        "HandlerSet(...) "
        "(see brokerfl.assembly.roles); a module-level table will stop being read",
        DeprecationWarning,
        stacklevel=3,
    )
    table: HandlerTable = module.table
    return [
        HandlerSet(
            f"{module.__name__} (old style)",
            {MESSAGE_TYPES[t]: h for t in table.types() if (h := table.handler_for(t)) is not None},
        )
    ]


def extra_sets(config: RunConfig, role: str, before: list[HandlerSet]) -> list[HandlerSet]:
    """The ``extra_handlers`` modules' sets for ``role`` ("server" or "client"), to compose
    after the sets ``before``."""
    attribute = f"{role.upper()}_HANDLERS"
    sets: list[HandlerSet] = []
    for name in config.extra_handlers:
        module = _import(builtins.resolve("extra_handlers", name), "extra_handlers")
        if hasattr(module, "CLIENT_HANDLERS") or hasattr(module, "SERVER_HANDLERS"):
            sets += _sets(getattr(module, attribute, ()), f"extra_handlers: {name}.{attribute}")
            continue
        legacy = _legacy_tables()[role]
        old = legacy.set_of(module.__name__, [t for s in [*before, *sets] for t in s.types()])
        if old is not None:
            warnings.warn(
                f"extra_handlers: module {name!r} registers on {legacy.role} table at import: export CLIENT_HANDLERS "
                "or SERVER_HANDLERS = HandlerSet(...) "
                "instead (see brokerfl.assembly.roles and handlers/gradients.py); registering on a module-level table "
                "will stop working",
                DeprecationWarning,
                stacklevel=2,
            )
            sets.append(old)
    return sets


def _legacy_tables() -> dict[str, LegacyTable]:
    from brokerfl.handlers.workflows import client, server

    return {"client": client.table, "server": server.table}


def coordinator_table(config: RunConfig, module: ModuleType | None = None) -> HandlerTable:
    """The coordinator's table of this run (``module``: its workflow module, by default the
    config's)."""
    from brokerfl.handlers.workflows import admin

    module = module or workflow_module(config, "server_handlers")
    # a workflow whose state is not the rounds' (a Flower ServerApp's) brings its own operator set
    operator = getattr(module, "OPERATOR", admin.OPERATOR)
    if config.workflow == "swarm":  # like every server handler of the aggregator: it takes the role first
        from brokerfl.handlers.workflows.swarm import take_role_first

        operator = operator.wrapped(take_role_first)
    sets = [*workflow_sets(module, "server_handlers"), operator]
    if config.secure_aggregation is not None:  # after the rounds' set, whose handlers it overrides
        from brokerfl.handlers.workflows import secure_server

        sets.insert(len(sets) - 1, secure_server.SERVER)
    if config.cross_site_eval:
        from brokerfl.handlers.workflows import cross_site

        sets.append(cross_site.COORDINATOR)
    return _composed(
        "aggregator" if config.workflow == "swarm" else "server", sets + extra_sets(config, "server", sets)
    )


def client_table(config: RunConfig, module: ModuleType | None = None) -> HandlerTable:
    """A client's table of this run."""
    module = module or workflow_module(config, "client_handlers")
    sets = workflow_sets(module, "client_handlers")
    if config.secure_aggregation is not None:
        from brokerfl.handlers.workflows import secure_client

        sets.append(secure_client.CLIENT)
    if config.cross_site_eval:
        from brokerfl.handlers.workflows import cross_site

        sets.append(cross_site.CLIENT)
    return _composed("client", sets + extra_sets(config, "client", sets))


def _composed(role: str, sets: list[HandlerSet]) -> HandlerTable:
    try:
        return compose(role, *sets)
    except ValueError as exc:  # DuplicateHandler: two sets the config names handle one type
        raise ConfigError(f"handler sets of the {role}: {exc}") from None


def prepared(table: HandlerTable, state: Any) -> Any:
    """``state``, checked against what each set of ``table`` needs and prepared by them."""
    for handler_set in table.sets:
        try:
            handler_set.check_state(state)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        if handler_set.prepare is not None:
            handler_set.prepare(state)
    return state


def topology_for(config: RunConfig, *, journal: bool | None = None) -> RunTopology:
    return RunTopology(
        config.run,
        journal=config.journal if journal is None else journal,
        journal_max_bytes=config.journal_max_bytes,
        journal_max_age=config.journal_max_age,
        swarm=config.workflow == "swarm",
        replicated=config.replicated_queues,
        declares_registry=not config.identity.enforce,
    )


def server_worker(
    transport: Transport, config: RunConfig, store: ModelStore, metrics: MetricsLog, *, journal: bool | None = None
) -> Worker:
    if journal is not None:  # handlers read config.journal (e.g. whether drop records have a taker)
        config = config.model_copy(update={"journal": journal})
    if config.workflow == "swarm":
        raise ConfigError(
            "workflow swarm has no server process: every `brokerfl client` is a peer that can hold the aggregator role"
        )
    topology = topology_for(config)
    topology.declare(transport)
    module = workflow_module(config, "server_handlers")
    if getattr(module, "SENDS_BEFORE_CLIENTS_JOIN", False) and not config.identity.enforce:
        # its first messages may go to clients not started yet: their queues must hold them
        # (a provisioned run's definitions declared them already)
        for client_id in config.client_ids():
            topology.declare_client(transport, client_id)
    table = coordinator_table(config, module)
    state = prepared(table, module.make_state(config, store, metrics))
    # the operator's changes survive a restart (brokerfl.runtime.operator_commands)
    from brokerfl.runtime.operator_commands import restore_admin_state

    state.admin = restore_admin_state(transport, topology)
    state.config = state.admin.applied_to(state.config)
    if hasattr(module, "resume_from_journal") and topology.journal:  # a workflow that resumes from the journal
        from brokerfl.storage.journal import read_journal
        from brokerfl.wire.message import MESSAGE_TYPES

        module.resume_from_journal(state, _journaled_messages(read_journal(transport, topology), MESSAGE_TYPES))
    # every update of a round stays unacked until its model version is stored
    prefetch = max(2 * config.clients, 16)
    admit = identity.server_inbox_check(config.run, config.client_ids()) if config.identity.enforce else None
    return Worker(
        transport, topology, topology.server_queue, table, state, name="server", prefetch=prefetch, admit=admit
    )


def _journaled_messages(deliveries, types) -> Iterator[Message]:
    """The decodable messages of a journal read, one at a time (what cannot be read was
    dead-lettered and recorded when it came; a resuming workflow skips it)."""
    from brokerfl.wire.codec import DecodeError
    from brokerfl.wire.message import from_wire

    for delivery in deliveries:
        if delivery.problem or delivery.envelope.type not in types:
            continue
        try:
            yield from_wire(delivery.envelope, delivery.body)
        except DecodeError:
            continue


def server_instance() -> str:
    """This server process, as its status and its standby announcements name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def take_server_role(
    transport: Transport, config: RunConfig, *, log=None, clock: Callable[[], float] = time.monotonic
) -> float:
    """Wait, as a hot standby, until this process holds the run's server role; the seconds
    it waited.

    Decision: the broker decides who the server is. The role is a lease
    (:meth:`~brokerfl.transports.base.Transport.hold_lease`) that one connection holds at a time
    and that the broker releases the moment that connection dies. A second server started
    for a running run (a rolling update, a restarted container whose old one still runs)
    waits here, announcing itself to the active server's status, and takes over within a
    poll of the active one's death, resuming from the broker like any restarted server.
    Two servers never act at once: the one that loses its connection and finds the lease
    taken on reconnecting gets :class:`~brokerfl.transports.base.LeaseLost` and stops."""
    log = log or structlog.get_logger("brokerfl").bind(run=config.run, role="server")
    topology = topology_for(config)
    lease = topology.server_lease
    started, since = clock(), time.time()
    waiting = False
    announced = -math.inf
    while not transport.hold_lease(lease):
        if not waiting:
            log.warning(
                "standby: another server holds this run's server role; this one takes over when it goes",
                instance=server_instance(),
            )
            waiting = True
        if clock() - announced >= config.liveness.heartbeat_s:
            announced = clock()
            envelope, body = to_wire(
                ServerStandby(sender=f"server@{server_instance()}", run=config.run, waiting_since=since)
            )
            transport.publish(topology.exchange, routing_key(SERVER, ServerStandby.TYPE), envelope, body)
        transport.poll(LEASE_POLL_S)  # keeps the connection's heartbeats going
    waited = clock() - started
    if waiting:
        log.warning(
            "server role taken: this server is now the active one",
            waited_s=round(waited, 2),
            instance=server_instance(),
        )
    return waited


# A client process that hosts more logical clients than this logs each one's lifecycle lines
# (task received, training, update sent, ...) only at --log-level debug: at info they would be
# four lines a round per client, thousands a round for a process of thousands.
PER_CLIENT_LINES_MAX = 10


def client_worker(
    transport: Transport,
    config: RunConfig,
    client_id: str,
    *,
    journal: bool | None = None,
    models: ModelCache | None = None,
    warnings_only: bool = False,
    declare_run: bool = True,
) -> Worker:
    """``models``: the process's cache of versions fetched by reference, shared by all its
    logical clients (without one, a task that carries its model by reference is requeued).
    ``warnings_only``: this client's log has its warnings and errors only (a process that
    hosts many logical clients: :data:`PER_CLIENT_LINES_MAX`). ``declare_run``: declare the
    run's exchanges and queues too (unprovisioned runs; a process of many logical clients
    declares them once, not once per client)."""
    topology = topology_for(config, journal=journal)
    if config.identity.enforce:
        # provisioned: the definitions declared the run's exchange and every queue; a client
        # may configure nothing (not even its own queue's arguments), so it checks
        queue = topology.check_client(transport, client_id)
    else:
        if declare_run:
            topology.declare(transport)
        queue = topology.declare_client(transport, client_id)
    module = workflow_module(config, "client_handlers")
    table = client_table(config, module)
    state = prepared(table, module.make_state(config, client_id))
    bound = {"run": config.run, "role": f"client.{client_id}", "client": client_id}
    log = warnings_only_logger(**bound) if warnings_only else structlog.get_logger("brokerfl").bind(**bound)
    admit = identity.client_inbox_check(config.run) if config.identity.enforce else None
    if models is None and hasattr(transport, "broker"):  # in-process: a connection of its own is free
        from brokerfl.transports.local import LocalTransport

        models = ModelCache(LocalTransport(transport.broker, user=transport.user), topology)
    return Worker(
        transport,
        topology,
        queue,
        table,
        state,
        name=f"client.{client_id}",
        prefetch=CLIENT_PREFETCH,
        log=log,
        admit=admit,
        resolve=_model_resolver(models, client_id),
    )


def _model_resolver(models: ModelCache | None, client_id: str) -> Callable[[Message], None]:
    """Fetch a task's model only for a client that will use it (sampled, or everyone's)."""

    def resolve(message: Message) -> None:
        if not by_reference(message):
            return
        participants = getattr(message, "participants", None)
        if participants and client_id not in participants:
            return
        if models is None:
            raise TransportError(
                f"{message.TYPE} carries its model by reference and this client has no connection to fetch it"
            )
        models.resolve(message)

    return resolve


def client_process_worker(transport: Transport, config: RunConfig, clients: list[Worker]) -> Worker | None:
    """The worker that sends one Heartbeats message for all the logical clients of this
    process, if their client module has one (``PROCESS_HANDLERS``, ``make_process_state``) and
    it is needed: several clients, liveness on (a finite ``liveness.timeout_s``), and no
    identity enforcement (there each client is its own broker user and process). Else
    None: each client sends its own Heartbeat."""
    module = workflow_module(config, "client_handlers")
    if len(clients) < 2 or config.identity.enforce or not math.isfinite(config.liveness.timeout_s):
        return None
    if not (hasattr(module, "PROCESS_HANDLERS") and hasattr(module, "make_process_state")):
        return None
    table = _composed(
        "client-process", _sets(module.PROCESS_HANDLERS, f"client_handlers: {module.__name__}.PROCESS_HANDLERS")
    )
    state = prepared(table, module.make_process_state(config, [w.state for w in clients]))
    return Worker(
        transport, topology_for(config), None, table, state, name=clients[0].name.rsplit(".", 1)[0] + "-process"
    )
