"""Logs are JSON lines when asked (and when stderr is not a terminal), with the worker's
bindings: run, role, client, round and message id."""

from __future__ import annotations

import json

import structlog

from brokerfl.runtime.log import configure_logging


def test_json_lines_carry_the_bindings(capsys):
    configure_logging("info", log_format="json")
    structlog.get_logger("brokerfl").bind(run="r1", role="client.3", client="3").bind(round=2, message_id="m1").info(
        "update sent", bytes=10
    )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    record = json.loads(line)
    assert {k: record[k] for k in ("run", "role", "client", "round", "message_id", "event", "level")} == {
        "run": "r1",
        "role": "client.3",
        "client": "3",
        "round": 2,
        "message_id": "m1",
        "event": "update sent",
        "level": "info",
    }
    assert record["timestamp"].endswith("Z")


def test_console_when_asked(capsys, monkeypatch):
    monkeypatch.setenv("BROKERFL_LOG_FORMAT", "console")
    configure_logging("info")
    structlog.get_logger("brokerfl").bind(run="r1").info("hello")
    err = capsys.readouterr().err
    assert "hello" in err and "run=r1" in err and not err.lstrip().startswith("{")


def test_a_process_of_many_logical_clients_logs_their_warnings_only(capsys):
    """Each logical client's lifecycle lines are four a round: a process of thousands keeps
    to their warnings (``PER_CLIENT_LINES_MAX``), whatever its own level."""
    from brokerfl.assembly.roles import client_worker
    from brokerfl.config import load_config
    from brokerfl.transports.local import LocalBroker, LocalTransport

    configure_logging("info", log_format="json")
    config = load_config(None).model_copy(update={"run": "quiet-clients"})
    loud = client_worker(LocalTransport(LocalBroker()), config, "0")
    quiet = client_worker(LocalTransport(LocalBroker()), config, "1", warnings_only=True)
    for worker in (loud, quiet):
        worker.log.info("round 1: task received", round=1)
        worker.log.warning("round 1: task refused", round=1)
    lines = [json.loads(line) for line in capsys.readouterr().err.strip().splitlines()]
    assert [(r["client"], r["event"]) for r in lines] == [
        ("0", "round 1: task received"),
        ("0", "round 1: task refused"),
        ("1", "round 1: task refused"),
    ]
