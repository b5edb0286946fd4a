"""Admin commands on the in-process transport (fast): commands queued before the server
starts are applied by it, journaled with their sender and the server's reply, the
accounting still holds, and the admin state is what a restarted server would read."""

from __future__ import annotations

import pytest

from brokerfl.assembly.roles import coordinator_table, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.cli.operate import admin_message
from brokerfl.config import load_config
from brokerfl.ops.replay import replay
from brokerfl.runtime.operator_commands import AdminReply, AdminState, RemoveClient, SetRounds, ask, restore_admin_state
from brokerfl.storage.accounting import account
from brokerfl.storage.journal import read_journal
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import routing_key
from brokerfl.wire.message import TrainTask, from_wire, to_wire


def test_queued_commands_shorten_the_run_and_remove_a_client():
    config = load_config(
        None,
        {
            "run": "admin-local",
            "clients": 3,
            "rounds": 10,
            "train.epochs": 1,
            "train.max_batches": 2,
            "strategy.join_timeout_s": 0.2,
        },
    )
    broker = LocalBroker()
    operator = LocalTransport(broker)
    topology = topology_for(config)
    topology.declare(operator)
    for command in (RemoveClient(client_id="2"), SetRounds(rounds=3)):
        command.sender = "admin:test"
        envelope, body = to_wire(command)
        operator.publish(topology.exchange, routing_key("server", command.TYPE), envelope, body)

    result = simulate(config, broker=broker, journal=True)

    assert [r["round"] for r in result.records] == [1, 2, 3]  # shortened from 10
    assert all(r["num_updates"] == 2 for r in result.records)  # client 2 never sampled
    journal = list(read_journal(LocalTransport(broker), topology))
    tasks = [from_wire(d.envelope, d.body) for d in journal if d.envelope.type == TrainTask.TYPE]
    assert tasks and all("2" not in t.participants for t in tasks)
    replies = [from_wire(d.envelope, d.body) for d in journal if d.envelope.type == AdminReply.TYPE]
    assert [(r.command, r.by, r.ok) for r in replies] == [
        ("remove_client", "admin:test", True),
        ("set_rounds", "admin:test", True),
    ]
    report = account(journal, [result.store.metadata(v) for v in result.store.versions()])
    assert report.ok, report.summary()
    assert "admin commands: 2" in report.summary()
    assert replay(journal, config).ok  # replay skips the operator's messages

    restored = restore_admin_state(LocalTransport(broker), topology)
    assert (restored.rounds, restored.removed, restored.paused) == (3, {"2"}, False)
    assert restore_admin_state(LocalTransport(broker), topology).seq == restored.seq  # reading keeps the newest


def test_no_server_means_no_reply_and_the_command_expires():
    config = load_config(None, {"run": "admin-idle"})
    transport = LocalTransport()
    topology = topology_for(config)
    topology.declare(transport)
    assert ask(transport, topology, SetRounds(rounds=5), timeout=0.2) is None
    assert transport.get(topology.server_queue) is None
    assert restore_admin_state(transport, topology) == AdminState()


@pytest.mark.parametrize(
    ("command", "values", "error"),
    [
        ("set-rounds", ["0"], "positive"),
        ("set-rounds", [], "one N"),
        ("pause", ["x"], "no values"),
        ("remove-client", ["a.b"], "client id"),
    ],
)
def test_admin_cli_values_are_checked(command, values, error):
    with pytest.raises(ValueError, match=error):
        admin_message(command, values, type("Args", (), {"reason": None})())


def test_an_abort_mid_round_records_each_folded_update_with_its_client():
    """The folded updates of a round an abort ends are dropped on record: each record names
    the update's client (a record with no client would be undecodable, so unreadable to
    accounting and replay)."""
    import structlog

    from brokerfl.handlers.workflows import server
    from brokerfl.runtime.handler_table import Context, Started
    from brokerfl.runtime.operator_commands import AbortRun
    from brokerfl.storage.metrics_log import MetricsLog
    from brokerfl.storage.store import MemoryModelStore
    from brokerfl.wire.message import UpdateDropped

    config = load_config(None, {"run": "abort-mid-round", "clients": 2})
    state = server.make_state(config, MemoryModelStore(), MetricsLog(None))
    table = coordinator_table(config, server)

    def call(message):
        ctx = Context(role="server", run=config.run, state=state, log=structlog.get_logger(), clock=lambda: 0.0)
        return [*ctx.also_send, *(table.handler_for(message.TYPE)(message, ctx) or [])]

    call(Started(run=config.run))
    state.round, state.round_open = 1, True
    state.folded = {"u-1": "0", "u-2": "1"}
    out = call(AbortRun(sender="admin:test"))
    drops = [from_wire(*to_wire(o.message)) for o in out if isinstance(o.message, UpdateDropped)]
    assert [(d.update_id, d.client_id) for d in drops] == [("u-1", "0"), ("u-2", "1")]
