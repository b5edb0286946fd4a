"""Replay: every version recomputed hash for hash; a doctored update shows up as the first
DIFF at its version; a what-if with the median reports both models' accuracies."""

from __future__ import annotations

import numpy as np
import pytest

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.cli import main
from brokerfl.config import load_config
from brokerfl.ops.replay import replay
from brokerfl.storage.journal import read_journal, read_journal_file, write_journal_file
from brokerfl.transports.base import Delivery
from brokerfl.transports.local import LocalTransport
from brokerfl.wire.message import ParameterUpdate, from_wire, to_wire


@pytest.fixture(scope="module")
def journal_file(tmp_path_factory):
    """A 10-round simulated run, its journal written to a file."""
    path = tmp_path_factory.mktemp("journal") / "run.journal"
    config = load_config("configs/digits_fedavg.yaml", {"rounds": 10, "clients": 5})
    result = simulate(config, journal=True)
    write_journal_file(path, config.run, read_journal(LocalTransport(result.broker), topology_for(config)))
    return path, config, result


def test_replay_check_reports_every_version_ok(journal_file, capsys):
    path, config, result = journal_file
    replayed = replay(read_journal_file(path), config)
    assert replayed.ok
    assert [row.version for row in replayed.rows] == list(range(0, 11))
    assert [row.replayed_hash for row in replayed.rows[1:]] == [r["sha256"] for r in result.records]
    assert main(["replay", "configs/digits_fedavg.yaml", "--clients", "5", "--journal", str(path), "--check"]) == 0
    assert capsys.readouterr().out.count(" OK") == 11


def test_a_doctored_update_is_the_first_diff_at_its_version(journal_file, tmp_path, capsys):
    path, config, _ = journal_file
    records = list(read_journal_file(path))
    # alter the first update folded into version 4: one weight, a little
    version_4 = next(
        from_wire(d.envelope, d.body)
        for d in records
        if d.envelope.type == "model_version_stored" and from_wire(d.envelope, d.body).version == 4
    )
    target = version_4.update_ids[0]
    doctored = []
    for d in records:
        if d.envelope.message_id == target and d.envelope.type == ParameterUpdate.TYPE:
            update = from_wire(d.envelope, d.body)
            update.parameters = {k: np.array(v) for k, v in update.parameters.items()}
            update.parameters["0.weight"][0, 0] += 0.01
            envelope, body = to_wire(update)
            d = Delivery(d.queue, d.exchange, d.routing_key, envelope, body, False, d.tag)
        doctored.append(d)
    bad = tmp_path / "doctored.journal"
    write_journal_file(bad, config.run, doctored)
    result = replay(read_journal_file(bad), config)
    assert result.first_diff().version == 4
    assert [row.ok for row in result.rows[:4]] == [True] * 4
    assert main(["replay", "configs/digits_fedavg.yaml", "--clients", "5", "--journal", str(bad), "--check"]) == 1
    assert "DIFF: first at version 4" in capsys.readouterr().err


