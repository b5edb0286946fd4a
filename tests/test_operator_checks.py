"""What an operator meets, checked without a broker: admin commands and client ids are
validated against the federation, two processes with one client id are flagged, a
restarted server waits for the clients that are still members only (and says whom, and
that it is paused), reports show the broker-validated user beside what a message
claims, admin messages decode in ``inspect``, and the provisioned admin user has rights on
its vhost only."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from brokerfl.assembly.roles import coordinator_table, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.cli import main
from brokerfl.config import load_config
from brokerfl.handlers.workflows import admin as admin_handlers
from brokerfl.handlers.workflows import async_server, server
from brokerfl.handlers.workflows.server_state import JoinDeadline, RoundComplete
from brokerfl.runtime.handler_table import Context, Rejected, Started
from brokerfl.runtime.operator_commands import (
    AdminReply,
    AdminState,
    RemoveClient,
    SetMinClients,
    SetRounds,
    ShutdownClients,
)
from brokerfl.storage.accounting import account
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import MetricsLog
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.base import ORIGIN_USER_HEADER, REASON_HEADER, Delivery
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import ADMIN, routing_key
from brokerfl.wire.message import (
    Envelope,
    Heartbeat,
    Heartbeats,
    Join,
    ParameterUpdate,
    UpdateDropped,
    from_wire,
    process_instance,
    to_wire,
)

ROOT = Path(__file__).resolve().parents[1]
NOWHERE = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens: a command that connected would fail


class Server:
    """A server's handler table called directly (no worker, no transport)."""

    def __init__(self, clients: int = 4, module=server, **overrides) -> None:
        self.config = load_config(
            None, {"run": "ops", "clients": clients, "rounds": 5, "strategy.min_clients": 1, **overrides}
        )
        self.module = module
        self.table = coordinator_table(self.config, module)
        self.state = module.make_state(self.config, MemoryModelStore(), MetricsLog(None))

    def __call__(self, message):
        ctx = Context(
            role="server", run=self.config.run, state=self.state, log=structlog.get_logger(), clock=lambda: 0.0
        )
        message.run = message.run or self.config.run
        return [*ctx.also_send, *(self.table.handler_for(message.TYPE)(message, ctx) or [])]

    def reply(self, command) -> tuple[AdminReply, list]:
        out = self(command)
        return next(o.message for o in out if isinstance(o.message, AdminReply)), out


# ---------------------------------------------------------------- admin arguments


@pytest.mark.timeout(240)
def test_admin_commands_outside_the_federation_are_refused_and_change_nothing():
    run = Server(clients=4)
    run(Started(run="ops"))
    before = AdminState(**vars(run.state.admin))
    refused = [
        (RemoveClient(client_id="99"), "client 99 is not in the federation of run ops (client ids 0-3)"),
        (ShutdownClients(client_ids=["2", "99", "4"]), "clients 99, 4 are not in the federation"),
        (SetMinClients(min_clients=99), "min clients 99 is more than the 4 clients"),
    ]
    for command, text in refused:
        reply, out = run.reply(command)
        assert not reply.ok and text in reply.text, reply.text
        assert [o for o in out if o.dest == ADMIN] == []  # no new admin state
        assert not any(getattr(o.message, "TYPE", "") == "exit" for o in out)  # nobody told to exit
    assert run.state.admin == before and run.state.config.strategy.min_clients == 1

    assert run.reply(RemoveClient(client_id="3"))[0].ok
    reply, _ = run.reply(SetMinClients(min_clients=4))  # 3 of the 4 are left
    assert not reply.ok and "more than the 3 clients of the federation (1 removed)" in reply.text
    assert run.reply(SetMinClients(min_clients=3))[0].ok
    assert run.reply(ShutdownClients(client_ids=["0", "1"]))[0].ok


@pytest.mark.timeout(240)
def test_rounds_below_the_round_under_way_are_refused():
    run = Server(clients=2)
    run(Started(run="ops"))
    run.state.begun, run.state.round, run.state.round_open = True, 3, True
    reply, _ = run.reply(SetRounds(rounds=2))
    assert not reply.ok and "below round 3, already under way" in reply.text and run.state.config.rounds == 5
    reply, _ = run.reply(SetRounds(rounds=3))  # this round is the last
    assert reply.ok and run.state.config.rounds == 3 and not run.state.done


