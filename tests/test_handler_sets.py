"""Handler sets composed per run: a run's tables hold what its config names, and nothing a
module imported for another run registered."""

from __future__ import annotations

import numpy as np
import pytest

from brokerfl.assembly.roles import client_table, client_worker, coordinator_table, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import ConfigError, load_config
from brokerfl.handlers.workflows import client
from brokerfl.runtime.handler_table import (
    Context,
    DuplicateHandler,
    HandlerSet,
    Started,
    compose,
    to_clients,
)
from brokerfl.transports.base import REASON_HEADER
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import (
    EvaluateResult,
    Exit,
    Gradients,
    Heartbeat,
    Join,
    TrainTask,
    from_wire,
)
from tests.handler_modules import extra_handlers

SMALL = {"rounds": 2, "clients": 3, "train.epochs": 1, "train.max_batches": 5}


def joined(message, ctx):
    return None


def left(message, ctx):
    return None


# ---------------------------------------------------------------- composing


def test_one_type_in_two_sets_without_an_override_is_an_error_naming_both():
    first, second = HandlerSet("first", {Join: joined}), HandlerSet("second", {Join: left, Exit: left})
    with pytest.raises(DuplicateHandler, match=r"'join' is handled by handler set 'first' and by 'second'"):
        compose("server", first, second)


def test_an_explicit_override_replaces_the_earlier_sets_handler():
    first = HandlerSet("first", {Join: joined, Heartbeat: joined})
    second = HandlerSet("second", {Exit: left}, overrides={Join: left})
    table = compose("server", first, second)
    assert (
        table.handler_for("join") is left
        and table.handler_for("heartbeat") is joined
        and table.handler_for("exit") is left
    )
    assert table.sets == (first, second)
    assert first.handlers[Join] is joined  # the sets themselves are unchanged


def test_an_override_of_a_type_no_earlier_set_handles_is_an_error():
    with pytest.raises(DuplicateHandler, match=r"'second' overrides 'join', which no set before it"):
        compose("server", HandlerSet("first", {Exit: left}), HandlerSet("second", overrides={Join: left}))


def test_one_set_cannot_handle_a_type_twice():
    handlers = HandlerSet("twice", {Join: joined})
    with pytest.raises(DuplicateHandler, match="handles 'join' twice"):
        handlers.on(Join)(left)


def test_a_wrapped_set_runs_each_handler_behind_the_wrapper_and_leaves_the_original_alone():
    calls = []

    def noted(handler):
        def wrapped(message, ctx):
            calls.append(message.TYPE)
            return handler(message, ctx)

        return wrapped

    original = HandlerSet("plain", {Join: joined}, overrides={Exit: left})
    wrapped = original.wrapped(noted)
    table = compose("server", HandlerSet("base", {Exit: joined}), wrapped)
    table.handler_for("join")(Join(client_id="0"), None)
    table.handler_for("exit")(Exit(), None)
    assert calls == ["join", "exit"] and wrapped.name == "plain (noted)"
    assert original.handlers[Join] is joined and table.handler_for("join").__qualname__ == joined.__qualname__


def test_a_set_states_the_state_it_needs():
    from brokerfl.handlers.workflows.admin import OPERATOR

    with pytest.raises(TypeError, match="handler set 'operator' needs a state of type ServerState"):
        OPERATOR.check_state(object())


def test_two_extra_modules_handling_one_type_are_a_config_error(monkeypatch):
    def gradients_too(message, ctx):
        return None

    other = extra_handlers(monkeypatch, client=HandlerSet("other gradients", {Gradients: gradients_too}))
    config = load_config(None, {"clients": 2, "extra_handlers": ["brokerfl.handlers.gradients", other]})
    with pytest.raises(
        ConfigError, match=r"'gradients' is handled by handler set 'gradients' and by 'other gradients'"
    ):
        client_table(config)


def test_each_workflow_composes_its_sets_and_the_operators():
    fedavg = coordinator_table(load_config(None, {"clients": 2}))
    assert [s.name for s in fedavg.sets] == ["server lifecycle", "synchronous rounds", "operator"]
    fedbuff = coordinator_table(load_config("configs/digits_fedbuff.yaml", {}))
    assert [s.name for s in fedbuff.sets] == ["server lifecycle", "asynchronous updates", "operator"]
    assert fedbuff.handler_for("round_deadline") is None and fedbuff.handler_for("abort_run") is not None
    cyclic = coordinator_table(load_config("configs/digits_cyclic.yaml", {"cross_site_eval": True}))
    assert [s.name for s in cyclic.sets] == ["server lifecycle", "cyclic hops", "operator", "cross-site evaluation"]
    swarm = coordinator_table(load_config("configs/digits_swarm.yaml", {}))
    assert [s.name for s in swarm.sets] == [
        "server lifecycle (take_role_first)",
        "synchronous rounds (take_role_first)",
        "swarm aggregator",
        "operator (take_role_first)",
    ]
    assert swarm.role == "aggregator" and swarm.handler_for("local_model") is None
    crossing = client_table(load_config("configs/digits_cross_site.yaml", {}))
    assert (
        crossing.handler_for("trained").__module__ == "brokerfl.handlers.workflows.cross_site"
    )  # its override, stated in its set
    assert client_table(load_config(None, {})).handler_for("trained") is client.answer_task


