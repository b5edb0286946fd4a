"""Build a server or client worker from a config: a handler table plus its state.

A handler set is a module with ``table`` (a :class:`HandlerTable`) and ``make_state``.
The config names them (``server_handlers``, ``client_handlers``), and ``extra_handlers``
lists modules imported first so that they can register more handlers on those tables.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
import time
from collections.abc import Callable
from types import ModuleType

import structlog

from brokerfl import builtins, identity
from brokerfl.config import ConfigError, RunConfig
from brokerfl.message import Message, ServerStandby, to_wire
from brokerfl.metrics import MetricsLog
from brokerfl.model_refs import ModelCache, by_reference
from brokerfl.store import ModelStore
from brokerfl.topology import SERVER, RunTopology, routing_key
from brokerfl.transport import Transport, TransportError
from brokerfl.worker import Worker


CROSS_SITE_HANDLERS = "handlers.workflows.cross_site"
LEASE_POLL_S = 0.5  # how often a standby server asks for the role (one queue.declare each)
# A client holds the task it trains on (aside) unacked, and more messages must still reach
# it meanwhile: Exit, a newer task (it waits, held too), an evaluation. A bound all the same:
# each message delivered and not yet handled may hold a whole model.
CLIENT_PREFETCH = 4


def handler_set(config: RunConfig, key: str) -> ModuleType:
    for extra in config.extra_handlers:
        _import(builtins.resolve("extra_handlers", extra), "extra_handlers")
    if config.cross_site_eval:  # registers its handlers on the built-in tables
        _import(CROSS_SITE_HANDLERS, "cross_site_eval")
    name = getattr(config, key)
    if name is None:  # the strategy says which server handler set runs it (sync rounds or async)
        from handlers.strategies.base import strategy_class

        try:
            name = strategy_class(config.strategy.name).server_handlers
        except ValueError as exc:
            raise ConfigError(f"strategy.name: {exc}") from None
    module = _import(builtins.resolve(key, name), key)
    for attribute in ("table", "make_state"):
        if not hasattr(module, attribute):
            raise ConfigError(f"{key}: module {module.__name__!r} has no {attribute!r}")
    return module


def _import(name: str, key: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(f"{key}: cannot import {name!r}: {exc}") from None


def topology_for(config: RunConfig, *, journal: bool | None = None) -> RunTopology:
    return RunTopology(
        config.run,
        journal=config.journal if journal is None else journal,
        journal_max_bytes=config.journal_max_bytes,
        journal_max_age=config.journal_max_age,
        swarm=config.workflow == "swarm",
        replicated=config.replicated_queues,
    )


def server_worker(transport: Transport, config: RunConfig, store: ModelStore, metrics: MetricsLog, *, journal: bool | None = None) -> Worker:
    if journal is not None:  # handlers read config.journal (e.g. whether drop records have a taker)
        config = config.model_copy(update={"journal": journal})
    if config.workflow == "swarm":
        raise ConfigError("workflow swarm has no server process: every `brokerfl client` is a peer that can hold the aggregator role")
    topology = topology_for(config)
    topology.declare(transport)
    module = handler_set(config, "server_handlers")
    state = module.make_state(config, store, metrics)
    if hasattr(state, "admin"):  # the operator's changes survive a restart (brokerfl.admin)
        from brokerfl.admin import restore_admin_state

        state.admin = restore_admin_state(transport, topology)
        state.config = state.admin.applied_to(state.config)
    if config.cross_site_eval:
        _import(CROSS_SITE_HANDLERS, "cross_site_eval").enable(state)
    # every update of a round stays unacked until its model version is stored
    prefetch = max(2 * config.clients, 16)
    admit = identity.server_inbox_check(config.run, config.client_ids()) if config.identity.enforce else None
    return Worker(transport, topology, topology.server_queue, module.table, state, name="server", prefetch=prefetch, admit=admit)


def server_instance() -> str:
    """This server process, as its status and its standby announcements name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def take_server_role(transport: Transport, config: RunConfig, *, log=None, clock: Callable[[], float] = time.monotonic) -> float:
    """Wait, as a hot standby, until this process holds the run's server role; the seconds
    it waited.

    Decision: the broker decides who the server is. The role is a lease
    (:meth:`~brokerfl.transport.Transport.hold_lease`) that one connection holds at a time
    and that the broker releases the moment that connection dies. A second server started
    for a running run (a rolling update, a restarted container whose old one still runs)
    waits here, announcing itself to the active server's status, and takes over within a
    poll of the active one's death, resuming from the broker like any restarted server.
    Two servers never act at once: the one that loses its connection and finds the lease
    taken on reconnecting gets :class:`~brokerfl.transport.LeaseLost` and stops."""
    log = log or structlog.get_logger("brokerfl").bind(run=config.run, role="server")
    topology = topology_for(config)
    lease = topology.server_lease
    started, since = clock(), time.time()
    waiting = False
    announced = -math.inf
    while not transport.hold_lease(lease):
        if not waiting:
            log.warning("standby: another server holds this run's server role; this one takes over when it goes", instance=server_instance())
            waiting = True
        if clock() - announced >= config.liveness.heartbeat_s:
            announced = clock()
            envelope, body = to_wire(ServerStandby(sender=f"server@{server_instance()}", run=config.run, waiting_since=since))
            transport.publish(topology.exchange, routing_key(SERVER, ServerStandby.TYPE), envelope, body)
        transport.poll(LEASE_POLL_S)  # keeps the connection's heartbeats going
    waited = clock() - started
    if waiting:
        log.warning("server role taken: this server is now the active one", waited_s=round(waited, 2), instance=server_instance())
    return waited


