"""Runs as things: the broker's run registry (``brokerfl runs``), a run's recorded end in
``brokerfl status``, ``status --watch`` waiting for a server, the open round's deadline, no
dead letters from status requests to a stopped server, and ``inspect``'s counts and kinds.

The federation test runs two runs of separate processes over the real RabbitMQ: run A
trains (its server killed with SIGKILL mid-run: crashed; started again and finished), run B
waits for a client that never comes and is aborted with a hostile reason."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from brokerfl.assembly.roles import topology_for
from brokerfl.config import load_config
from brokerfl.ops import inspection
from brokerfl.ops.runs import fold, list_runs, read_registry
from brokerfl.runtime.operator_commands import PauseRounds, RunRecord, SetRounds, StatusRequest, ask
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import REGISTRY_STREAM, RUNS, RunTopology, routing_key
from brokerfl.wire.message import to_wire

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "[bold red]fake[/bold red] <script>alert(1)</script>"


def record(run: str, event: str, user: str, at: float, **fields) -> RunRecord:
    message = RunRecord(event=event, run=run, timestamp=at, **fields)
    message.user_id = user
    return message


# ---------------------------------------------------------------- the fold (no broker)


def test_fold_follows_a_run_and_trusts_only_its_own_users():
    records = [
        record("a", "started", "a-server", 1.0, rounds=5),
        record("a", "training", "a-server", 2.0, rounds=5, round=1),
        # a client of run a, or another run's server, writing about run a: not counted
        record("a", "finished", "a-client-0", 3.0, reason="forged"),
        record("a", "aborted", "b-server", 3.5, reason="forged"),
        record("a", "progress", "a-server", 4.0, round=2, model_version=2, metric_name="accuracy", metric_value=0.5),
        record("b", "started", "guest", 1.5, rounds=3),  # unprovisioned: the first publisher's word
        record("b", "aborted", "guest", 5.0, reason=HOSTILE, round=1, model_version=0),
        record("b", "finished", "mallory", 6.0),
        record("d", "started", "a-server", 0.2),  # a provisioned server inventing a run
        record("c", "started", "guest", 0.5),
        record("c", "deleted", "guest", 7.0),  # delete-run: no longer listed
    ]
    summaries = {s.run: s for s in fold(records)}
    assert sorted(summaries) == ["a", "b"]
    a, b = summaries["a"], summaries["b"]
    assert (a.state, a.round, a.rounds, a.model_version) == ("training", 2, 5, 2)
    assert (a.metric_name, a.metric_value, a.started_at, a.finished_at) == ("accuracy", 0.5, 1.0, None)
    assert (b.state, b.reason, b.finished_at, b.started_at) == ("aborted", HOSTILE, 5.0, 1.5)


def test_registry_on_the_local_transport_and_a_crashed_run():
    transport = LocalTransport(LocalBroker())
    assert list_runs(transport, timeout=0.2) == []  # no registry: no runs
    done, crashed = RunTopology("done"), RunTopology("crashed")
    for topology in (done, crashed):
        topology.declare(transport)
    for topology, events in ((done, ["started", "training", "finished"]), (crashed, ["started", "training"])):
        for event in events:
            envelope, body = to_wire(
                RunRecord(event=event, run=topology.run, round=1, rounds=2, reason="2 rounds done")
            )
            transport.publish(topology.exchange, routing_key(RUNS, RunRecord.TYPE), envelope, body)
    assert len(read_registry(transport, timeout=2)) == 5
    runs = {s.run: s for s in list_runs(transport, timeout=2)}
    assert runs["done"].state == "finished" and runs["done"].reason == "2 rounds done"
    assert runs["crashed"].state == "crashed" and "no server consumes" in runs["crashed"].reason


def test_runs_table_shows_wire_strings_as_text():
    from rich.console import Console

    from brokerfl.cli.operate import runs_table
    from brokerfl.ops.runs import RunSummary

    console = Console(width=400, record=True)
    console.print(runs_table([RunSummary(run="r", state="aborted", reason=HOSTILE, round=1, rounds=2)]))
    assert HOSTILE in console.export_text()


# ---------------------------------------------------------------- inspect


def test_inspect_says_each_queues_kind_and_both_dead_letter_counts(transport_factory, run_name):
    declarer, inspector = transport_factory(), transport_factory()
    topology = RunTopology(run_name)
    topology.declare(declarer)
    topology.declare_client(declarer, "0")
    # another connection (inspect's) has not declared them: the kinds come from the topology
    table = inspection.queue_table(inspector, topology, ["0"])
    kinds = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:]}
    assert kinds == {
        topology.server_queue: "quorum",
        topology.dead_queue: "classic",
        topology.client_queue("0"): "classic",
        topology.journal_stream: "stream",
    }
    lines = inspection.dead_letter_counts(0, 16)
    assert lines[0] == "dead letters: 0 in the journal, 16 in the queue"
    assert "16 more in the queue than the journal has" in lines[1]
    assert inspection.dead_letter_counts(3, None) == ["dead letters: 3 in the journal"]


# ---------------------------------------------------------------- a federation over RabbitMQ


def write_config(path: Path, run: str, **strategy) -> Path:
    settings = {"min_clients": 1, "join_timeout_s": 1, "round_deadline_s": 30, **strategy}
    path.write_text(
        f"run: {run}\nclients: 1\nrounds: 1000\ntrain: {{epochs: 1, max_batches: 2}}\n"
        f"strategy: {json.dumps(settings)}\n"
    )
    return path


def spawn(out: Path, name: str, *args: str) -> subprocess.Popen:
    log = open(out / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "brokerfl.cli", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
    )


def until(what: str, probe, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.timeout(420)
def test_runs_shows_finished_aborted_and_crashed_runs(amqp_url, tmp_path, capsys):
    from brokerfl.cli import main
    from brokerfl.transports.amqp import AmqpTransport

    a_run, b_run = f"t{uuid.uuid4().hex[:10]}", f"t{uuid.uuid4().hex[:10]}"
    a_yaml = write_config(tmp_path / "a.yaml", a_run)
    b_yaml = write_config(tmp_path / "b.yaml", b_run, join_timeout_s=600)
    a, b = topology_for(load_config(a_yaml)), topology_for(load_config(b_yaml))
    broker = ["--broker", amqp_url]
    procs: list[subprocess.Popen] = []

    def asked(topology: RunTopology, message):
        with AmqpTransport(amqp_url) as transport:  # one per question: an idle one misses its heartbeats
            return ask(transport, topology, message, timeout=5)

    def status(topology: RunTopology) -> dict | None:
        reply = asked(topology, StatusRequest())
        return None if reply is None else reply.status

    def command(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = main([*args, *broker])
        return code, " ".join(capsys.readouterr().out.split())  # rich wraps lines

    def runs() -> dict:
        code, out = command("runs", "--json")
        assert code == 0
        return {r["run"]: r for r in json.loads(out)}

    try:
        # status --watch started before run B has a server: it waits for one
        watch = spawn(tmp_path, "watch", "status", str(b_yaml), *broker, "--watch", "--json", "--interval", "0.5")
        procs.append(watch)
        until("the watch's first view", lambda: _watched(tmp_path))

        procs.append(server_a := spawn(tmp_path, "server-a", "server", str(a_yaml), *broker, "--out", str(tmp_path)))
        procs.append(spawn(tmp_path, "client-a", "client", str(a_yaml), *broker, "--client-id", "0"))
        procs.append(
            server_b := spawn(tmp_path, "server-b", "server", str(b_yaml), *broker, "--out", str(tmp_path / "b"))
        )

        # run A trains: the open round has a deadline and time left
        trained = until(
            "run A at round 3",
            lambda: (s := _quietly(status, a)) is not None and s["round"] >= 3 and s["round_open"] and s,
        )
        assert trained["round_deadline"] > time.time() - 5 and 0 < trained["round_time_left_s"] <= 30

        # the watch saw no server first, then run B's server's view
        until("run B's server in the watch", lambda: (v := _watched(tmp_path)) and v[-1]["server"] is not None)
        views = _watched(tmp_path)
        assert views[0]["server"] is None and views[0]["silence"] == "absent"

        # run A's server killed mid-run: crashed; run B is waiting for its client
        server_a.send_signal(signal.SIGKILL)
        server_a.wait(timeout=30)
        listed = runs()
        assert listed[a_run]["state"] == "crashed" and "no server consumes" in listed[a_run]["reason"]
        # as of its newest record (one per stored version): at most a round behind the server's word
        assert listed[a_run]["round"] >= trained["round"] - 1 and listed[a_run]["rounds"] == 1000
        assert listed[a_run]["model_version"] >= trained["model_version"] - 1
        assert listed[a_run]["metric_name"] == "accuracy" and listed[a_run]["metric_value"] is not None
        assert listed[b_run]["state"] == "waiting" and listed[b_run]["round"] == 0

        # run B aborted (a hostile reason); the watch goes on polling the stopped server
        code, out = command("admin", "abort", "--run", b_run, "--reason", HOSTILE)
        assert code == 0, out
        assert server_b.wait(timeout=60) == 0
        polls = len(_watched(tmp_path))
        until("the watch polling the stopped server", lambda: len(_watched(tmp_path)) >= polls + 4)
        assert _watched(tmp_path)[-1]["silence"] == "stopped"
        for _ in range(3):  # status requests to a server that is not there are not sent
            assert asked(b, StatusRequest()) is None
        with AmqpTransport(amqp_url) as transport:
            assert transport.queue_info(b.dead_queue).messages_ready == 0
            assert transport.queue_info(b.server_queue).messages_ready == 0

        # run A started again, paused, then ended by set-rounds: finished
        procs.append(server_a := spawn(tmp_path, "server-a2", "server", str(a_yaml), *broker, "--out", str(tmp_path)))
        until("run A training again", lambda: (s := _quietly(status, a)) is not None and s["round_open"])
        assert asked(a, PauseRounds()).ok
        paused = until(
            "run A's open round to finish", lambda: (s := status(a)) is not None and not s["round_open"] and s
        )
        assert runs()[a_run]["state"] == "paused"
        assert asked(a, SetRounds(rounds=paused["round"])).ok
        assert server_a.wait(timeout=120) == 0

        listed = runs()
        assert listed[a_run]["state"] == "finished" and listed[a_run]["finished_at"] >= listed[a_run]["started_at"]
        assert listed[a_run]["reason"].startswith(f"{paused['round']} rounds done")
        assert listed[a_run]["round"] == paused["round"] and listed[a_run]["model_version"] == paused["model_version"]
        assert listed[b_run]["state"] == "aborted" and HOSTILE in listed[b_run]["reason"]

        # status of an ended run says how it ended
        code, out = command("status", str(a_yaml))
        assert f"run {a_run} finished at model version {listed[a_run]['model_version']}" in out
        code, out = command("status", str(b_yaml))
        assert f"run {b_run} aborted at model version 0" in out and "fake" in out

        # a deleted run is listed no more
        assert command("delete-run", str(a_yaml))[0] == 0
        assert a_run not in runs()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        with AmqpTransport(amqp_url) as transport:
            for topology, yaml in ((a, a_yaml), (b, b_yaml)):
                topology.delete(transport, load_config(yaml).client_ids())


def _quietly(status, topology):
    from brokerfl.transports.base import TransportError

    try:
        return status(topology)
    except TransportError:  # no server has declared the run yet
        return None


def _watched(out: Path) -> list[dict]:
    views = []
    for line in (out / "watch.log").read_text().splitlines():
        try:
            views.append(json.loads(line))
        except ValueError:
            continue  # a log line
    return views


def test_registry_stream_name_is_the_topologys():
    assert REGISTRY_STREAM == RunTopology("x").registry_spec().name
