"""Workflows beyond client-server: cyclic weight transfer and cross-site evaluation, in
simulate (local transport) and as separate processes over RabbitMQ with the same config."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import pytest
from test_federation_amqp import brokerfl, cleanup, finish, wait_until  # noqa: F401  (cleanup is a fixture)

from brokerfl.assembly.roles import client_worker, server_worker, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.ops.replay import replay
from brokerfl.runtime.worker import Worker
from brokerfl.storage.accounting import account, account_run
from brokerfl.storage.cross_site_results import build_matrix
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import MetricsLog, read_metrics
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.local import LocalBroker, LocalTransport

SMALL = {"rounds": 2, "clients": 3, "train.epochs": 1}


def _journal_checks(broker: LocalBroker, config, store) -> None:
    journal = list(read_journal(LocalTransport(broker), topology_for(config)))
    report = account(journal, (store.metadata(v) for v in store.versions()))
    assert report.ok, report.summary()
    replayed = replay(journal, config)
    assert replayed.ok, replayed.table()
    return report


def test_cyclic_hands_the_model_from_client_to_client(tmp_path):
    config = load_config("configs/digits_cyclic.yaml", {**SMALL, "cyclic.order": "fixed"})
    result = simulate(config, tmp_path, journal=True)
    records = result.records
    # one version per hop: every client once per round, each made of exactly one update
    assert [r["model_version"] for r in records] == list(range(1, 7))
    assert [r["round"] for r in records] == [1, 1, 1, 2, 2, 2]
    assert all(r["num_updates"] == 1 for r in records)
    holders = [result.store.metadata(v)["update_ids"][0] for v in result.store.versions()[1:]]
    assert len(set(holders)) == 6
    report = _journal_checks(result.broker, config, result.store)
    assert len(report.sent) == 6 and not report.dropped
    assert records[-1]["accuracy"] > 0.8


def test_cyclic_shuffle_draws_a_new_order_each_round():
    from brokerfl.handlers.workflows.cyclic import route

    config = load_config("configs/digits_cyclic.yaml", {"clients": 8, "cyclic.order": "shuffle"})
    orders = [route(config, r) for r in (1, 2, 3)]
    assert all(sorted(o) == config.client_ids() for o in orders)
    assert len({tuple(o) for o in orders}) == 3
    assert route(config, 2) == orders[1]  # a restarted coordinator draws the same one


def test_a_hung_holder_is_passed_over_after_the_hop_timeout():
    """Client 1 takes its task and never answers (held unacked): after hop_timeout_s the
    model goes on to client 2; nothing is lost and the run completes."""
    from brokerfl.handlers.workflows import client
    from brokerfl.runtime.handler_table import HandlerSet, compose
    from brokerfl.wire.message import TrainTask

    config = load_config(
        "configs/digits_cyclic.yaml",
        {**SMALL, "cyclic.order": "fixed", "cyclic.hop_timeout_s": 0.5, "run": "cyclic-hang"},
    )
    config = config.model_copy(update={"liveness": config.liveness.model_copy(update={"timeout_s": math.inf})})
    broker, store = LocalBroker(), MemoryModelStore()
    server = server_worker(LocalTransport(broker), config, store, MetricsLog(None), journal=True)
    clients = [client_worker(LocalTransport(broker), config, cid, journal=True) for cid in ("0", "2")]
    hung_table = compose(
        "client", *client.HANDLERS, HandlerSet("hung", overrides={TrainTask: lambda task, ctx: ctx.hold()})
    )  # holds the model, never answers
    topology = topology_for(config)
    hung_transport = LocalTransport(broker)
    hung = Worker(
        hung_transport,
        topology,
        topology.declare_client(hung_transport, "1"),
        hung_table,
        client.make_state(config, "1"),
        name="client.1",
        prefetch=1,
    )
    workers = [server, *clients, hung]
    for worker in workers[1:]:
        worker.start()
    server.start()
    deadline = time.monotonic() + 60
    while not server.stopped and time.monotonic() < deadline:
        if not sum(w.step(0.0) for w in workers):
            server.step(0.05)  # waits for the hop timer
    assert server.stopped, "the cyclic run did not finish"
    holders = [store.metadata(v)["round"] for v in store.versions()[1:]]
    assert holders == [1, 1, 2, 2]  # client 1 passed over in both rounds
    assert broker.queues[topology.client_queue("1")].unacked  # its task is still its own, never lost
    hung_transport.close()
    _journal_checks(broker, config, store)


def test_cross_site_matrix_in_simulate(tmp_path):
    config = load_config("configs/digits_cross_site.yaml", {**SMALL, "run": "xs-small"})
    result = simulate(config, tmp_path, journal=True)
    document = json.loads((tmp_path / "cross_site.json").read_text())
    assert (tmp_path / "cross_site.png").stat().st_size > 0
    assert document["models"] == ["global", "site-0", "site-1", "site-2"]
    assert document["sites"] == ["site-0", "site-1", "site-2"]
    matrix = document["matrix"]["accuracy"]
    assert len(matrix) == 4 and all(len(row) == 3 and all(0.0 <= v <= 1.0 for v in row) for row in matrix)
    # the global row is the final global model, evaluated on each site's data
    assert [row["model"] for row in document["summary"]] == ["site-0", "site-1", "site-2"]
    assert len(result.records) == 2
    _journal_checks(result.broker, config, result.store)  # the extra messages are not updates


def test_cross_site_summary_compares_off_site_with_the_global_model():
    results = {
        "site-0": {"global": {"accuracy": 0.9}, "site-0": {"accuracy": 1.0}, "site-1": {"accuracy": 0.5}},
        "site-1": {"global": {"accuracy": 0.8}, "site-0": {"accuracy": 0.4}, "site-1": {"accuracy": 0.95}},
    }
    document = build_matrix(results)
    assert document["matrix"]["accuracy"] == [[0.9, 0.8], [1.0, 0.4], [0.5, 0.95]]
    assert document["summary"] == [
        {"model": "site-0", "own_site": 1.0, "off_site_mean": 0.4, "global_off_site_mean": 0.8},
        {"model": "site-1", "own_site": 0.95, "off_site_mean": 0.5, "global_off_site_mean": 0.9},
    ]


@pytest.mark.slow
@pytest.mark.broker
def test_cyclic_with_cross_site_over_rabbitmq_survives_a_killed_holder(amqp_url, run_name, tmp_path, cleanup):  # noqa: F811
    """Separate processes, the same config as simulate. Client 1 is kill -9'd while it
    holds the model and started again: its task is redelivered, the run completes with
    every hop, accounting and replay pass, and the cross-site matrix is written."""
    clients, rounds = 3, 2
    cleanup((run_name, [str(i) for i in range(clients)]))
    common = [
        "configs/digits_cyclic.yaml",
        "--broker",
        amqp_url,
        "--run",
        run_name,
        "--clients",
        str(clients),
        "--rounds",
        str(rounds),
        "--log-level",
        "warning",
    ]
    config_path = tmp_path / "cyclic.yaml"
    import yaml

    data = yaml.safe_load(open("configs/digits_cyclic.yaml"))
    # Client 1's hops take seconds (300x its ~10 ms of training), so the kill below lands in
    # its first one. With shorter hops the kill could come after its last hop (the metrics
    # line is written after the evaluation beside the round): the restarted process then had
    # no local model for the cross-site matrix.
    # The hop timeout is far above a hop's few seconds: on a loaded machine the restarted
    # client 1 takes tens of seconds to start and answer, and passing it over loses a version.
    data.update(cross_site_eval=True, cyclic={"order": "fixed", "hop_timeout_s": 240}, client_slowdown={"1": 300.0})
    config_path.write_text(yaml.safe_dump(data))
    common[0] = str(config_path)
    out = tmp_path / "out"
    server = brokerfl("server", *common, "--out", str(out))
    procs = {cid: brokerfl("client", *common, "--client-id", cid) for cid in ("0", "1", "2")}
    try:
        # client 0 hands on to client 1 (fixed order), which trains 300x slower: kill it then
        wait_until(
            lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out / "metrics.jsonl")) >= 1,
            120,
            "client 0's hop",
        )
        time.sleep(0.5)  # client 1 is now holding the model (its training takes seconds)
        procs["1"].kill()
        procs["1"].communicate()
        procs["1"] = brokerfl("client", *common, "--client-id", "1")
        outputs = finish([server, *procs.values()], timeout=600)
    finally:
        finish(list(procs.values()), timeout=1)
    assert server.returncode == 0, outputs[0]
    records = read_metrics(out / "metrics.jsonl")
    assert [r["model_version"] for r in records] == list(range(1, clients * rounds + 1))
    config = load_config(config_path, {"run": run_name, "clients": clients, "rounds": rounds})
    from brokerfl.storage.store import DirectoryModelStore
    from brokerfl.transports.amqp import AmqpTransport

    with AmqpTransport(amqp_url) as transport:
        report = account_run(transport, topology_for(config), DirectoryModelStore(out / "models"))
        assert report.ok, report.summary()
        replayed = replay(read_journal(transport, topology_for(config)), config)
        assert replayed.ok, replayed.table()
    document = json.loads((out / "cross_site.json").read_text())
    assert document["sites"] == ["site-0", "site-1", "site-2"] and len(document["models"]) == 4, (
        document["models"],
        outputs,
    )
    assert "cross-site evaluation" in outputs[0]  # the server prints the table


# ---------------------------------------------------------------- swarm


def _swarm_peers(config, broker):
    from brokerfl.assembly.swarm_peers import simulated_peer

    return [simulated_peer(config, broker, cid, MetricsLog(None), journal=True) for cid in config.client_ids()]


def _run_swarm(peers, until, deadline_s=120.0):
    from brokerfl.assembly.swarm_peers import run_peers

    run_peers(peers, until=until, deadline_s=deadline_s)
    assert until(), "the swarm did not get there in time"


def _swarm_store(broker, config):
    from brokerfl.storage.broker_store import BrokerModelStore

    return BrokerModelStore(LocalTransport(broker), topology_for(config)).refresh()


def test_swarm_aggregator_killed_mid_round_another_peer_takes_the_role():
    """Three peers. The peer holding the aggregator role dies (connections closed, its
    held updates go back to the queue) in round 2: the next candidate takes the role from
    the versions on the broker, the round completes from the redelivered updates, and
    the run ends with every update in exactly one version or dropped with a reason."""
    from brokerfl.wire.message import ParameterUpdate

    config = load_config(
        "configs/digits_swarm.yaml",
        {
            **SMALL,
            "rounds": 3,
            "run": "swarm-kill",
            "train.max_batches": 10,
            "swarm.min_responses_required": 2,
            "swarm.wait_after_min_s": 0.5,
        },
    )
    config = config.model_copy(update={"liveness": config.liveness.model_copy(update={"timeout_s": math.inf})})
    broker = LocalBroker()
    peers = _swarm_peers(config, broker)
    for peer in peers:
        peer.start()
    first = peers[0].candidate
    _run_swarm(peers, lambda: first.state.active and first.state.round == 2)
    # from now on it takes updates (unacked) and dies before storing the round
    first.table = first.table.copy()
    first.table.register(ParameterUpdate, lambda update, ctx: ctx.hold())
    _run_swarm(peers, lambda: len(first.held) >= 2)
    assert [p.candidate.state.active for p in peers] == [True, False, False]
    for worker in peers[0].workers:  # the aggregating process dies: both its connections go
        worker.stopped = True
        worker.transport.close()
    rest = peers[1:]
    _run_swarm(rest, lambda: all(p.done for p in rest))
    assert peers[1].holders  # the next candidate took the role
    store = _swarm_store(broker, config)
    assert store.versions() == [0, 1, 2, 3]
    assert [store.metadata(v)["round"] for v in (1, 2, 3)] == [1, 2, 3]
    _journal_checks(broker, config, store)
    best = peers[1].holders[0].state.comparator.best_version(store)
    assert best is not None and best[1] == max(store.metadata(v)["metrics"]["accuracy"] for v in (1, 2, 3))


def _swarm_with_a_late_client(run: str):
    """Client 2 is away while peers 0 and 1 run the whole swarm (2 of 3 answers close a
    round) and leave. Then it answers its old tasks: its updates reach an aggregation
    queue nobody consumes. Returns (broker, config, its client, stopped)."""
    config = load_config(
        "configs/digits_swarm.yaml",
        {**SMALL, "run": run, "train.max_batches": 5, "swarm.min_responses_required": 2, "swarm.wait_after_min_s": 0.0},
    )
    config = config.model_copy(update={"liveness": config.liveness.model_copy(update={"timeout_s": math.inf})})
    broker = LocalBroker()
    topology = topology_for(config)
    peers = _swarm_peers(config, broker)
    away = peers[2].clients[0]
    peers[2].clients = []  # its peer runs without it for now
    for peer in peers:
        peer.start()
    away.start()  # joins, then is not stepped: its tasks wait in its queue
    _run_swarm(peers, lambda: all(p.done for p in peers))
    assert LocalTransport(broker).queue_info(topology.server_queue).consumers == 0
    while not away.stopped:  # answers round 1 and 2 (late), then takes the Exit
        away.step(0.0)
    assert (
        LocalTransport(broker).queue_info(topology.server_queue).messages_ready >= 2
    )  # its two updates (and maybe a heartbeat)
    return broker, config, away


def _late_updates_recorded(broker, config, late) -> None:
    assert LocalTransport(broker).queue_info(topology_for(config).server_queue).messages_ready == 0
    store = _swarm_store(broker, config)
    assert store.versions() == [0, 1, 2]
    report = _journal_checks(broker, config, store)
    assert len(report.dropped) == 2 and all("late: the run is finished" in r[0] for r in report.dropped.values())


def test_swarm_update_sent_after_every_candidate_left_is_recorded_by_the_last_one_out():
    """The late client's peer, leaving, keeps its candidate consuming until the broker finds
    nothing waiting: the candidate takes the role back and records the late updates as
    dropped, and a fresh one finds the queue empty: accounting finds nothing lost."""
    from brokerfl.assembly.swarm_peers import Peer, aggregator_worker

    broker, config, away = _swarm_with_a_late_client("swarm-late")
    late = Peer(
        [away],
        lambda: aggregator_worker(
            LocalTransport(broker), LocalTransport(broker), config, MetricsLog(None), name="aggregator.2", journal=True
        ),
        LocalTransport(broker),
    )
    late.candidate.start()  # its client has exited already
    _run_swarm([late], lambda: late.done)
    assert late.sweeps == 1 and late.holders
    _late_updates_recorded(broker, config, late)


class _OnTheirWay(LocalTransport):
    """Deliveries reach this transport's consumers only from its ``after``-th poll on: on
    their way when the peer first looks (``run_peers`` ticks the peers after each poll)."""

    def __init__(self, broker, after: int) -> None:
        super().__init__(broker)
        self.polls, self.after = 0, after

    def poll(self, timeout: float = 0.0) -> int:
        self.polls += 1
        return super().poll(timeout) if self.polls >= self.after else 0


class _RabbitAnswers(LocalTransport):
    """Answers the first ``times`` questions about a queue as RabbitMQ can about a quorum
    queue: "slow" (it did not reply within 250 ms: 0 messages, 0 consumers) or "stale" (a
    consumer that stopped with deliveries on their way still counts; nothing ready)."""

    def __init__(self, broker, answer: str, times: int) -> None:
        super().__init__(broker)
        self.answer, self.times = answer, times

    def queue_info(self, name: str):
        info = super().queue_info(name)
        if self.times <= 0:
            return info
        self.times -= 1
        return dataclasses.replace(info, messages_ready=0, consumers=0 if self.answer == "slow" else 1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("answer", ["slow", "stale"])
def test_swarm_last_one_out_leaves_nothing_behind_whatever_the_broker_answers(answer):
    """As above, with the late updates still on their way to the leaving peer's candidate
    and the broker's first answers about the queue wrong in the two ways RabbitMQ's can be
    for a quorum queue. A peer that stopped its candidate and then trusted the answers
    would leave the updates to nobody (accounting: unaccounted for)."""
    from brokerfl.assembly.swarm_peers import QUIET_LOOKS, Peer, aggregator_worker

    broker, config, away = _swarm_with_a_late_client(f"swarm-late-{answer}")
    late = Peer(
        [away],
        lambda: aggregator_worker(
            _OnTheirWay(broker, after=2),
            LocalTransport(broker),
            config,
            MetricsLog(None),
            name="aggregator.2",
            journal=True,
        ),
        _RabbitAnswers(broker, answer, times=2 * QUIET_LOOKS),
    )
    late.candidate.start()
    _run_swarm([late], lambda: late.done)
    assert late.holders, "nobody took the late updates"
    _late_updates_recorded(broker, config, late)


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_swarm_holder_whose_consumer_is_subscribed_anew_gives_the_role_up(amqp_factory, amqp_url, run_name):
    """Peer A's candidate holds the role (its first delivery, held unacked, a round timer
    set) when its connection is cut. RabbitMQ makes B's candidate the active consumer and
    redelivers the update to it; A reconnects and re-subscribes behind B, still believing
    it holds the role. Before its timer can act on that, the peer fences it: the old
    candidate stops and never fires, and a fresh one waits, not holding the role."""
    from types import SimpleNamespace
    from urllib.parse import urlsplit, urlunsplit

    from test_amqp_failover import FreezingProxy

    from brokerfl.assembly.swarm_peers import Peer
    from brokerfl.handlers.workflows.swarm import WaitAfterMinimum
    from brokerfl.runtime.handler_table import HandlerTable
    from brokerfl.runtime.worker import Worker
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology
    from brokerfl.wire.message import Heartbeat, to_wire

    table = HandlerTable("holder")

    @table.on(Heartbeat)
    def take_the_role(message, ctx):
        ctx.state.active = True
        ctx.hold()
        ctx.set_timer("round", 1.0, WaitAfterMinimum(round=1))  # a round it would close

    @table.on(WaitAfterMinimum)
    def close_the_round(message, ctx):
        ctx.state.closed += 1

    def candidate(transport, name):
        return Worker(
            transport,
            topology,
            topology.server_queue,
            table,
            SimpleNamespace(active=False, round=1, failure=None, closed=0),
            name=name,
            prefetch=4,
        )

    topology = RunTopology(run_name, swarm=True)
    admin = amqp_factory()
    topology.declare(admin)
    parts = urlsplit(amqp_url)
    proxy = FreezingProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    a_transport = None
    try:
        login = parts.netloc.rsplit("@", 1)
        a_transport = AmqpTransport(
            urlunsplit(parts._replace(netloc=(login[0] + "@" if len(login) > 1 else "") + f"127.0.0.1:{proxy.port}")),
            max_reconnect_s=60,
        )
        a_client = Worker(
            a_transport, topology, None, HandlerTable("idle"), None, name="client.a"
        )  # runs on: A does not leave
        a = Peer([a_client], lambda: candidate(a_transport, "aggregator.a"), a_transport)
        a.start()
        b = candidate(amqp_factory(), "aggregator.b")
        b.start()
        admin.publish("", topology.server_queue, *to_wire(Heartbeat(client_id="0")))
        holder = a.candidate
        deadline = time.monotonic() + 30
        while not holder.state.active and time.monotonic() < deadline:
            a_transport.poll(0.1)
        assert holder.state.active and b.state.active is False
        proxy.sever()  # A's connections die; the broker hands the update to B
        deadline = time.monotonic() + 60
        while not (b.state.active and holder.resubscribed) and time.monotonic() < deadline:
            b.step(0.05)
            a_transport.poll(0.05)  # A notices the loss, reconnects, and lines up again
        assert b.state.active and holder.resubscribed
        a.fence()  # as run_peer does after every poll, before the timers
        assert holder.stopped and holder in a.retired and a.holders == [holder]
        assert a.candidate is not holder and not a.candidate.stopped
        deadline = time.monotonic() + 1.5  # past the old holder's timer
        while time.monotonic() < deadline:
            a_transport.poll(0.1)
            a.fence()
            for worker in a.workers:
                worker.fire_due_timers()
        assert holder.state.closed == 0 and not a.candidate.state.active
        assert len(b.held) == 1 and b.held[0].redelivered
    finally:
        if a_transport is not None:
            a_transport.close()
        proxy.close()


def test_swarm_in_simulate_keeps_the_best_model(tmp_path):
    config = load_config("configs/digits_swarm.yaml", {**SMALL, "run": "swarm-sim"})
    result = simulate(config, tmp_path, journal=True)
    assert [r["round"] for r in result.records] == [1, 2]
    assert all(r["num_updates"] == 3 for r in result.records)
    best = json.loads((tmp_path / "best_model.json").read_text())
    assert best["metric"] == "accuracy" and best["value"] == max(r["accuracy"] for r in result.records)
    _journal_checks(result.broker, config, result.store)


def test_swarm_with_cross_site_evaluation_in_simulate(tmp_path):
    """The holder of the aggregator role runs cross-site evaluation after the last round,
    then the run finishes: the matrix and the best model are both written."""
    config = load_config(
        "configs/digits_swarm.yaml", {**SMALL, "run": "swarm-xs", "cross_site_eval": True, "train.max_batches": 5}
    )
    result = simulate(config, tmp_path, journal=True)
    document = json.loads((tmp_path / "cross_site.json").read_text())
    assert (tmp_path / "cross_site.png").stat().st_size > 0
    assert document["models"] == ["global", "site-0", "site-1", "site-2"]
    assert document["sites"] == ["site-0", "site-1", "site-2"]
    assert all(len(row) == 3 and all(0.0 <= v <= 1.0 for v in row) for row in document["matrix"]["accuracy"])
    assert json.loads((tmp_path / "best_model.json").read_text())["model_version"] in (1, 2)
    assert [r["round"] for r in result.records] == [1, 2]
    _journal_checks(result.broker, config, result.store)


def test_single_active_consumer_hands_over_on_the_local_transport():
    """Only the oldest consumer receives; when it goes, its unacked messages and the rest
    go to the next one (RabbitMQ's x-single-active-consumer)."""
    from brokerfl.wire.message import Heartbeat, to_wire

    broker = LocalBroker()
    first, second, publisher = LocalTransport(broker), LocalTransport(broker), LocalTransport(broker)
    publisher.declare_queue("q", single_active_consumer=True)
    got = {"first": [], "second": []}
    first.consume("q", got["first"].append)
    second.consume("q", got["second"].append)
    for i in range(3):
        publisher.publish("", "q", *to_wire(Heartbeat(client_id=str(i))))
    first.poll(0.0)
    second.poll(0.0)
    assert len(got["first"]) == 3 and got["second"] == []
    first.ack(got["first"][0])
    first.close()  # two unacked: redelivered to the second
    second.poll(0.0)
    assert [d.redelivered for d in got["second"]] == [True, True]
    with pytest.raises(Exception, match="single-active"):
        publisher.declare_queue("q")


@pytest.mark.broker
@pytest.mark.timeout(900)
def test_swarm_peers_over_rabbitmq_survive_a_killed_aggregator(amqp_url, run_name, tmp_path, request):
    """Three peer processes, no server. The process holding the aggregator role is
    kill -9'd while it holds an update of a round it has not stored: another peer takes the
    role from the versions on the broker, folds the redelivered update into that round, the
    run completes, and accounting and replay pass."""
    import os
    import subprocess
    import sys

    import yaml
    from test_federation_amqp import ROOT

    from brokerfl.storage.broker_store import BrokerModelStore
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.topology import RunTopology
    from tests.tools.swarm_probe import held_update

    def delete_run() -> None:
        with AmqpTransport(amqp_url) as admin:
            RunTopology(run_name, swarm=True).delete(admin, ["0", "1", "2"])

    request.addfinalizer(delete_run)
    rounds = 5  # the kill lands in round 2 at the earliest: rounds to spare on a fast machine
    data = yaml.safe_load(open(ROOT / "configs" / "digits_swarm.yaml"))
    data.update(run=run_name, clients=3, rounds=rounds, client_slowdown={"0": 3.0, "1": 3.0, "2": 3.0})
    data["swarm"].update(min_responses_required=2, wait_after_min_s=1)
    config_path = tmp_path / "swarm.yaml"
    config_path.write_text(yaml.safe_dump(data))
    config = load_config(config_path)
    topology = topology_for(config)
    out = tmp_path / "out"

    def peer(cid: str, generation: int):
        log = tmp_path / f"peer-{cid}.{generation}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "brokerfl.cli",
                "client",
                str(config_path),
                "--broker",
                amqp_url,
                "--client-id",
                cid,
            ],
            cwd=ROOT,
            env={**os.environ, "BROKERFL_OUT": str(out), "PYTHONUNBUFFERED": "1"},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        return proc, log

    peers = {cid: peer(cid, 0) for cid in ("0", "1", "2")}
    try:
        with AmqpTransport(amqp_url) as watcher:
            wait_until(lambda: (out / "metrics.jsonl").exists(), 240, "round 1")
            held = wait_until(
                lambda: held_update(watcher, topology), 240, "the aggregator holding an update of an unstored round"
            )
        held_id, held_round, victim = held.update_id, held.round, held.peer
        peers[victim][0].kill()
        peers[victim][0].wait()
        peers[victim] = peer(victim, 1)
        for proc, _ in peers.values():
            proc.wait(timeout=300)
    finally:
        for proc, _ in peers.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = {f.name: f.read_text() for f in tmp_path.glob("peer-*.log")}
    assert [p.returncode for p, _ in peers.values()] == [0, 0, 0], logs
    with AmqpTransport(amqp_url) as transport, AmqpTransport(amqp_url) as store_transport:
        store = BrokerModelStore(store_transport, topology).refresh()
        assert store.versions() == list(range(rounds + 1))
        generation = transport._connection.generation
        journal = list(read_journal(transport, topology))
        transport.queue_info(topology.server_queue)  # a broker's close of the reader's connection shows here
        assert transport._connection.generation == generation, (
            "the journal reader's connection was lost (e.g. a stream delivery rejected)"
        )
        # the round the killed process held was stored by the peer that took over, and the
        # update it held (redelivered) is in it
        assert store.metadata(held_round)["round"] == held_round
        assert held_id in store.metadata(held_round)["update_ids"]
        report = account(journal, (store.metadata(v) for v in store.versions()))
        assert not report.unaccounted and not report.counted_twice and not report.unknown_folded, report.summary()
        assert report.ok and report.sent, report.summary()
        # nothing is left in the aggregation queue for nobody to take
        assert transport.queue_info(topology.server_queue).messages_ready == 0
        replayed = replay(iter(journal), config)
        assert replayed.ok, replayed.table()
    # another peer (not the killed one, nor its restarted copy) took the role over
    takers = [
        name for name, text in logs.items() if not name.startswith(f"peer-{victim}.") and '"taking_over": true' in text
    ]
    assert takers, logs


def test_workflow_config_errors_name_the_key():
    from brokerfl.config import ConfigError

    assert load_config("configs/digits_cyclic.yaml").strategy.name == "cyclic"  # implied by the workflow
    with pytest.raises(ConfigError, match="strategy.name must be cyclic"):
        load_config("configs/digits_cyclic.yaml", {"strategy.name": "fedavg"})
    assert load_config("configs/digits_swarm.yaml", {"cross_site_eval": True}).cross_site_eval  # every workflow has it
    with pytest.raises(ConfigError, match="workflow"):
        load_config(None, {"workflow": "ring"})
