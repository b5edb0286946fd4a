"""Cross-site evaluation (``cross_site_eval: true``): after the last round, every site's final
local model and the global model are evaluated on every site's data.

Two exchanges, each a broadcast and one answer per live client, each bounded by
``strategy.round_deadline_s`` (a site that does not answer is a missing row or column, not
a stalled run):

1. ``LocalModelRequest`` -> each client answers ``LocalModel``: the parameters of its last
   local training (its final local model; none if it never trained).
2. ``CrossSiteEvalTask`` carrying ``global`` and every ``site-<id>`` model -> each client
   evaluates them all on its data (the app's local test split, else its training
   partition) and answers ``CrossSiteEvalResult``.

The coordinator (the server of ``workflow: server`` or ``cyclic``, the aggregator role's
holder of ``swarm``) then writes
``cross_site.json`` and ``cross_site.png`` beside its metrics and finishes the run. Two
handler sets: :data:`COORDINATOR` (its ``prepare`` makes the evaluation follow the last
round) and :data:`CLIENT` (its answer to a finished training also keeps the local model: an
override of the client's ``Trained`` handler); :mod:`brokerfl.assembly.roles` adds them to a run's
tables when its config says ``cross_site_eval``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from brokerfl.handlers.workflows import client
from brokerfl.handlers.workflows.client import ClientState
from brokerfl.handlers.workflows.server_state import ServerState, finish_run, live_clients
from brokerfl.runtime.handler_table import Context, HandlerSet, Outbound, to_clients, to_server
from brokerfl.storage.cross_site_results import build_matrix, write_results
from brokerfl.wire.message import Message, ParameterUpdate, Tensors


@dataclass(kw_only=True)
class LocalModelRequest(Message):
    """Coordinator -> clients: send me your final local model."""

    participants: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class LocalModel(Message):
    """A client's final local model (empty if it never trained)."""

    client_id: str
    task_id: str
    parameters: Tensors = field(default_factory=dict)


@dataclass(kw_only=True)
class CrossSiteEvalTask(Message):
    """Evaluate every one of these models on your data."""

    models: dict[str, Tensors]
    participants: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class CrossSiteEvalResult(Message):
    client_id: str
    task_id: str
    scores: dict[str, dict[str, float]]  # model name -> loss, accuracy, num_samples


@dataclass(kw_only=True)
class CrossSiteDeadline(Message):
    """Local timer message: stop waiting for answers to the phase's request."""

    LOCAL = True
    phase: str


@dataclass
class CrossSitePhase:
    reason: str  # why the rounds ended, for finish_run
    phase: str = "collect"  # collect local models, then evaluate
    sites: list[str] = field(default_factory=list)
    local_models: dict[str, Tensors] = field(default_factory=dict)
    results: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    document: dict[str, Any] | None = None


def enable(state: ServerState) -> None:
    """Run cross-site evaluation after the last round of this coordinator."""
    state.after_rounds = start


def phase_of(state: ServerState) -> CrossSitePhase | None:
    return state.cross_site


COORDINATOR = HandlerSet("cross-site evaluation", needs=(ServerState,), prepare=enable)


def start(ctx: Context, reason: str) -> list[Outbound]:
    state: ServerState = ctx.state
    phase = CrossSitePhase(reason, sites=live_clients(state))
    state.cross_site = phase  # read by phase_of (simulate's result, tests)
    if not phase.sites:
        ctx.log.warning("cross-site evaluation: no live clients; skipped")
        return finish_run(ctx, reason)
    ctx.log.info("cross-site evaluation: collecting local models", sites=len(phase.sites))
    ctx.set_timer("cross_site", state.config.strategy.round_deadline_s, CrossSiteDeadline(phase="collect"))
    request = LocalModelRequest(round=state.round, model_version=state.model.version, participants=phase.sites)
    return [to_clients(request)]


@COORDINATOR.on(LocalModel)
def collect_local_model(message: LocalModel, ctx: Context):
    phase = phase_of(ctx.state)
    if phase is None or phase.phase != "collect" or message.client_id not in phase.sites:
        ctx.log.info("local model outside the collection; ignored", client=message.client_id)
        return None
    if message.parameters:
        phase.local_models[f"site-{message.client_id}"] = message.parameters
    phase.results.setdefault(message.client_id, {})  # answered (the dict is filled by phase 2)
    if len(phase.results) >= len(phase.sites):
        return _evaluate_everywhere(ctx)
    return None


