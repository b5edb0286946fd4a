"""Replay: every version recomputed hash for hash; a doctored update shows up as the first
DIFF at its version; a what-if with the median reports both models' accuracies."""

from __future__ import annotations

import numpy as np
import pytest

from brokerfl.cli import main
from brokerfl.config import load_config
from brokerfl.journal import read_journal, read_journal_file, write_journal_file
from brokerfl.message import ParameterUpdate, from_wire, to_wire
from brokerfl.replay import replay
from brokerfl.roles import topology_for
from brokerfl.simulate import simulate
from brokerfl.transport import Delivery
from brokerfl.transports.local import LocalTransport


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
    version_4 = next(from_wire(d.envelope, d.body) for d in records if d.envelope.type == "model_version_stored" and from_wire(d.envelope, d.body).version == 4)
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
    assert main(["replay", "configs/digits_fedavg.yaml", "--clients", "5", "--journal", str(path), "--strategy", "median", "--from-version", "8"]) == 0
    out = capsys.readouterr().out
    assert "median acc" in out
    lines = [line for line in out.splitlines() if line.strip().startswith(("8 ", "9 ", "10 "))]
    assert len(lines) == 3
    stored_final = f"{result.records[-1]['accuracy']:.4f}"
    assert stored_final in lines[-1]  # the original model's accuracy beside the median's


def test_a_journal_file_that_is_not_one_is_a_clear_error(tmp_path):
    from brokerfl.transport import TransportError

    junk = tmp_path / "junk"
    junk.write_bytes(b"\x93\x01\x02")
    with pytest.raises(TransportError, match="not a brokerfl journal"):
        list(read_journal_file(junk))
