"""A poisoning client, for tests and benchmarks (never a product handler set): the client
ids in ``BROKERFL_ATTACKERS`` (default ``0``) train honestly, then replace what they send
by ``BROKERFL_ATTACK`` (default ``sign_flip``), one of :data:`ATTACKS`; every other client
is the ordinary one. A client id is all it may speak for: it joins with its real partition
(its Join and Heartbeats are the ordinary client's), and lies only in its updates.

    client_handlers: tests.tools.hostile.poisoning

The settings are read when each update is sent, so a test sets them with its environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brokerfl.handlers.workflows import client
from brokerfl.handlers.workflows.client import make_state  # noqa: F401 - a client_handlers module has HANDLERS and make_state
from brokerfl.runtime.handler_table import HandlerSet
from brokerfl.wire.message import ParameterUpdate

Tensors = dict[str, np.ndarray]
CLAIM = 1_000_000  # the sample count the claiming attacks report: the default strategy.max_num_samples


def _floating(global_parameters: Tensors, make: Callable[[str, np.ndarray], np.ndarray]) -> Tensors:
    """``make(name, tensor)`` for every floating tensor of the global model, in its dtype;
    integer tensors (BatchNorm's counters) as they are."""
    return {
        name: (make(name, g) if np.issubdtype(g.dtype, np.floating) else g.copy()).astype(g.dtype)
        for name, g in global_parameters.items()
    }


def sign_flipped(parameters: Tensors, global_parameters: Tensors, scale: float) -> Tensors:
    """global - scale * (parameters - global): the honest step, reversed and scaled."""
    return _floating(global_parameters, lambda name, g: g - scale * (np.asarray(parameters[name], np.float64) - g))


# attack -> (parameters, global parameters, scale, rng) -> (parameters sent, num_samples claimed or None: the honest
# count)
ATTACKS: dict[str, Callable[[Tensors, Tensors, float, np.random.Generator], tuple[Tensors, int | None]]] = {
    "sign_flip": lambda p, g, scale, rng: (sign_flipped(p, g, scale), None),
    "nan": lambda p, g, scale, rng: (_floating(g, lambda name, t: np.full(t.shape, np.nan)), None),
    "huge": lambda p, g, scale, rng: (_floating(g, lambda name, t: np.full(t.shape, 1e30)), None),  # finite in float32
    "noise_claim": lambda p, g, scale, rng: (
        _floating(g, lambda name, t: rng.normal(size=t.shape)),
        CLAIM,
    ),  # noise, weighted by a million samples
    "claim": lambda p, g, scale, rng: (p, CLAIM),  # the honest update, claiming a million samples
}

POISONING = HandlerSet("poisoning")


@POISONING.overriding(client.Trained)
def answer_poisoned(message: client.Trained, ctx):
    training = ctx.state.training
    global_parameters = training.task.parameters if training is not None else {}
    sent = client.answer_task(message, ctx)
    attackers = set(os.environ.get("BROKERFL_ATTACKERS", "0").split(","))
    if not sent or ctx.state.client_id not in attackers:
        return sent
    attack = ATTACKS[os.environ.get("BROKERFL_ATTACK", "sign_flip")]
    scale = float(os.environ.get("BROKERFL_ATTACK_SCALE", "10"))
    for outbound in sent:
        update = outbound.message
        if isinstance(update, ParameterUpdate):
            rng = np.random.default_rng(
                [update.round, int(ctx.state.client_id) if ctx.state.client_id.isdigit() else 0]
            )
            update.parameters, claimed = attack(dict(update.parameters), global_parameters, scale, rng)
            if claimed is not None:
                update.num_samples = claimed
    return sent


HANDLERS = (*client.HANDLERS, POISONING)


@dataclass
class PoisonedRun:
    """What :func:`simulated_run` saw."""

    records: list[dict]  # the metrics lines
    stopped: str  # why the run stopped early ("": it did not)
    dead: dict[str, list[str]]  # update id -> the reasons it was dead-lettered with (from the journal)
    dropped: dict[str, list[str]]  # update id -> the reasons of its UpdateDropped records
    attackers_updates: list[str]  # ids of the updates the attackers sent
    folded: set[str]  # ids of the updates in stored model versions

    @property
    def accuracy(self) -> float:
        return self.records[-1]["accuracy"] if self.records else float("nan")


def simulated_run(
    config: dict, attack: str | None, out: Path, *, attackers: str = "0", scale: float = 10.0
) -> PoisonedRun:
    """``config`` (a run config's mapping) simulated in this process with ``attackers``
    sending ``attack`` (None: every client honest), then its journal accounted."""
    from brokerfl.assembly.roles import topology_for
    from brokerfl.assembly.simulate import SimulationError, simulate
    from brokerfl.config import parse_config
    from brokerfl.storage.accounting import account_run
    from brokerfl.storage.metrics_log import read_metrics
    from brokerfl.transports.local import LocalBroker, LocalTransport

    run_config = parse_config(
        {**config, "client_handlers": "client" if attack is None else "tests.tools.hostile.poisoning"}
    )
    settings = {"BROKERFL_ATTACK": attack or "", "BROKERFL_ATTACKERS": attackers, "BROKERFL_ATTACK_SCALE": str(scale)}
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    broker = LocalBroker()
    stopped = ""
    try:
        result = simulate(run_config, out, broker=broker, journal=True)
        store = result.store
    except SimulationError as exc:
        stopped, store = str(exc), None
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    metrics = out / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    if store is None:
        return PoisonedRun(records, stopped, {}, {}, [], set())
    report = account_run(LocalTransport(broker), topology_for(run_config), store)
    ids = set(attackers.split(","))
    return PoisonedRun(
        records,
        stopped,
        dict(report.dead),
        dict(report.dropped),
        [uid for uid, client in report.sent.items() if client.removeprefix("client.") in ids],
        set(report.folded_into),
    )