def _evaluate_everywhere(ctx: Context) -> list[Outbound]:
    state: ServerState = ctx.state
    phase = phase_of(state)
    phase.phase, phase.results = "evaluate", {}
    ctx.log.info("cross-site evaluation: evaluating", models=1 + len(phase.local_models), sites=len(phase.sites))
    ctx.set_timer("cross_site", state.config.strategy.round_deadline_s, CrossSiteDeadline(phase="evaluate"))
    task = CrossSiteEvalTask(
        round=state.round,
        model_version=state.model.version,
        models={"global": state.model.parameters, **phase.local_models},
        participants=phase.sites,
    )
    return [to_clients(task)]


@COORDINATOR.on(CrossSiteEvalResult)
def collect_scores(message: CrossSiteEvalResult, ctx: Context):
    phase = phase_of(ctx.state)
    if phase is None or phase.phase != "evaluate" or message.client_id not in phase.sites:
        ctx.log.info("cross-site result outside the evaluation; ignored", client=message.client_id)
        return None
    phase.results[f"site-{message.client_id}"] = message.scores
    if len(phase.results) >= len(phase.sites):
        return _write_and_finish(ctx)
    return None


@COORDINATOR.on(CrossSiteDeadline)
def stop_waiting(message: CrossSiteDeadline, ctx: Context):
    phase = phase_of(ctx.state)
    if phase is None or phase.phase != message.phase:
        return None
    missing = sorted(set(phase.sites) - {k.removeprefix("site-") for k in phase.results})
    ctx.log.warning("cross-site evaluation: deadline; going on without", phase=message.phase, missing=missing)
    return _evaluate_everywhere(ctx) if message.phase == "collect" else _write_and_finish(ctx)


def _write_and_finish(ctx: Context) -> list[Outbound]:
    state: ServerState = ctx.state
    phase = phase_of(state)
    phase.phase = "done"
    ctx.cancel_timer("cross_site")
    phase.document = build_matrix(phase.results)
    if state.metrics.path is not None:
        json_path, png_path = write_results(phase.document, state.metrics.path.parent)
        ctx.log.info("cross-site evaluation written", json=str(json_path), heatmap=str(png_path))
    return finish_run(ctx, phase.reason)


# ---------------------------------------------------------------- the client's side

CLIENT = HandlerSet("cross-site evaluation (client)", needs=(ClientState,))


@CLIENT.overriding(client.Trained)
def answer_and_keep(message: client.Trained, ctx: Context[ClientState]):
    """Answer a task as the client always does, and keep the result: the final local model."""
    outbound = list(client.answer_task(message, ctx) or ())
    for item in outbound:
        if isinstance(item.message, ParameterUpdate):
            ctx.state.local_model = item.message.parameters  # read by send_local_model
    return outbound


@CLIENT.on(LocalModelRequest)
def send_local_model(request: LocalModelRequest, ctx: Context[ClientState]):
    state = ctx.state
    if request.participants and state.client_id not in request.participants:
        return None
    parameters = state.local_model or {}
    return [
        to_server(
            request.reply(LocalModel, client_id=state.client_id, task_id=request.message_id, parameters=parameters)
        )
    ]


@CLIENT.on(CrossSiteEvalTask)
def evaluate_every_model(task: CrossSiteEvalTask, ctx: Context[ClientState]):
    state = ctx.state
    if task.participants and state.client_id not in task.participants:
        return None
    data = state.data.test if state.data.test is not None else state.data.train
    scores = {}
    for name, parameters in task.models.items():
        result = state.app.evaluate(parameters, data)
        scores[name] = {
            "loss": float(result["loss"]),
            "accuracy": float(result["accuracy"]),
            "num_samples": float(result["num_samples"]),
        }
    return [
        to_server(task.reply(CrossSiteEvalResult, client_id=state.client_id, task_id=task.message_id, scores=scores))
    ]
