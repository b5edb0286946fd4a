"""Swarm learning (``workflow: swarm``): no server process; the aggregator is a role.

Every client process also runs an *aggregator candidate*: a consumer of the run's
aggregation queue (``brokerfl.<run>.server``, declared with RabbitMQ's
``x-single-active-consumer``). The broker delivers to one of them only; that one holds
the role. It runs the server's lifecycle and synchronous rounds
(``handlers/workflows/lifecycle.py``, ``handlers/workflows/server.py``: sampling, folding,
storing, the next round), each handler behind :func:`take_role_first`, with three
differences:

- **Activation.** A candidate does nothing until its first delivery (AMQP tells a
  consumer no "you are active now"): then it reads every stored version from the run's
  models stream (:class:`brokerfl.storage.broker_store.BrokerModelStore`), and either initialises
  the run (version 0, wait for the joins) or continues it: the federation is the config's
  clients, and round ``latest.round + 1`` starts again at once. A killed aggregator's
  unacked updates come back to the new one (redelivered) and are folded into that round,
  or dropped as duplicates when their version was already stored: nothing is lost or
  counted twice. Clients that had answered get the round's task again and their second
  answer is dropped with a recorded reason (work repeated, never counted).
- **Closing a round early.** Once ``swarm.min_responses_required`` updates are folded,
  the round waits ``swarm.wait_after_min_s`` more for the rest, then closes.
- **The best model.** A :class:`MetricComparator` on ``swarm.best_metric`` picks the best
  stored version (recomputed from the stored versions' metrics, so a new aggregator knows it
  too); it is written to ``best_model.json`` when the rounds are done.
- **Cross-site evaluation** (``cross_site_eval: true``): after the last round the role's
  holder runs ``handlers/workflows/cross_site.py``'s two exchanges, as a server would, and
  writes the matrix beside its metrics; the run then finishes (:mod:`brokerfl.assembly.roles` adds
  that set, and its ``after_rounds`` follows this module's ``on_rounds_done``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from brokerfl.config import RunConfig
from brokerfl.handlers.workflows import lifecycle, server, server_state
from brokerfl.handlers.workflows.server_state import ServerState, close_round, see_client, start_round
from brokerfl.runtime.handler_table import Context, Handler, HandlerSet, Started
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.store import ModelStore
from brokerfl.wire.message import Message, ParameterUpdate


@dataclass(kw_only=True)
class WaitAfterMinimum(Message):
    """Local timer message: the round had its minimum of answers this long ago."""

    LOCAL = True


@dataclass(frozen=True)
class MetricComparator:
    """Which of two validation scores is better (NVFlare's MetricComparator)."""

    metric: str = "accuracy"
    mode: str = "max"

    def better(self, candidate: float | None, best: float | None) -> bool:
        if candidate is None:
            return False
        if best is None:
            return True
        return candidate > best if self.mode == "max" else candidate < best

    def best_version(self, store: ModelStore) -> tuple[int, float] | None:
        best: tuple[int, float] | None = None
        for version in store.versions():
            value = store.metadata(version).get("metrics", {}).get(self.metric)
            if version > 0 and self.better(value, best[1] if best else None):
                best = (version, value)
        return best


@dataclass
class SwarmState(ServerState):
    active: bool = False  # this candidate has received a delivery: it holds the role
    waiting_round: int = -1  # the round whose wait after the minimum is running
    comparator: MetricComparator = dataclasses.field(default_factory=MetricComparator)


def make_state(config: RunConfig, store: ModelStore, metrics: MetricsLog) -> SwarmState:
    base = server_state.make_state(config, store, metrics)
    state = SwarmState(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    state.comparator = MetricComparator(config.swarm.best_metric, config.swarm.best_mode)
    state.scores_in_store = True  # best_version reads the scores from the stored versions
    state.on_rounds_done.append(note_best)
    return state


SWARM = HandlerSet("swarm aggregator", needs=(SwarmState,))


@SWARM.overriding(Started)
def stand_by(message: Started, ctx: Context):
    ctx.log.info("aggregator candidate standing by")


def activate(ctx: Context) -> None:
    """The first delivery: this process now holds the aggregator role."""
    state: SwarmState = ctx.state
    state.active = True
    refresh = getattr(state.store, "refresh", None)
    if refresh is not None:
        refresh()
    taking_over = bool(state.store.versions())
    lifecycle.resume_or_initialise(Started(run=ctx.run), ctx)  # version 0 or the newest stored, the join timer
    ctx.log.info("aggregator role taken", model_version=state.model.version, round=state.round, taking_over=taking_over)
    if taking_over and not state.done:
        # the federation began long ago: every configured client is a member, and the
        # round the last holder did not store starts again now
        for client_id in state.config.client_ids():
            if client_id not in state.clients:
                see_client(state, client_id, None)  # its partition size not known until its next heartbeat
        ctx.cancel_timer("join")
        state.begun = True
        ctx.send(*(start_round(ctx) or []))


def take_role_first(handler: Handler) -> Handler:
    """The wrapper of every server handler an aggregator candidate runs: its first delivery
    makes it the role's holder (:func:`activate`) before the handler runs."""

    def wrapped(message, ctx: Context[SwarmState]):
        if not ctx.state.active:
            activate(ctx)
        return handler(message, ctx)

    wrapped.__qualname__ = getattr(handler, "__qualname__", "handler")
    return wrapped


@SWARM.overriding(ParameterUpdate)
@take_role_first
def fold_and_maybe_wait(update: ParameterUpdate, ctx: Context):
    state: SwarmState = ctx.state
    outbound = server.fold_update(update, ctx)
    minimum = state.config.swarm.min_responses_required
    if (
        state.round_open
        and minimum is not None
        and len(state.folded) >= min(minimum, len(state.participants))
        and state.waiting_round != state.round
    ):
        state.waiting_round = state.round
        ctx.set_timer("after_min", state.config.swarm.wait_after_min_s, WaitAfterMinimum(round=state.round))
    return outbound


@SWARM.on(WaitAfterMinimum)
def close_after_wait(message: WaitAfterMinimum, ctx: Context):
    state: SwarmState = ctx.state
    if state.round_open and message.round == state.round:
        ctx.log.info(
            "closing the round after the wait past its minimum", folded=len(state.folded), of=len(state.participants)
        )
        return close_round(ctx)
    return None


def note_best(ctx: Context[SwarmState]) -> None:
    """Log the best stored version and write it to ``best_model.json``."""
    state: SwarmState = ctx.state
    best = state.comparator.best_version(state.store)
    if best is not None:
        version, value = best
        ctx.log.info("best global model", model_version=version, metric=state.comparator.metric, value=round(value, 4))
        if state.metrics.path is not None:
            (state.metrics.path.parent / "best_model.json").write_text(
                json.dumps(
                    {
                        "model_version": version,
                        "metric": state.comparator.metric,
                        "mode": state.comparator.mode,
                        "value": value,
                        "sha256": state.store.metadata(version)["sha256"],
                    }
                )
            )


# what the aggregator's run composes: the server's lifecycle and rounds, each taking the
# role first, and this set (which replaces their Started and ParameterUpdate handlers);
# brokerfl.assembly.roles adds the operator's set, also behind take_role_first
HANDLERS = (lifecycle.LIFECYCLE.wrapped(take_role_first), server.ROUNDS.wrapped(take_role_first), SWARM)