@pytest.mark.timeout(240)
def test_with_identity_enforced_only_the_admin_user_may_command():
    """The check is the server worker's inbox check (brokerfl.runtime.identity.server_inbox_check):
    a command from another user is dead-lettered, as refused, before any handler runs."""
    from brokerfl.assembly.roles import server_worker
    from brokerfl.runtime.identity import admin_user, client_user, server_user

    config = load_config(
        None, {"run": "ops", "clients": 2, "rounds": 5, "strategy.min_clients": 1, "identity.enforce": True}
    )
    broker = LocalBroker()
    topology = topology_for(config, journal=False)
    topology.declare_provisioned(LocalTransport(broker), config.client_ids())
    worker = server_worker(
        LocalTransport(broker, user=server_user("ops")), config, MemoryModelStore(), MetricsLog(None), journal=False
    )
    worker.start()
    for user in (client_user("ops", "0"), admin_user("ops")):
        LocalTransport(broker, user=user).publish(
            topology.exchange,
            routing_key("server", SetRounds.TYPE),
            *to_wire(SetRounds(rounds=9, run="ops", sender="admin:root@vm:1")),
        )
        while worker.step(0.0):
            pass
        assert worker.state.config.rounds == (5 if user != admin_user("ops") else 9)
    dead = LocalTransport(broker).get(topology.dead_queue)
    assert (
        dead is not None
        and "may come from the admin user 'ops-admin' only, not 'ops-client-0'" in dead.envelope.headers[REASON_HEADER]
    )
    assert worker.dead_letter_kinds == {"refused": 1}
    worker.transport.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("values", "text"),
    [
        (["remove-client", "99"], "client 99 not in the federation of run ops (client ids 0-3)"),
        (["shutdown-clients", "1,99"], "client 99 not in the federation"),
        (["set-min-clients", "99"], "min clients 99 is more than the 4 clients of run ops"),
    ],
)
def test_the_admin_cli_refuses_what_the_config_shows_wrong_before_sending(values, text, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("run: ops\nclients: 4\n")
    assert main(["admin", *values, "--config", str(config), "--broker", NOWHERE]) == 1  # never connected
    out = capsys.readouterr().out
    assert out.startswith("REFUSED (not sent): ") and text in out, out


# ---------------------------------------------------------------- client ids outside the federation


@pytest.mark.timeout(240)
def test_the_client_cli_refuses_an_id_outside_the_federation_before_connecting():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "brokerfl.cli",
            "client",
            "--clients",
            "3",
            "--run",
            "ops",
            "--client-id",
            "1,9",
            "--broker",
            NOWHERE,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 1
    assert "client id 9 not in the federation of run ops (its 3 clients are 0-2; see --clients)" in done.stderr, (
        done.stderr
    )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("module", [server, async_server], ids=["sync", "async"])
def test_the_server_refuses_joins_heartbeats_and_updates_of_ids_outside_the_federation(module):
    overrides = {"strategy.name": "fedbuff"} if module is async_server else {}
    run = Server(clients=3, module=module, **overrides)
    run(Started(run="ops"))
    for message in (
        Join(client_id="9", num_samples=5),
        Heartbeat(client_id="9", num_samples=5),
        Heartbeats(clients={"0": 5, "9": 5}),
        Join(client_id="01"),
    ):
        with pytest.raises(Rejected, match=r"is not in the federation of run ops \(client ids 0-2\)"):
            run(message)
    assert run.state.clients == {}  # nobody admitted, not even 0 of the refused Heartbeats
    run(Join(client_id="0", num_samples=5))
    assert list(run.state.clients) == ["0"]
    update = ParameterUpdate(
        client_id="9",
        task_id="t",
        parameters={},
        num_samples=1,
        round=run.state.round,
        model_version=run.state.model.version,
    )
    run.state.config = run.state.config.model_copy(update={"journal": True})
    out = run(update)
    drops = [o.message for o in out if isinstance(o.message, UpdateDropped)]
    assert [d.reason for d in drops] == ["client 9 is not in the federation of run ops (client ids 0-2)"]
    assert [o for o in out if not isinstance(o.message, UpdateDropped)] == []  # no task for it either


@pytest.mark.timeout(300)
def test_a_join_from_outside_is_dead_lettered_and_never_sampled_in_a_run():
    config = load_config(
        None,
        {
            "run": "ops-outsider",
            "clients": 3,
            "rounds": 2,
            "train.epochs": 1,
            "train.max_batches": 2,
            "strategy.join_timeout_s": 0.2,
        },
    )
    broker = LocalBroker()
    outsider = LocalTransport(broker)
    topology = topology_for(config)
    topology.declare(outsider)
    outsider.publish(
        topology.exchange,
        routing_key("server", Join.TYPE),
        *to_wire(Join(client_id="9", num_samples=100, run=config.run)),
    )

    result = simulate(config, broker=broker, journal=True)

    assert [r["num_updates"] for r in result.records] == [3, 3]
    journal = list(read_journal(LocalTransport(broker), topology))
    dead = [d for d in journal if d.routing_key.startswith("dead.")]
    assert [d.envelope.type for d in dead] == ["join"]
    assert (
        "Join: client 9 is not in the federation of run ops-outsider (client ids 0-2)"
        in dead[0].envelope.headers[REASON_HEADER]
    )
    tasks = [from_wire(d.envelope, d.body) for d in journal if d.envelope.type == "train_task"]
    assert tasks and all(t.participants == ["0", "1", "2"] for t in tasks)
    joins = [
        from_wire(d.envelope, d.body)
        for d in journal
        if d.envelope.type == "join" and not d.routing_key.startswith("dead.")
    ]
    assert {j.instance for j in joins if j.client_id != "9"} == {
        process_instance()
    }  # the clients say which process they are


# ---------------------------------------------------------------- one client id, two processes


@pytest.mark.timeout(240)
def test_process_instance_is_host_pid_random_and_made_once():
    instance = process_instance()
    host, pid, random = instance.rsplit(":", 2)
    assert host and int(pid) > 0 and re.fullmatch(r"[0-9a-f]{8}", random)
    assert process_instance() == instance
    child = subprocess.run(
        [sys.executable, "-c", "from brokerfl.wire.message import process_instance; print(process_instance())"],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert child.stdout.strip() not in ("", instance)


@pytest.mark.timeout(240)
def test_two_processes_with_one_client_id_are_flagged_once_and_shown_in_status():
    from rich.console import Console

    from brokerfl.cli.operate import render

    run = Server(clients=2, **{"strategy.min_clients": 2})
    run(Started(run="ops"))
    with capture_logs() as logs:
        run(Join(client_id="0", num_samples=5, instance="h:1:aa"))
        run(Heartbeats(clients={"1": 5}, instance="h:3:cc"))
        run(
            Heartbeat(client_id="0", num_samples=5, instance="h:2:bb")
        )  # a restart looks like this too: not flagged yet
        assert [e for e in logs if e["log_level"] == "warning" and "two processes" in e["event"]] == []
        for _ in range(3):  # the two take turns
            run(Heartbeat(client_id="0", num_samples=5, instance="h:1:aa"))
            run(Heartbeat(client_id="0", num_samples=5, instance="h:2:bb"))
    warnings = [e for e in logs if e["log_level"] == "warning" and "two processes" in e["event"]]
    assert (
        len(warnings) == 1 and warnings[0]["client"] == "0" and sorted(warnings[0]["instances"]) == ["h:1:aa", "h:2:bb"]
    )
    status = admin_handlers.status_of(run.state)
    clients = {c["id"]: c for c in status["clients"]}
    assert sorted(clients["0"]["duplicate"]) == ["h:1:aa", "h:2:bb"] and clients["1"]["duplicate"] is None
    console = Console(width=200, record=True)
    console.print(render({"server": status, "queues": {}, "journal_max_bytes": None, "journal_max_age": None}))
    text = console.export_text()
    assert "DUPLICATE: client 0 is claimed by two processes" in text and "live, duplicate" in text


@pytest.mark.timeout(240)
def test_a_restarted_client_process_is_not_a_duplicate():
    run = Server(clients=2)
    run(Started(run="ops"))
    with capture_logs() as logs:
        run(Join(client_id="0", num_samples=5, instance="h:1:aa"))
        for _ in range(3):
            run(Heartbeat(client_id="0", num_samples=5, instance="h:2:bb"))
        run(Heartbeat(client_id="0", num_samples=5))  # a sender that does not say
    assert not [e for e in logs if "two processes" in e["event"]]
    assert admin_handlers.status_of(run.state)["clients"][0]["duplicate"] is None


# ---------------------------------------------------------------- a restarted server's wait


@pytest.mark.timeout(240)
def test_a_restarted_server_waits_for_members_only_and_says_so():
    run = Server(clients=4, **{"strategy.min_clients": 2, "strategy.join_timeout_s": 3600})
    run.state.admin = AdminState(seq=3, removed={"3"})
    with capture_logs() as logs:
        run(Started(run="ops"))
    ready = next(e for e in logs if e["event"] == "server ready")
    assert ready["waiting_for"] == "0,1,2" and ready["removed"] == "3"
    for cid in ("0", "1"):
        assert run(Heartbeat(client_id=cid, num_samples=5)) == [] and not run.state.begun
    out = run(Heartbeat(client_id="2", num_samples=5))  # every member live: no join timeout
    assert run.state.begun and run.state.round == 1
    assert [o.message.participants for o in out if o.message.TYPE == "train_task"] == [["0", "1", "2"]]


@pytest.mark.timeout(240)
def test_a_server_started_paused_says_what_it_waits_for():
    run = Server(clients=2, **{"strategy.join_timeout_s": 3600})
    run.state.admin = AdminState(seq=1, paused=True)
    with capture_logs() as logs:
        run(Started(run="ops"))
        run(Join(client_id="0", num_samples=5))
        run(Join(client_id="1", num_samples=5))
    paused = [e for e in logs if e["event"].startswith("paused:")]
    assert paused[0]["log_level"] == "warning" and "waiting for `admin resume`" in paused[0]["event"]
    assert run.state.begun and not run.state.round_open  # begun, but no round until resume
    with capture_logs() as logs:  # had it not begun: the join deadline names who is missing
        run.state.begun = False
        run.state.clients.pop("1")
        run(JoinDeadline(run="ops"))
    waiting = next(e for e in logs if "waiting" in e["event"] or "without every client" in e["event"])
    assert waiting.get("missing", waiting.get("waiting_for")) == "1"


# ---------------------------------------------------------------- who sent it: validated user, then the claim


def _delivery(message, user: str, key: str = "server.x", headers: dict | None = None) -> Delivery:
    envelope, body = to_wire(message)
    envelope = Envelope(
        envelope.type,
        envelope.message_id,
        envelope.sender,
        envelope.timestamp,
        {**envelope.headers, **(headers or {})},
        user_id=user,
    )
    return Delivery("journal", "ex", key, envelope, body, False, None)


@pytest.mark.timeout(240)
def test_accounting_and_inspect_show_the_validated_user_and_the_claim_beside_it():
    from brokerfl.ops import inspection as inspect

    command = SetRounds(rounds=3, sender="admin:root@vm:42", run="ops")
    reply = AdminReply(
        command="set_rounds", command_id=command.message_id, by=command.sender, ok=True, text="rounds 5 -> 3", run="ops"
    )  # no user: an older server's
    honest = ParameterUpdate(client_id="0", task_id="t", parameters={}, num_samples=1, sender="ops-client-0")
    lost = ParameterUpdate(client_id="1", task_id="t", parameters={}, num_samples=1, sender="client.1")
    journal = [
        _delivery(command, "ops-admin"),
        _delivery(reply, "ops-server", "audit.admin_reply"),
        _delivery(honest, "ops-client-0"),
        _delivery(lost, "ops-client-1"),
    ]
    summary = account(journal, [{"version": 1, "update_ids": [honest.message_id]}]).summary()
    assert "set_rounds by user ops-admin (claims admin:root@vm:42) at round 0: ok: rounds 5 -> 3" in summary
    assert f"UNACCOUNTED {lost.message_id} from user ops-client-1 (claims client.1)" in summary
    assert "published by ops-client-0: 1 updates, 1 folded" in summary  # the existing lines stay

    described = inspect.describe(journal[0])
    assert "from user ops-admin (claims admin:root@vm:42)" in described and "rounds: 3" in described
    assert "from user ops-client-0," in inspect.describe(journal[2])  # no claim shown where they agree
    dead = _delivery(
        lost, "ops-server", "dead.parameter_update", {REASON_HEADER: "NaN", ORIGIN_USER_HEADER: "ops-client-1"}
    )
    report = inspect.journal_report([dead], run="ops")
    assert f"{lost.message_id} from user ops-client-1 (claims client.1): NaN" in report
    # a client's own dead.* message names whoever it likes in the header: not shown as a publisher
    framed = _delivery(
        lost, "ops-client-0", "dead.parameter_update", {REASON_HEADER: "NaN", ORIGIN_USER_HEADER: "ops-client-1"}
    )
    report = inspect.journal_report([framed], run="ops")
    assert "user ops-client-1" not in report
    assert (
        f"{lost.message_id} from user ? (claims client.1), dead-lettered by user ops-client-0 (the original's "
        "publisher is not verified): NaN" in report
    )
    # nor does accounting take it as the update's dead letter
    assert account([framed], [], run="ops").dead == {} and account([dead], [], run="ops").dead == {
        lost.message_id: ["NaN"]
    }


@pytest.mark.timeout(240)
def test_inspect_decodes_the_operators_messages_in_a_fresh_process():
    """brokerfl.ops.inspection alone (as ``brokerfl inspect`` loads it) knows every admin type."""
    program = r"""
import brokerfl.ops.inspection as inspect
from brokerfl.wire.message import MESSAGE_TYPES
from brokerfl.transports.base import Delivery
from brokerfl.wire.message import to_wire
names = ["abort_run", "pause_rounds", "resume_rounds", "remove_client", "set_min_clients", "set_rounds",
"shutdown_clients", "admin_reply", "admin_state_record", "status_request", "status_reply"]
missing = [n for n in names if n not in MESSAGE_TYPES]
assert not missing, missing
samples = {"remove_client": {"client_id": "2"}, "set_min_clients": {"min_clients": 2}, "set_rounds": {"rounds": 4},
"shutdown_clients": {"client_ids": ["1"]},
           "admin_reply": {"command": "set_rounds", "command_id": "c", "by": "admin:x", "ok": True, "text": "fine",
           "user": "ops-admin"},
           "admin_state_record": {"seq": 2, "paused": True, "removed": ["3"], "min_clients": None, "rounds": 7},
           "status_reply": {"status": {"round": 1}}}
for name in names:
    envelope, body = to_wire(MESSAGE_TYPES[name](**samples.get(name, {})))
    text = inspect.describe(Delivery("journal", "ex", "server." + name, envelope, body, False, None))
    assert "does not decode" not in text, text
    print(text.splitlines()[0])
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 11


# ---------------------------------------------------------------- provisioning


@pytest.mark.timeout(240)
def test_the_provisioned_admin_has_no_broker_wide_tag_and_the_import_path_is_absolute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["provision", "--run", "ops", "--clients", "2", "--out", "fed"]) == 0
    out = capsys.readouterr().out
    definitions = json.loads((tmp_path / "fed" / "definitions.json").read_text())
    tags = {u["name"]: u["tags"] for u in definitions["users"]}
    assert tags == {
        "ops-server": [],
        "ops-client-0": [],
        "ops-client-1": [],
        "ops-admin": ["management"],
    }  # management: its vhost in the HTTP API, nothing broker-wide
    assert {(p["user"], p["vhost"]) for p in definitions["permissions"]} >= {
        ("ops-admin", "ops")
    }  # rights on its vhost only
    assert f"rabbitmqctl import_definitions {tmp_path / 'fed' / 'definitions.json'}" in out


def test_the_docs_import_definitions_by_an_absolute_path():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    # rabbitmqctl resolves a relative path against the broker node's directory, not the shell's
    paths = [
        (page.name, path)
        for page in pages
        for path in re.findall(r"rabbitmqctl import_definitions (\S+)", page.read_text())
        if "definitions.json" in path
    ]
    assert paths
    for page, path in paths:
        assert path.startswith(('"$PWD/', "$PWD/", "$(realpath", "/")), f"{page}: {path}"


@pytest.mark.timeout(240)
def test_removing_the_last_participant_still_training_closes_the_round_when_the_others_answered_or_failed():
    run = Server(clients=3)
    run(Started(run="ops"))
    state = run.state
    state.begun, state.round, state.round_open = True, 1, True
    state.participants, state.answered, state.failed = ["0", "1", "2"], {"0"}, {"1"}  # 1's training failed
    ctx = Context(role="server", run="ops", state=state, log=structlog.get_logger(), clock=lambda: 0.0)
    run.table.handler_for(RemoveClient.TYPE)(RemoveClient(client_id="2", run="ops"), ctx)
    closing = [t for t in ctx.timer_requests if not isinstance(t, str) and isinstance(t.message, RoundComplete)]
    assert closing and closing[0].due == 0.0 and state.participants == ["0", "1"]