def test_what_if_median_prints_both_accuracies(journal_file, capsys):
    path, config, result = journal_file
    assert (
        main(
            [
                "replay",
                "configs/digits_fedavg.yaml",
                "--clients",
                "5",
                "--journal",
                str(path),
                "--strategy",
                "median",
                "--from-version",
                "8",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "median acc" in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("8 ", "9 ", "10 "))]
    assert len(lines) == 3
    stored_final = f"{result.records[-1]['accuracy']:.4f}"
    assert stored_final in lines[-1]  # the original model's accuracy beside the median's


def test_a_journal_file_that_is_not_one_is_a_clear_error(tmp_path):
    from brokerfl.transports.base import TransportError

    junk = tmp_path / "junk"
    junk.write_bytes(b"\x93\x01\x02")
    with pytest.raises(TransportError, match="not a brokerfl journal"):
        list(read_journal_file(junk))


def test_a_resumed_server_journals_its_newest_version_again(journal_file):
    """A server killed -9 between storing a version and journaling it left the journal
    without that version's record: the server that resumes writes it (replay needs it)."""
    import structlog

    from brokerfl.assembly.roles import coordinator_table
    from brokerfl.handlers.workflows import server
    from brokerfl.runtime.handler_table import Context, Started
    from brokerfl.storage.metrics_log import MetricsLog
    from brokerfl.storage.store import MemoryModelStore
    from brokerfl.wire.message import ModelVersionStored

    _, config, result = journal_file
    store = MemoryModelStore()
    for version in result.store.versions()[:4]:
        store.put(result.store.get(version))
    newest = store.get(3)
    newest.metrics = {
        **newest.metrics,
        "accuracy": None,
        "loss": None,
    }  # killed before its score (evaluation runs after the store)
    state = server.make_state(config, store, MetricsLog(None))
    ctx = Context(role="server", run=config.run, state=state, log=structlog.get_logger(), clock=lambda: 0.0)
    coordinator_table(config, server).handler_for(Started.TYPE)(Started(run=config.run), ctx)
    journaled = [o.message for o in ctx.also_send if isinstance(o.message, ModelVersionStored)]
    assert [(r.version, r.sha256) for r in journaled] == [(3, result.store.get(3).sha256)]
    assert from_wire(*to_wire(journaled[0])).version == 3  # a record every journal reader can decode


def test_a_repeated_version_record_is_not_a_skipped_record(journal_file):
    path, config, _ = journal_file
    records = list(read_journal_file(path))
    first = next(
        d for d in records if d.envelope.type == "model_version_stored" and from_wire(d.envelope, d.body).version == 6
    )
    record = from_wire(first.envelope, first.body)
    fields = {
        k: getattr(record, k)
        for k in ("round", "model_version", "version", "parent", "strategy", "update_ids", "sha256", "metrics")
    }
    envelope, body = to_wire(type(record)(**fields))  # the same record, written again by another process
    assert envelope.message_id != first.envelope.message_id
    again = Delivery(first.queue, first.exchange, first.routing_key, envelope, body, False, first.tag)
    at = records.index(first) + 1
    replayed = replay([*records[:at], again, *records[at:]], config)
    assert replayed.ok and len(replayed.rows) == 11 and replayed.skipped.total == 0


def test_a_version_record_ahead_of_its_updates_waits_for_them(journal_file):
    """The journal's copy of an update can land after the record of the version it went into
    (the server read it from its queue first): replay waits for it instead of a DIFF."""
    path, config, _ = journal_file
    records = list(read_journal_file(path))
    record_4 = next(
        d for d in records if d.envelope.type == "model_version_stored" and from_wire(d.envelope, d.body).version == 4
    )
    first_update = min(
        records.index(d)
        for d in records
        if d.envelope.message_id in from_wire(record_4.envelope, record_4.body).update_ids
    )
    reordered = [d for d in records if d is not record_4]
    reordered.insert(first_update, record_4)
    replayed = replay(reordered, config)
    assert replayed.ok and [row.version for row in replayed.rows] == list(range(0, 11)), replayed.table()


def test_a_duplicate_dropped_before_its_version_is_recorded_is_not_lost(journal_file):
    """A redelivered copy of an update folded into version 4, dropped as a duplicate after
    the version was stored but before its record reached the journal (the record follows
    the next round's task): replay still finds the first copy."""
    from brokerfl.wire.message import UpdateDropped

    path, config, _ = journal_file
    records = list(read_journal_file(path))
    record_4 = next(
        d for d in records if d.envelope.type == "model_version_stored" and from_wire(d.envelope, d.body).version == 4
    )
    folded = from_wire(record_4.envelope, record_4.body).update_ids[0]
    envelope, body = to_wire(
        UpdateDropped(
            update_id=folded,
            client_id="0",
            reason="duplicate: already folded into a stored model version",
            round=4,
            model_version=3,
        )
    )
    drop = Delivery(record_4.queue, record_4.exchange, record_4.routing_key, envelope, body, False, record_4.tag)
    at = records.index(record_4)
    replayed = replay([*records[:at], drop, *records[at:]], config)
    assert replayed.ok and len(replayed.rows) == 11, replayed.table()
