"""Asynchronous FL: the arithmetic of FedAsync and FedBuff by hand, and the asynchronous
server (handlers/workflows/async_server.py) in simulations and handler by handler: every update ends
in exactly one stored model version or is dropped with its reason, never folded twice."""

from __future__ import annotations

import time

import numpy as np
import pytest
import structlog

import brokerfl.handlers.workflows.client as client_handlers
from brokerfl.assembly.roles import client_worker, coordinator_table, server_worker
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.handlers.strategies.aggregate import apply_mean_delta, fold_update, mix, new_running_sum, staleness_weight
from brokerfl.handlers.strategies.base import load_strategy
from brokerfl.handlers.strategies.fedasync import FedAsync
from brokerfl.handlers.strategies.fedbuff import FedBuff
from brokerfl.handlers.workflows import async_server
from brokerfl.handlers.workflows.server_state import JoinDeadline
from brokerfl.runtime.handler_table import Context, HandlerSet, Started
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import Heartbeat, Join, ParameterUpdate, TrainTask
from tests.handler_modules import extra_handlers


@pytest.fixture(autouse=True)
def one_torch_thread():
    """As the CLI does: one thread per process (2 shared cores; faster, and reproducible)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------- arithmetic


def test_staleness_functions_match_the_paper():
    assert staleness_weight(0, "constant") == 1.0 and staleness_weight(7, "constant") == 1.0
    assert staleness_weight(0, "polynomial", a=0.5) == 1.0
    assert staleness_weight(3, "polynomial", a=0.5) == pytest.approx(0.5)  # 4^-0.5
    assert staleness_weight(4, "polynomial", a=1.0) == pytest.approx(0.2)  # 5^-1
    assert staleness_weight(4, "hinge", a=0.5, b=4) == 1.0  # at b: still 1
    assert staleness_weight(6, "hinge", a=0.5, b=4) == pytest.approx(0.5)  # 1 / (0.5 * 2 + 1)
    assert staleness_weight(10, "hinge", a=0.5, b=4) == pytest.approx(0.25)  # 1 / (0.5 * 6 + 1)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight(-1)
    with pytest.raises(ValueError, match="unknown staleness function"):
        staleness_weight(1, "exponential")


def test_fedasync_mixing():
    w = {"x": np.array([0.0, 10.0], np.float32)}
    client = {"x": np.array([10.0, 0.0], np.float32)}
    out = mix(w, client, 0.25)
    assert out["x"].dtype == np.float32
    np.testing.assert_allclose(out["x"], [2.5, 7.5])
    # the strategy: alpha_s = alpha * s(staleness) = 0.6 * 4^-0.5 = 0.3
    strategy = load_strategy("fedasync", alpha=0.6, staleness="polynomial", a=0.5)
    strategy.start_version(w)
    assert not strategy.ready()
    assert strategy.fold_async(client, global_parameters=w, base_parameters=None, staleness=3) == pytest.approx(0.3)
    assert strategy.ready()
    np.testing.assert_allclose(strategy.finish_version(w)["x"], [3.0, 7.0])


def test_fedbuff_averages_staleness_weighted_deltas_over_k():
    w = {"x": np.array([1.0, 1.0], np.float32)}
    acc = new_running_sum(w)
    fold_update(
        acc, {"x": np.array([2.0, 4.0], np.float32)}, 1.0, base={"x": np.array([0.0, 0.0], np.float32)}
    )  # delta (2, 4)
    fold_update(
        acc, {"x": np.array([3.0, 1.0], np.float32)}, 0.5, base={"x": np.array([1.0, 1.0], np.float32)}
    )  # 0.5 * (2, 0)
    assert acc.count == 2 and acc.total_weight == 1.5
    np.testing.assert_allclose(acc.sums["x"], [3.0, 4.0])
    out = apply_mean_delta(acc, w, 0.5)  # w + 0.5 * (3, 4) / 2
    assert out["x"].dtype == np.float32
    np.testing.assert_allclose(out["x"], [1.75, 2.0])

    # the strategy: K = 2, polynomial a = 1: staleness 0 -> 1, staleness 1 -> 0.5
    strategy = load_strategy("fedbuff", buffer_size=2, server_lr=0.5, staleness="polynomial", a=1.0)
    strategy.start_version(w)
    assert (
        strategy.fold_async(
            {"x": np.array([2.0, 4.0])}, global_parameters=w, base_parameters={"x": np.zeros(2)}, staleness=0
        )
        == 1.0
    )
    assert not strategy.ready()
    assert (
        strategy.fold_async(
            {"x": np.array([3.0, 1.0])}, global_parameters=w, base_parameters={"x": np.ones(2)}, staleness=1
        )
        == 0.5
    )
    assert strategy.ready()
    np.testing.assert_allclose(strategy.finish_version(w)["x"], [1.75, 2.0])
    assert strategy.folded() == 0  # ready for the next version


def test_strategy_options_are_checked():
    assert isinstance(load_strategy("fedasync"), FedAsync) and isinstance(load_strategy("fedbuff"), FedBuff)
    assert load_strategy("fedbuff").server_handlers == "async_server"
    with pytest.raises(ValueError, match="no option"):
        load_strategy("fedbuff", buffer=3)
    with pytest.raises(ValueError, match="option .staleness.: Input should be .constant., .polynomial. or .hinge."):
        load_strategy("fedasync", staleness="linear")
    with pytest.raises(ValueError, match="alpha"):
        load_strategy("fedasync", alpha=1.5)
    with pytest.raises(ValueError, match="buffer_size"):
        load_strategy("fedbuff", buffer_size=0)


# ---------------------------------------------------------------- simulations


class Produced(list):
    """The ids of every update the clients send, recorded by the ``extra_handlers`` module
    ``module`` (a run whose config names it)."""

    module: str


@pytest.fixture
def produced(monkeypatch):
    ids = Produced()

    def train_and_record(trained, ctx):  # a training's outcome: the update
        out = list(client_handlers.answer_task(trained, ctx) or [])
        ids.extend(o.message.message_id for o in out if isinstance(o.message, ParameterUpdate))
        return out

    ids.module = extra_handlers(
        monkeypatch, client=HandlerSet("recording", overrides={client_handlers.Trained: train_and_record})
    )
    return ids


def check_every_update_accounted_for(store, dropped, produced_ids):
    """Stored versions hold distinct ids; each update is in exactly one version or dropped."""
    in_versions = [uid for v in store.versions() for uid in store.get(v).update_ids]
    assert len(in_versions) == len(set(in_versions)), "an update is in two versions, or twice in one"
    dropped_ids = {uid for uid, _ in dropped}
    assert not (set(in_versions) & dropped_ids), "an update both folded and dropped"
    assert set(produced_ids) == set(in_versions) | dropped_ids
    return set(in_versions), dropped_ids


@pytest.mark.parametrize(
    "name, rounds, options, updates_per_version, goal",
    [("fedasync", 40, {"alpha": 0.6}, 1, 0.85), ("fedbuff", 20, {"buffer_size": 4}, 4, 0.85)],
)
def test_simulated_async_run_learns_and_accounts_for_every_update(
    produced, name, rounds, options, updates_per_version, goal
):
    config = load_config(
        f"configs/digits_{name}.yaml",
        {"rounds": rounds, "strategy.options": options, "extra_handlers": [produced.module]},
    )
    store = MemoryModelStore()  # keeps only the newest two versions' parameters: FedBuff must use its cache
    result = simulate(config, store=store)
    assert [r["model_version"] for r in result.records] == list(range(1, rounds + 1))
    assert [r["round"] for r in result.records] == list(range(1, rounds + 1))
    assert all(r["num_updates"] == updates_per_version for r in result.records)
    assert result.records[-1]["accuracy"] > goal
    assert store.versions() == list(range(rounds + 1))
    _, dropped = check_every_update_accounted_for(store, result.server_state.dropped, produced)
    # with 10 equal clients taking turns, staleness stays within max_staleness: only the
    # updates still in flight at the end are dropped
    assert {reason for _, reason in result.server_state.dropped} <= {"late: the run is finished"}
    assert len(dropped) <= config.clients


def test_updates_beyond_max_staleness_are_dropped_with_the_reason(produced):
    config = load_config(
        "configs/digits_fedasync.yaml",
        {"rounds": 20, "strategy.options": {"max_staleness": 3}, "extra_handlers": [produced.module]},
    )
    result = simulate(config)
    stale = [reason for _, reason in result.server_state.dropped if reason.startswith("stale")]
    assert stale and all("max_staleness 3" in reason for reason in stale)
    assert len(result.records) == 20
    check_every_update_accounted_for(result.server_state.store, result.server_state.dropped, produced)


@pytest.mark.parametrize("name", ["fedasync", "fedbuff"])
def test_a_duplicated_update_is_folded_once(monkeypatch, name):
    """Client 0 sends its first update twice (same message id): FedAsync has stored it by
    then, so the copy is dropped as a duplicate; FedBuff still holds it in its buffer, so
    the copy is held again (acked with its version) and not folded again."""
    sent: list[str] = []

    def train_and_duplicate(trained, ctx):  # a training's outcome: the update
        out = list(client_handlers.answer_task(trained, ctx) or [])
        if out and ctx.state.client_id == "0" and not sent:
            sent.append(out[0].message.message_id)
            out = out + out
        return out

    duplicating = extra_handlers(
        monkeypatch, client=HandlerSet("duplicating", overrides={client_handlers.Trained: train_and_duplicate})
    )
    config = load_config(f"configs/digits_{name}.yaml", {"rounds": 4, "clients": 4, "extra_handlers": [duplicating]})
    result = simulate(config)
    store = result.server_state.store
    versions_with_it = [v for v in store.versions() if sent[0] in store.get(v).update_ids]
    assert len(versions_with_it) == 1 and store.get(versions_with_it[0]).update_ids.count(sent[0]) == 1
    if name == "fedasync":
        assert (sent[0], "duplicate: already folded into a stored model version") in result.server_state.dropped
    else:
        assert sent[0] not in {uid for uid, _ in result.server_state.dropped}
        assert all(r["num_updates"] == 4 for r in result.records)


@pytest.mark.parametrize("name, rounds", [("fedasync", 12), ("fedbuff", 6)])
def test_replay_recomputes_every_async_version_hash_for_hash(name, rounds):
    from brokerfl.assembly.roles import topology_for
    from brokerfl.ops.replay import replay
    from brokerfl.storage.journal import read_journal

    config = load_config(f"configs/digits_{name}.yaml", {"rounds": rounds, "clients": 5})
    result = simulate(config, journal=True)
    replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config)
    assert replayed.ok, replayed.table()
    assert [row.replayed_hash for row in replayed.rows[1:]] == [r["sha256"] for r in result.records]


# ---------------------------------------------------------------- handler by handler


def _server(name: str, **overrides):
    config = load_config(f"configs/digits_{name}.yaml", {"clients": 3, **overrides})
    state = async_server.make_state(config, MemoryModelStore(), MetricsLog(None))
    table = coordinator_table(config)

    def call(message, redelivered=False):
        ctx = Context(
            role="server",
            run=config.run,
            state=state,
            log=structlog.get_logger(),
            redelivered=redelivered,
            clock=time.monotonic,
        )
        out = list(table.handler_for(message.TYPE)(message, ctx) or [])
        return out, ctx

    call(Started())
    return state, call


def _update(state, client_id: str, version: int, shift: float = 0.01) -> ParameterUpdate:
    parameters = {k: v + shift for k, v in state.model.parameters.items()}
    return ParameterUpdate(
        client_id=client_id, task_id="t", parameters=parameters, num_samples=10, model_version=version, round=version
    )


def test_fedbuff_holds_a_redelivered_buffered_update_without_refolding_it():
    state, call = _server("fedbuff", **{"strategy.options": {"buffer_size": 2}})
    first = _update(state, "0", 0)
    out, ctx = call(first)
    assert ctx.holding and not ctx.committing and state.strategy.folded() == 1
    assert [o.message.participants for o in out] == [["0"]]  # its next task
    out, ctx = call(first, redelivered=True)  # the old connection died after the fold
    assert ctx.holding and out == [] and state.strategy.folded() == 1
    second = _update(state, "1", 0)
    out, ctx = call(second)
    assert ctx.holding and ctx.committing and state.model.version == 1
    assert state.store.get(1).update_ids == [first.message_id, second.message_id]
    out, ctx = call(first, redelivered=True)  # and once more, after its version is stored
    assert not ctx.holding and [o.dest for o in out] == ["audit"]  # its drop record only: no new task
    assert state.dropped == [(first.message_id, "duplicate: already folded into a stored model version")]
    assert state.model.version == 1


def test_fedasync_drops_a_copy_of_a_stored_update_and_stale_or_future_ones():
    state, call = _server("fedasync", **{"strategy.options": {"max_staleness": 1}})
    update = _update(state, "0", 0)
    out, ctx = call(update)
    assert ctx.holding and ctx.committing and state.model.version == 1
    assert isinstance(out[0].message, TrainTask) and out[0].message.model_version == 1 and out[0].dest == "client.0"
    out, ctx = call(update, redelivered=True)
    assert not ctx.holding and [o.dest for o in out] == ["audit"] and state.model.version == 1
    call(_update(state, "1", 1))  # -> version 2
    stale, future = _update(state, "2", 0), _update(state, "2", 9)
    out, ctx = call(stale)  # staleness 2 > 1: dropped (its record), and the client gets a fresh task
    assert not ctx.holding and [(o.dest, o.message.model_version) for o in out] == [("audit", 0), ("client.2", 2)]
    call(future)
    reasons = dict(state.dropped)
    assert reasons[update.message_id].startswith("duplicate")
    assert (
        reasons[stale.message_id] == "stale: trained on model version 0, current is 2 (staleness 2 > max_staleness 1)"
    )
    assert "newer than the server's 2" in reasons[future.message_id]
    assert state.model.version == 2


def test_a_client_seen_after_the_beginning_gets_its_own_task():
    state, call = _server("fedbuff")
    call(Join(client_id="0", num_samples=5))
    call(Join(client_id="1", num_samples=5))
    assert not state.begun
    out, _ = call(JoinDeadline())  # 2 of 3 live, min_clients 2: begin without client 2
    assert sorted(o.dest for o in out) == ["client.0", "client.1"]
    assert all(o.message.participants == [o.dest.split(".")[1]] and o.message.deadline == 0 for o in out)
    out, _ = call(Heartbeat(client_id="2", num_samples=5))
    assert [o.dest for o in out] == ["client.2"]
    out, _ = call(Heartbeat(client_id="2", num_samples=5))  # it has one already
    assert out == []


def test_a_restarted_server_goes_on_from_the_stored_versions(produced):
    """Kill the server while FedBuff holds updates in its buffer; a new server on the same
    store and broker resumes from the newest version, refolds the redelivered held updates,
    re-tasks the clients, and every update still ends in exactly one version or dropped."""
    config = load_config(
        "configs/digits_fedbuff.yaml",
        {
            "rounds": 8,
            "clients": 5,
            "liveness.heartbeat_s": 0.1,
            "liveness.timeout_s": 60.0,
            "extra_handlers": [produced.module],
        },
    )
    store = MemoryModelStore(keep=None)
    broker = LocalBroker()
    clients = [client_worker(LocalTransport(broker), config, cid, journal=False) for cid in config.client_ids()]
    first = server_worker(LocalTransport(broker), config, store, MetricsLog(None), journal=False)
    for worker in [*clients, first]:
        worker.start()

    def step_until(server, condition, timeout=30.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "no progress"
            server.step(0.01)
            for client in clients:
                client.step(0.0)

    step_until(first, lambda: first.state.model.version >= 3 and first.state.buffer_ids)
    held = list(first.state.buffer_ids)
    first.transport.close()  # as if killed: its held updates go back to the queue
    second = server_worker(LocalTransport(broker), config, store, MetricsLog(None), journal=False)
    second.start()
    assert second.state.model.version == first.state.model.version
    step_until(second, lambda: second.stopped)
    for client in clients:
        client.step(0.1)
        client.transport.close()

    assert store.versions() == list(range(9))
    in_versions, _ = check_every_update_accounted_for(store, first.state.dropped + second.state.dropped, produced)
    assert set(held) <= in_versions  # refolded by the new server, not lost