# ---------------------------------------------------------------- one process, several runs


def _answers_gradients(config) -> list[str]:
    """What a client of ``config`` does with a Gradients message after a task: the types it
    sends to the server, or the dead-letter reason."""
    broker = LocalBroker()
    admin = LocalTransport(broker)
    worker = client_worker(LocalTransport(broker), config, "0", journal=False)
    topology = topology_for(config, journal=False)
    params = worker.state.app.initial_parameters(0)
    worker.start()
    worker.publish([to_clients(TrainTask(parameters=params, participants=["0"], round=1))])
    worker.publish(
        [to_clients(Gradients(gradients={k: np.zeros_like(v) for k, v in params.items()}, learning_rate=0.1))]
    )
    while worker.step(0.0):
        pass
    sent = []
    while (delivery := admin.get(topology.server_queue)) is not None:
        if delivery.envelope.type == "evaluate_result":
            assert isinstance(from_wire(delivery.envelope, delivery.body), EvaluateResult)
        sent.append(delivery.envelope.type)
    while (dead := admin.get(topology.dead_queue)) is not None:
        sent.append(dead.envelope.headers[REASON_HEADER])
    worker.transport.close()
    return [t for t in sent if t != "heartbeat"]


@pytest.mark.timeout(600)
def test_a_second_simulation_does_not_inherit_the_first_ones_extra_handlers():
    with_gradients = load_config(
        None, {**SMALL, "run": "sets-first", "extra_handlers": ["brokerfl.handlers.gradients"]}
    )
    first = simulate(with_gradients)
    assert [r["model_version"] for r in first.records] == [1, 2]
    assert client_table(with_gradients).handler_for("gradients") is not None

    cyclic = load_config("configs/digits_cyclic.yaml", {**SMALL, "run": "sets-second"})
    second = simulate(cyclic)  # brokerfl.handlers.gradients is imported by now: nothing of it may be in this run
    assert [r["round"] for r in second.records] == [1, 1, 1, 2, 2, 2]
    table = client_table(cyclic)
    assert table.handler_for("gradients") is None and [s.name for s in table.sets] == ["client"]

    assert _answers_gradients(with_gradients) == ["join", "parameter_update", "evaluate_result"]
    answered = _answers_gradients(cyclic)
    assert (
        answered[:2] == ["join", "parameter_update"]
        and "no handler for message type 'gradients' in the client table" in answered[2]
    )


def test_prepare_is_applied_only_to_the_runs_that_name_the_set():
    with_gradients = load_config(None, {"clients": 2, "extra_handlers": ["brokerfl.handlers.gradients"]})
    plain = load_config(None, {"clients": 2})
    broker = LocalBroker()
    keeping = client_worker(LocalTransport(broker), with_gradients, "0", journal=False)
    not_keeping = client_worker(LocalTransport(broker), plain, "1", journal=False)
    assert keeping.state.keep_last_global and not not_keeping.state.keep_last_global


def test_an_old_style_extra_module_still_works_with_a_deprecation_warning():
    old = load_config(None, {"clients": 2, "extra_handlers": ["tests.old_style_handlers"]})
    with pytest.warns(
        DeprecationWarning, match=r"registers on client table at import: export CLIENT_HANDLERS or SERVER_HANDLERS"
    ):
        table = client_table(old)
    from tests import old_style_handlers

    assert table.handler_for("gradients") is old_style_handlers.answer_gradients_old_style
    assert (
        client_table(load_config(None, {"clients": 2})).handler_for("gradients") is None
    )  # imported, yet in no other run
    with pytest.warns(DeprecationWarning):
        assert _answers_gradients(old) == ["join", "parameter_update", "evaluate_result"]


def test_a_workflow_module_with_a_table_instead_of_handlers_still_works_with_a_deprecation_warning(monkeypatch):
    import sys
    import types

    from brokerfl.runtime.handler_table import HandlerTable

    module = types.ModuleType("old_style_client")
    module.table = HandlerTable("client")
    module.table.register(Join, joined)
    module.make_state = client.make_state
    monkeypatch.setitem(sys.modules, "old_style_client", module)
    with pytest.warns(DeprecationWarning, match="has a 'table' and no 'HANDLERS'"):
        table = client_table(load_config(None, {"clients": 2, "client_handlers": "old_style_client"}))
    assert table.types() == ["join"] and table.handler_for("join") is joined


def test_context_is_typed_by_its_state():
    ctx: Context[list[int]] = Context(role="r", run="x", state=[1], log=None)
    assert ctx.state == [1] and Started.LOCAL
