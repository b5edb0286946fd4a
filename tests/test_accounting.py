"""The accounting check, on a simulated run with its journal, and on doctored inputs."""

from __future__ import annotations

import time

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.storage.accounting import account, account_run
from brokerfl.transports.base import REASON_HEADER, Delivery
from brokerfl.transports.local import LocalTransport
from brokerfl.wire.message import Envelope, ParameterUpdate, UpdateDropped, to_wire


def test_a_clean_simulated_run_accounts_for_every_update():
    import structlog

    config = load_config(None, {"rounds": 3, "clients": 4})
    with structlog.testing.capture_logs() as logs:
        result = simulate(config, journal=True)
    assert not any(e["event"].startswith("journal retention") for e in logs)  # it fits: no warning
    report = account_run(LocalTransport(result.broker), topology_for(config), result.store)
    assert report.ok and report.cut_at is None, report.summary()
    assert len(report.sent) == 12 and report.versions == 4  # version 0 holds no update
    assert "OK" in report.summary()


def _journaled(message, key):
    envelope, body = to_wire(message)
    return Delivery("journal", "x", key, envelope, body, False, 0)


def _update(uid):
    return ParameterUpdate(message_id=uid, sender="client.0", client_id="0", task_id="t", parameters={}, num_samples=1)


def test_counted_twice_unaccounted_and_dropped_are_told_apart():
    journal = [
        _journaled(_update("a"), "server.parameter_update"),
        _journaled(_update("b"), "server.parameter_update"),
        _journaled(_update("c"), "server.parameter_update"),
        _journaled(_update("d"), "server.parameter_update"),
        _journaled(_update("e"), "server.parameter_update"),
        _journaled(UpdateDropped(update_id="c", client_id="0", reason="late: round 3 closed"), "audit.update_dropped"),
    ]
    envelope, body = to_wire(_update("d"))
    dead = Envelope(
        envelope.type, envelope.message_id, envelope.sender, time.time(), {**envelope.headers, REASON_HEADER: "NaN"}
    )
    journal.append(Delivery("journal", "x", "dead.parameter_update", dead, body, False, 0))
    versions = [{"version": 1, "update_ids": ["a", "b"]}, {"version": 2, "update_ids": ["b"]}]
    report = account(journal, versions)
    assert not report.ok
    assert report.counted_twice == {"b": [1, 2]}
    assert report.unaccounted == ["e"]
    assert report.dropped["c"] == ["late: round 3 closed"] and report.dead["d"] == ["NaN"]
    text = report.summary()
    assert "COUNTED TWICE b" in text and "UNACCOUNTED e" in text and "FAILED" in text


def test_a_journal_cut_by_retention_is_named_not_listed_as_missing_updates():
    """A run bigger than journal_max_bytes: the server warns at start, and accounting says
    where retention cut the journal instead of listing updates as missing."""
    import structlog

    config = load_config(
        None, {"rounds": 3, "clients": 4, "journal_max_bytes": 400_000}
    )  # a model is ~69 kB; the run ~1.1 MB
    with structlog.testing.capture_logs() as logs:
        result = simulate(config, journal=True)
    assert any(
        e["event"].startswith("journal retention: the journal will hold about") and e["log_level"] == "warning"
        for e in logs
    )
    report = account_run(LocalTransport(result.broker), topology_for(config), result.store)
    summary = report.summary()
    assert report.cut_at is not None and report.cut_at > 0, summary
    assert f"the journal's start was cut by retention at version {report.cut_at}" in summary
    assert "folded but not in the journal" not in summary and report.ok and "PARTIAL" in summary


def test_accounting_reads_a_journal_file_written_by_simulate(tmp_path, capsys):
    """``accounting --journal FILE`` needs no broker: the versions come from the file's
    version records, as ``replay`` reads them."""
    from brokerfl.cli import main

    journal = tmp_path / "journal.bin"
    assert (
        main(
            [
                "simulate",
                "--rounds",
                "2",
                "--clients",
                "3",
                "--out",
                str(tmp_path),
                "--journal",
                str(journal),
                "--no-progress",
                "--log-level",
                "warning",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["accounting", "--journal", str(journal)]) == 0
    out = capsys.readouterr().out
    assert "updates sent: 6 over 3 model versions" in out and "folded into exactly one version: 6" in out
    assert main(["accounting", "--journal", str(tmp_path / "metrics.jsonl")]) == 2  # not a journal: one clear line
    assert "is not a brokerfl journal file" in capsys.readouterr().err
