"""Logs an operator can follow: every process logs its lifecycle at info, the server says
whom an open round waits for and sums each round up in one line, and every process
publishes its log to the run's logs stream, which ``brokerfl logs`` reads from another
process (filtered by client, control characters escaped, each record attributed by the
routing key it came under, not by what it says of itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import structlog
import yaml
from cli_processes import kill_the_rest, outputs_at_the_end, start_brokerfl

from brokerfl.ops.remote_logs import parse_since, printable, records, render, site_of_key, wanted
from brokerfl.runtime.handler_table import compose
from brokerfl.runtime.log import LogBuffer, bounded_record, configure_logging, install_buffer
from brokerfl.runtime.remote_log import SHIPPING, LogRecords, ShipLogs, ShipperState, site_of
from brokerfl.transports.base import Delivery
from brokerfl.wire.message import to_wire

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- units


def test_a_record_copied_for_the_broker_is_bounded():
    record = bounded_record(
        {"event": "x" * 5000, "client": "3", "n": 7, "ok": True, **{f"k{i}": i for i in range(100)}}, "info"
    )
    assert record["level"] == "info" and isinstance(record["time"], float)
    assert len(record["event"]) <= 300 and record["client"] == "3" and record["n"] == 7 and record["ok"] is True
    assert record["truncated"] is True and len(record) <= 24 + 3
    assert len(json.dumps(record)) < 16_000


def test_the_buffer_drops_its_oldest_and_counts_them():
    buffer = LogBuffer(size=3)
    for n in range(5):
        buffer.add({"event": f"line {n}"})
    records_, dropped = buffer.take(10)
    assert [json.loads(r)["event"] for r in records_] == ["line 2", "line 3", "line 4"] and dropped == 2
    assert buffer.take(10) == ([], 0)


def test_what_is_logged_is_copied_into_the_installed_buffer_only(capsys):
    configure_logging("info", log_format="json")
    buffer = LogBuffer()
    install_buffer(buffer)
    try:
        log = structlog.get_logger("brokerfl").bind(run="r1", role="client.3", client="3")
        log.info("round 1: training", round=1)
        log.debug("not at info")
    finally:
        install_buffer(None)
    log.info("after")
    texts, _ = buffer.take(10)
    assert [json.loads(t)["event"] for t in texts] == ["round 1: training"]
    assert json.loads(texts[0])["client"] == "3"
    assert "round 1: training" in capsys.readouterr().err  # stderr as ever


def test_the_shipper_sends_what_was_logged_in_batches_under_its_site():
    from brokerfl.runtime.handler_table import Context

    buffer = LogBuffer()
    for n in range(450):
        buffer.add({"event": f"line {n}"})
    state = ShipperState(buffer, site_of("client", ["7"]))
    table = compose("log-shipper", SHIPPING)
    ctx = Context(role="client.7-log", run="r", state=state, log=structlog.get_logger(), clock=time.monotonic)
    out = list(table.handler_for(ShipLogs.TYPE)(ShipLogs(), ctx) or ())
    assert [o.dest for o in out] == ["client.7"] * 3
    assert [len(o.message.records) for o in out] == [200, 200, 50]
    assert ctx.timer_requests[0].key == "ship"  # and again in a second
    assert site_of("server", []) == "server" and site_of("client", ["1", "2"]) == "clients"
    # a batch that cannot be published is counted as lost, and shipping backs off
    buffer.add({"event": "late"})
    ctx = Context(role="client.7-log", run="r", state=state, log=structlog.get_logger(), clock=time.monotonic)
    assert len(list(table.handler_for(ShipLogs.TYPE)(ShipLogs(), ctx) or ())) == 1
    for effect in ctx.when_not_sent:
        effect(RuntimeError("no exchange"))
    assert state.failures == 1 and state.next_in() == 2.0 and buffer.take(10) == ([], 1)


def _delivery(routing_key: str, message, user: str = "") -> Delivery:
    envelope, body = to_wire(message)
    from dataclasses import replace

    return Delivery(
        queue="q",
        exchange="x",
        routing_key=routing_key,
        envelope=replace(envelope, user_id=user),
        body=body,
        redelivered=False,
        tag=1,
    )


def test_a_record_is_the_sites_its_routing_key_names_whatever_it_claims():
    forged = json.dumps({"time": 1.0, "level": "info", "event": "hello", "role": "server", "client": "9"})
    batch = LogRecords(records=[forged, "not json"], dropped=2)
    shown = list(records([_delivery("client.2.log_records", batch)], "r", enforce_identity=False))
    assert [r["client"] for r in shown] == ["2", "2"] and shown[0]["site"] == "client.2"
    assert "2 log records lost" in shown[1]["event"]
    # with identity enforced, the publisher's broker user must be the site's
    assert not list(records([_delivery("client.2.log_records", batch, "r-client-3")], "r", enforce_identity=True))
    assert list(records([_delivery("client.2.log_records", batch, "r-client-2")], "r", enforce_identity=True))
    assert not list(records([_delivery("server.log_records", batch, "r-client-2")], "r", enforce_identity=True))
    assert site_of_key("client.a.b.log_records") is None and site_of_key("audit.x") is None


def test_rendering_escapes_what_a_client_wrote():
    line = render(
        {"time": 0.0, "level": "error", "site": "client.2", "event": "boom\x1b[31m\r\nfake", "why": "[bold]x\u202e"}
    )
    assert "\x1b" not in line and "\r" not in line and "\u202e" not in line and "\n" not in line
    assert "\\x1b[31m" in line and "[bold]x\\u202e" in line
    assert printable("a" * 1000).endswith("...")


def test_filters_and_since():
    assert wanted({"site": "client.2"}, client="2") and not wanted({"site": "client.12"}, client="2")
    assert wanted({"site": "clients", "client": "2"}, client="2") and not wanted({"site": "server"}, client="2")
    assert wanted({"site": "server"}, server=True) and not wanted({"site": "client.1"}, server=True)
    assert parse_since("10m", now=1000.0) == 400.0 and parse_since("2h", now=10_000.0) == 2800.0
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")


# ---------------------------------------------------------------- a run over RabbitMQ


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, request):
    """A server and 3 client processes, 2 rounds, client 2 slow (its rounds wait for it),
    with JSON logs; then ``brokerfl logs`` from another process. Deleted at the end."""
    url = os.environ.get("BROKERFL_AMQP_URL")
    if not url:
        pytest.skip("needs BROKERFL_AMQP_URL")
    out = tmp_path_factory.mktemp("logged")
    run = "t" + uuid.uuid4().hex[:10]
    config = {
        "run": run,
        "app": "tests.slow_apps",
        "app_options": {"train_s": 0.2},
        "clients": 3,
        "rounds": 2,
        "client_slowdown": {"2": 25},  # about 5 s a round: the others answer at once
        "strategy": {"round_deadline_s": 8},  # a "waiting for" line at the half-deadline
        "liveness": {"heartbeat_s": 1},
    }
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "BROKERFL_AMQP_URL": url, "BROKERFL_LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    procs = [start_brokerfl("server", str(path), "--out", str(out / "server"), env=env)]
    procs += [start_brokerfl("client", str(path), "--client-id", cid, env=env) for cid in "012"]
    try:
        outputs = outputs_at_the_end(procs, timeout=240)
        assert all(p.returncode == 0 for p in procs), outputs
        logs = {
            name: subprocess.run(
                [sys.executable, "-m", "brokerfl.cli", "logs", str(path), *extra],
                cwd=ROOT,
                env={**env, "BROKERFL_LOG_FORMAT": "console"},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            for name, extra in {"client 2": ["--client", "2"], "server": ["--server", "--json"]}.items()
        }
        yield outputs, logs
    finally:
        kill_the_rest(procs)
        from brokerfl.transports.amqp import AmqpTransport
        from brokerfl.transports.topology import RunTopology

        with AmqpTransport(url) as cleaner:
            RunTopology(run).delete(cleaner, ["0", "1", "2"])
            with pytest.raises(Exception, match="no queue"):  # the logs stream went with the run
                cleaner.queue_info(RunTopology(run).logs_stream)


def _events(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_each_client_logs_its_lifecycle_at_info(logged_run):
    outputs, _ = logged_run
    for output in outputs[1:]:
        events = [e["event"] for e in _events(output)]
        for wanted_event in (
            "starting",
            "connected",
            "ready: the app is loaded",
            "joined: Join sent to the server",
            "round 1: task received",
            "round 1: training",
            "round 1: update sent",
            "round 2: update sent",
            "Exit received: stopping",
            "stopping",
        ):
            assert wanted_event in events, (wanted_event, events)
        assert events.index("starting") < events.index("ready: the app is loaded")
        sent = next(e for e in _events(output) if e["event"] == "round 1: update sent")
        assert sent["bytes"] == 16 and sent["train_s"] > 0 and "train_loss" in sent


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_the_server_names_whom_a_round_waits_for_and_sums_each_round_up(logged_run):
    outputs, _ = logged_run
    events = _events(outputs[0])
    started = [e for e in events if e["event"] == "round 1 started"]
    assert started and started[0]["sampled"] == "0,1,2"
    waiting = [e for e in events if e["event"].startswith("round 1: waiting for")]
    assert waiting and waiting[0]["waiting_for"] == "2" and waiting[0]["deadline_in_s"] > 0
    closed = [e for e in events if e["event"].startswith("round ") and " closed" in e["event"]]
    assert [(e["round"], e["updates"], e["dropped"]) for e in closed] == [(1, "3/3", 0), (2, "3/3", 0)]
    assert all(e["duration_s"] > 0 and "loss" in e for e in closed)
    assert [e["client"] for e in events if e["event"] == "client joined"] != []


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_brokerfl_logs_prints_client_2s_lines_and_only_those(logged_run):
    _, logs = logged_run
    shown = logs["client 2"]
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines and all(" client.2 " in line for line in lines), lines
    for event in ("starting", "round 1: training", "round 2: update sent", "Exit received: stopping"):
        assert any(f" {event}" in line for line in lines), (event, lines)
    server = logs["server"]
    assert server.returncode == 0, server.stderr
    records_ = [json.loads(line) for line in server.stdout.splitlines()]
    assert records_ and {r["site"] for r in records_} == {"server"}
    assert any(r["event"].startswith("round 1: waiting for") and r["waiting_for"] == "2" for r in records_)
