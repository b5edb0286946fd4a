"""Secure aggregation over the real broker: a federation of processes whose clients kill -9
themselves at a stage of a secure round (``tests/secure_dropouts.py``), a round with too few
revealers, identity enforced on every stage message, and a masked vector larger than a
chunk. Each checks that no update was lost or counted twice.

Decisions: one federation of processes shows both dropout cases, a round each (starting ten
client processes is most of such a test's time). The identity test runs
its federation in threads (as ``test_security`` does), each worker on its own provisioned
user's connection: a forgery made inside client 2's stage handler then reaches the server
while client 2's own message is held back, i.e. when the server would take it.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_faults import ROOT, Federation
from test_security import connect, run_federation

from brokerfl.assembly.roles import topology_for
from brokerfl.config import load_config
from brokerfl.runtime.handler_table import HandlerSet
from brokerfl.runtime.identity import client_user
from brokerfl.storage.accounting import account_run
from brokerfl.storage.journal import read_journal
from brokerfl.storage.metrics_log import read_metrics
from brokerfl.storage.store import DirectoryModelStore
from brokerfl.transports.amqp import AmqpTransport
from brokerfl.transports.base import ORIGIN_USER_HEADER, REASON_HEADER
from brokerfl.wire.message import SecureMasked, SecureReveal, SecureSharesFor, SecureUnmask, from_wire, to_wire
from tests import secure_dropouts
from tests.handler_modules import extra_handlers

pytestmark = [pytest.mark.broker, pytest.mark.slow]
SECURE = ROOT / "configs/digits_secure.yaml"
# Stages 2-4 take milliseconds per client; a stage that waits for a killed client ends at
# this deadline, so it bounds each dropout's cost to a round.
STAGE_TIMEOUT_S = 10.0


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def secure_yaml(path: Path, **changes) -> Path:
    """``configs/digits_secure.yaml`` with ``changes`` merged in, written to ``path`` (the
    processes take a config file; the CLI overrides only clients, rounds, seed and run)."""
    path.write_text(yaml.safe_dump(merged(yaml.safe_load(SECURE.read_text()), changes)))
    return path


class SecureFederation(Federation):
    """:class:`test_faults.Federation` on a secure config, with what these tests read."""

    def journal(self, cls):
        """The journal's messages of one type, decoded, in journal order (``audit.`` records and
        what clients sent to the server; not dead letters)."""
        with AmqpTransport(self.url) as transport:
            return [
                from_wire(d.envelope, d.body)
                for d in read_journal(transport, topology_for(self.run_config()))
                if d.envelope.type == cls.TYPE and not d.routing_key.startswith("dead.")
            ]

    def wait_for_exits(self, procs: list[subprocess.Popen], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                raise AssertionError(f"processes still running after {timeout} s: {self.log_tail()}")
            time.sleep(0.1)  # polling the processes under a deadline


@pytest.fixture
def secure_federation(amqp_url, run_name, tmp_path):
    made: list[SecureFederation] = []

    def make(**kw) -> SecureFederation:
        made.append(SecureFederation(amqp_url, run_name, tmp_path, **kw))
        return made[-1]

    yield make
    for fed in made:
        fed.cleanup()


def versions_of(fed: SecureFederation) -> list[dict]:
    store = DirectoryModelStore(fed.out / "models")
    return [store.metadata(v) for v in store.versions()]


@pytest.mark.timeout(300)
def test_clients_killed_at_stages_a_round_completes_without_them_and_one_with_too_few_is_dropped(
    secure_federation, tmp_path
):
    """10 client processes. Round 1: clients 3 and 7 are killed (-9) once they sent their
    masked vectors, client 5 before: the round completes with the 9 vectors sent. Round 2,
    among the 7 left: 3 more are killed after masking, 4 remain to reveal where a secret needs
    5 shares: the round is dropped with its reason, and the run stops (``on_too_few: stop``)."""
    round_1_after, round_1_before, round_2_after = ["3", "7"], ["5"], ["0", "2", "4"]
    config = secure_yaml(
        tmp_path / "secure.yaml",
        extra_handlers=["tests.secure_dropouts"],
        secure_aggregation={"stage_timeout_s": STAGE_TIMEOUT_S},
        # round 2 may sample round 1's dead before their silence shows: its training waits this long
        strategy={"on_too_few": "stop", "round_deadline_s": 30.0},
    )
    fed = secure_federation(clients=10, rounds=2, config=config)
    assert fed.run_config().secure_aggregation.resolved(10) == (8, 5)  # k neighbours, threshold t
    killing = {
        secure_dropouts.AFTER_MASKED: ",".join([f"{c}@1" for c in round_1_after] + [f"{c}@2" for c in round_2_after]),
        secure_dropouts.BEFORE_MASKED: ",".join(f"{c}@1" for c in round_1_before),
        secure_dropouts.BY_KILL: "1",
    }
    doomed = round_1_after + round_1_before + round_2_after
    fed.start_server()
    for i in range(fed.clients):
        fed.start_client(str(i), env=killing if str(i) in doomed else None)
    fed.wait_for_exits([fed.server, *fed.client_procs.values()], timeout=240)
    codes = {cid: p.returncode for cid, p in fed.client_procs.items()}
    assert codes == {str(i): -9 if str(i) in doomed else 0 for i in range(10)}, (codes, fed.log_tail())
    assert fed.server.returncode == 1, fed.log_tail()  # a failed run's exit code
    server_log = next(fed.logs.glob("*-server.log")).read_text()
    assert "brokerfl server: round 2 got 0 of the 2 updates it needs" in server_log, server_log[-2000:]

    report = fed.accounting()
    print(report.summary())
    assert report.ok, report.summary()
    first, second = report.secure_rounds
    # round 1: the 9 vectors sent are summed (the 2 killed after sending unmasked by their neighbours)
    assert first.version == 1 and not first.dropped
    assert sorted(first.masked) == sorted({str(i) for i in range(10)} - set(round_1_before))
    assert sorted(first.revealed) == sorted({str(i) for i in range(10)} - set(round_1_before) - set(round_1_after))
    assert set(first.dropouts) == set(round_1_before + round_1_after), first.dropouts
    assert all(first.dropouts[c].startswith("stage 3 (masked vector): ") for c in round_1_before), first.dropouts
    assert all(first.dropouts[c].startswith("stage 4 (unmasking): ") for c in round_1_after), first.dropouts
    (v1,) = versions_of(fed)[1:]
    assert sorted(v1["update_ids"]) == sorted(first.masked.values()) and len(set(v1["update_ids"])) == 9
    # round 2: dropped with its reason, each of its masked vectors on record
    assert second.version is None and second.dropped.startswith("stage 4 (unmasking): "), second.dropped
    assert "threshold 5" in second.dropped and "shares" in second.dropped, second.dropped
    assert sorted(second.masked) == sorted({str(i) for i in range(10)} - set(round_1_before + round_1_after))
    assert all(second.dropouts[c].startswith("stage 4 (unmasking): ") for c in round_2_after), second.dropouts
    for uid in second.masked.values():
        assert report.dropped[uid] == [f"secure round dropped: {second.dropped}"], report.dropped.get(uid)
    # every masked vector sent is folded once or dropped on record; the one killed before masking sent none
    sent = {m.message_id: m.client_id for m in fed.journal(SecureMasked)}
    assert sorted(sent) == sorted([*v1["update_ids"], *second.masked.values()])
    assert round_1_before[0] not in {sent[uid] for uid in v1["update_ids"]}
    replayed = fed.replay()  # the journal alone recomputes version 1's secure sum, hash for hash
    print(replayed.table())
    assert replayed.ok and [row.replayed_hash for row in replayed.rows[1:]] == [
        read_metrics(fed.out / "metrics.jsonl")[0]["sha256"]
    ]


def _forged_then(handler, forge, *, client_id: str, done, config, forged: list):
    """Client ``client_id``'s stage handler that first has client 1's user publish
    ``forge(request)`` (a message claiming ``client_id``) and waits until the server has
    dead-lettered it; then it answers as usual. Its own answer is still missing meanwhile,
    so the forgery reaches a server that awaits exactly that message."""
    topology = topology_for(config)

    def stage(message, ctx):
        if ctx.state.client_id == client_id:
            fake = forge(message)
            with connect(done, client_user(config.run, "1")) as mallory:
                mallory.publish(topology.exchange, f"server.{fake.TYPE}", *to_wire(fake))
            with connect(done, f"{config.run}-admin") as admin:
                deadline = time.monotonic() + 60
                while True:
                    letter = admin.get(topology.dead_queue)
                    if letter is not None:
                        admin.ack(letter)
                        forged.append(letter)
                        if letter.envelope.message_id == fake.message_id:
                            break
                    assert time.monotonic() < deadline, f"the forged {fake.TYPE} was not dead-lettered"
                    if letter is None:
                        time.sleep(0.05)  # polling the dead-letter queue under a deadline
        return handler(message, ctx)

    return stage


@pytest.mark.timeout(300)
def test_identity_enforced_stage_messages_claiming_another_client_are_dead_lettered(provision_on_broker, monkeypatch):
    from brokerfl.app import load_app
    from brokerfl.handlers.secure import quantise
    from brokerfl.handlers.workflows import secure_client

    run = "sa" + uuid.uuid4().hex[:10]  # in a vhost of its own, deleted by the fixture
    base = {
        "run": run,
        "clients": 4,
        "rounds": 2,
        "identity.enforce": True,
        "liveness.timeout_s": 600.0,
        "train.epochs": 1,
    }
    config = load_config(SECURE, base)
    done = provision_on_broker(config)
    length = quantise.vector_length(load_app(config).initial_parameters(config.seed))
    letters: list = []
    around = {"client_id": "2", "done": done, "config": config, "forged": letters}
    module = extra_handlers(
        monkeypatch,
        client=HandlerSet(
            "client 1's user forging client 2's stage messages",
            overrides={
                SecureSharesFor: _forged_then(
                    secure_client.mask,
                    lambda m: m.reply(
                        SecureMasked, client_id="2", sender="2", session=m.session, vector=np.zeros(length, np.uint64)
                    ),
                    **around,
                ),
                SecureUnmask: _forged_then(
                    secure_client.reveal,
                    lambda m: m.reply(
                        SecureReveal, client_id="2", sender="2", session=m.session, seed_shares={}, key_shares={}
                    ),
                    **around,
                ),
            },
        ),
    )
    config = load_config(SECURE, {**base, "extra_handlers": [module]})

    def connect_as(client_id):
        return connect(done, f"{run}-server" if client_id is None else client_user(run, client_id))

    records, store, server_transport = run_federation(config, connect_as)
    try:
        assert [r["model_version"] for r in records] == [1, 2]
        report = account_run(server_transport, topology_for(config), store)
    finally:
        server_transport.close()
    print(report.summary())
    assert report.ok, report.summary()
    # two forgeries a round, each dead-lettered by the server's identity check, not taken
    assert [letter.envelope.type for letter in letters] == [SecureMasked.TYPE, SecureReveal.TYPE] * 2
    for letter in letters:
        reason = letter.envelope.headers[REASON_HEADER]
        assert reason.startswith("refused: ") and "claims client '2'" in reason, reason
        assert letter.envelope.headers[ORIGIN_USER_HEADER] == client_user(run, "1")
    masked_forgeries = {letter.envelope.message_id for letter in letters[::2]}
    assert set(report.dead) == masked_forgeries  # the masked ones count as updates: dead, with the reason
    for record in report.secure_rounds:  # each round took every client's own messages, and only those
        assert record.version is not None and not record.dropouts
        assert sorted(record.masked) == sorted(record.revealed) == ["0", "1", "2", "3"]
        assert not set(record.masked.values()) & masked_forgeries
    assert [sorted(store.metadata(v)["update_ids"]) for v in (1, 2)] == [
        sorted(record.masked.values()) for record in report.secure_rounds
    ]


@pytest.mark.timeout(180)
def test_a_masked_vector_larger_than_a_chunk_travels_in_chunks(amqp_url, run_name):
    """The federation in threads on transports with 32 KiB chunks: each 138 KB masked vector
    travels as 5 chunks, and the round completes and replays."""
    from brokerfl.ops.replay import replay

    chunk = 32 * 1024
    config = load_config(SECURE, {"run": run_name, "clients": 3, "rounds": 1, "train": {"epochs": 1}})
    records, store, server_transport = run_federation(config, lambda _: AmqpTransport(amqp_url, chunk_size=chunk))
    topology = topology_for(config)
    try:
        assert [r["num_updates"] for r in records] == [3]
        report = account_run(server_transport, topology, store)
        assert report.ok, report.summary()
        masked = [
            from_wire(d.envelope, d.body)
            for d in read_journal(server_transport, topology)
            if d.envelope.type == SecureMasked.TYPE
        ]
        assert len(masked) == 3 and all(m.vector.nbytes > 4 * chunk for m in masked), [m.vector.nbytes for m in masked]
        (record,) = report.secure_rounds
        assert record.version == 1 and sorted(store.metadata(1)["update_ids"]) == sorted(record.masked.values())
        replayed = replay(read_journal(server_transport, topology), config)
        assert replayed.ok and replayed.rows[1].replayed_hash == records[0]["sha256"], replayed.table()
    finally:
        topology.delete(server_transport, config.client_ids())
        server_transport.close()