def client_worker(transport: Transport, config: RunConfig, client_id: str, *, journal: bool | None = None, models: ModelCache | None = None) -> Worker:
    """``models``: the process's cache of versions fetched by reference, shared by all its
    logical clients (without one, a task that carries its model by reference is requeued)."""
    topology = topology_for(config, journal=journal)
    if config.identity.enforce:
        # provisioned: the definitions declared the run's exchange and every queue; a client
        # may configure nothing (not even its own queue's arguments), so it checks
        queue = topology.check_client(transport, client_id)
    else:
        topology.declare(transport)
        queue = topology.declare_client(transport, client_id)
    module = handler_set(config, "client_handlers")
    state = module.make_state(config, client_id)
    log = structlog.get_logger("brokerfl").bind(run=config.run, role=f"client.{client_id}", client=client_id)
    admit = identity.client_inbox_check(config.run) if config.identity.enforce else None
    if models is None and hasattr(transport, "broker"):  # in-process: a connection of its own is free
        from brokerfl.transports.local import LocalTransport

        models = ModelCache(LocalTransport(transport.broker, user=transport.user), topology)
    return Worker(transport, topology, queue, module.table, state, name=f"client.{client_id}", prefetch=CLIENT_PREFETCH, log=log, admit=admit, resolve=_model_resolver(models, client_id))


def _model_resolver(models: ModelCache | None, client_id: str) -> Callable[[Message], None]:
    """Fetch a task's model only for a client that will use it (sampled, or everyone's)."""

    def resolve(message: Message) -> None:
        if not by_reference(message):
            return
        participants = getattr(message, "participants", None)
        if participants and client_id not in participants:
            return
        if models is None:
            raise TransportError(f"{message.TYPE} carries its model by reference and this client has no connection to fetch it")
        models.resolve(message)

    return resolve


def client_process_worker(transport: Transport, config: RunConfig, clients: list[Worker]) -> Worker | None:
    """The worker that sends one Heartbeats message for all the logical clients of this
    process, if their handler set has one (``process_table``, ``make_process_state``) and
    it is needed: several clients, liveness on (a finite ``liveness.timeout_s``), and no
    identity enforcement (there each client is its own broker user and process). Else
    None: each client sends its own Heartbeat."""
    module = handler_set(config, "client_handlers")
    if len(clients) < 2 or config.identity.enforce or not math.isfinite(config.liveness.timeout_s):
        return None
    if not (hasattr(module, "process_table") and hasattr(module, "make_process_state")):
        return None
    state = module.make_process_state(config, [w.state for w in clients])
    return Worker(transport, topology_for(config), None, module.process_table, state, name=clients[0].name.rsplit(".", 1)[0] + "-process")
