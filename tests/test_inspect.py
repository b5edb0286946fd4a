"""brokerfl inspect: queues, dead letters with reasons, newest versions, one message
decoded, an update dumped to .npz; journal retention."""

from __future__ import annotations

import time

import numpy as np

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.cli import main
from brokerfl.config import load_config
from brokerfl.ops import inspection as inspect
from brokerfl.ops.runs import list_runs, read_registry
from brokerfl.storage.journal import read_journal, write_journal_file
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.message import Envelope, ParameterUpdate, to_wire


def test_inspect_a_simulated_run_with_a_dead_letter(tmp_path, capsys):
    config = load_config(None, {"rounds": 2, "clients": 2})
    result = simulate(config, journal=True)
    transport = LocalTransport(result.broker)
    topology = topology_for(config)
    # the run recorded itself in the broker's run registry (brokerfl.ops.runs), start to end
    events = [r.event for r in read_registry(transport, timeout=2) if r.run == config.run]
    assert events[0] == "started" and events[-1] == "finished" and events.count("progress") <= 2
    (run,) = list_runs(transport, timeout=2)
    assert (run.state, run.round, run.rounds, run.model_version, run.reason) == ("finished", 2, 2, 2, "2 rounds done")
    assert run.metric_name == "accuracy" and run.metric_value is not None and run.dropped_updates == 0
    # a poison message to the server of the finished run: nobody consumes it now, so put
    # a dead letter into the journal the way a worker does
    envelope, body = to_wire(
        ParameterUpdate(client_id="9", task_id="t", parameters={"w": np.ones(2, np.float32)}, num_samples=1)
    )
    dead = Envelope(
        envelope.type,
        envelope.message_id,
        "client.9",
        time.time(),
        {**envelope.headers, "x-brokerfl-reason": "update from client 9: w: holds NaN"},
    )
    transport.publish(topology.exchange, "dead.parameter_update", dead, body)
    path = tmp_path / "run.journal"
    write_journal_file(path, config.run, read_journal(transport, topology))

    assert main(["inspect", "--journal", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dead letters: 1" in out and "holds NaN" in out
    assert "v2 round 2: 2 updates" in out
    assert main(["inspect", "--journal", str(path), "--update", envelope.message_id]) == 0
    out = capsys.readouterr().out
    assert "w " in out and "(2,)" in out and "float32" in out and "norm 1.41421" in out
    npz = tmp_path / "u.npz"
    update_id = result.store.get(2).update_ids[0]
    assert main(["inspect", "--journal", str(path), "--update", update_id, "--npz", str(npz)]) == 0
    assert sorted(np.load(npz)) == sorted(result.store.get(2).parameters)
    assert main(["inspect", "--journal", str(path), "--update", "nope"]) == 1


def test_queue_table_shows_depth_and_consumers(transport_factory, run_name):
    transport = transport_factory()
    topology = RunTopology(run_name, journal=False)
    topology.declare(transport)
    topology.declare_client(transport, "0")
    envelope, body = to_wire(ParameterUpdate(client_id="0", task_id="t", parameters={}, num_samples=1))
    transport.publish(topology.exchange, "server.parameter_update", envelope, body)
    deadline = time.monotonic() + 10
    while transport.queue_info(topology.server_queue).messages_ready < 1 and time.monotonic() < deadline:
        transport.poll(0.05)
    table = inspect.queue_table(transport, topology, ["0", "1"])
    server_line = next(line for line in table.splitlines() if line.startswith(topology.server_queue))
    assert server_line.split()[1:4] == ["quorum", "1", server_line.split()[3]]
    assert "(absent)" in next(line for line in table.splitlines() if line.startswith(topology.client_queue("1")))
    topology.delete(transport, ["0"])


def test_journal_retention_by_size_keeps_the_newest():
    broker = LocalBroker()
    transport = LocalTransport(broker)
    topology = RunTopology("retention", journal=True, journal_max_bytes=5000)
    topology.declare(transport)
    for i in range(20):
        envelope, body = to_wire(
            ParameterUpdate(
                message_id=f"u{i}",
                client_id="0",
                task_id="t",
                parameters={"w": np.zeros(100, np.float32)},
                num_samples=1,
            )
        )
        transport.publish(topology.exchange, "audit.parameter_update", envelope, body)
    kept = [d.envelope.message_id for d in read_journal(transport, topology) if d.envelope.type == "parameter_update"]
    assert kept and kept[-1] == "u19" and "u0" not in kept
    assert len(kept) < 20
