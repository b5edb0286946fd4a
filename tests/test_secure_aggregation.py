"""Secure aggregation end to end in ``simulate`` (the arithmetic alone:
test_secure_protocol.py; over RabbitMQ with processes killed at stages:
test_secure_aggregation_amqp.py).

Each plain update the clients made is captured where it is made (before it is quantised
and masked), so a test can check what the server stored against FedAvg of exactly those
updates, and that nothing the server or the journal holds is one of them."""

from __future__ import annotations

import numpy as np
import pytest

from brokerfl.assembly.roles import topology_for
from brokerfl.assembly.simulate import SimulationError, simulate
from brokerfl.cli import main
from brokerfl.config import ConfigError, load_config
from brokerfl.handlers.secure.quantise import Quantisation
from brokerfl.handlers.workflows import secure_client
from brokerfl.ops.replay import ReplayError, replay
from brokerfl.storage.accounting import account_journal, account_run
from brokerfl.storage.journal import read_journal
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import ParameterUpdate, SecureMasked, SecureRound, UpdateDropped, from_wire
from tests.secure_dropouts import AFTER_MASKED, BEFORE_MASKED

SECURE = "configs/digits_secure.yaml"
DEFAULT_QUANTISATION = Quantisation(4.0, 24, 64)  # the config section's defaults


@pytest.fixture
def plain_updates(monkeypatch):
    """(client id, round) -> (parameters, num_samples): every update the clients trained,
    as it was before secure aggregation touched it."""
    made: dict[tuple[str, int], tuple[dict[str, np.ndarray], int]] = {}
    answer = secure_client.keys_answer

    def capturing(state, task, parameters, metrics, seconds):
        made[(state.client_id, task.round)] = (
            {k: np.array(v) for k, v in parameters.items()},
            int(metrics["num_samples"]),
        )
        return answer(state, task, parameters, metrics, seconds)

    monkeypatch.setattr(secure_client, "keys_answer", capturing)
    return made


def journal_of(result, config) -> list:
    return [
        from_wire(d.envelope, d.body)
        for d in read_journal(LocalTransport(result.broker), topology_for(config))
        if not d.routing_key.startswith("dead.")
    ]


def fedavg(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    return {name: sum(p[name].astype(np.float64) * n for p, n in updates) / total for name in updates[0][0]}


def largest_difference(stored: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> tuple[float, float]:
    """(the largest per-coordinate difference, the bound it must keep): the quantisation's
    error bound plus the float32 rounding of the stored result (half a unit in its last place)."""
    diff = max(float(np.max(np.abs(stored[k].astype(np.float64) - exact[k]))) for k in exact)
    rounding = max(float(np.max(np.abs(exact[k]))) for k in exact) * 2.0**-24
    return diff, DEFAULT_QUANTISATION.error_bound + rounding


def test_a_secure_round_is_fedavg_of_its_updates_within_the_quantisation_bound(plain_updates):
    config = load_config(SECURE, {"rounds": 1, "clients": 5})
    result = simulate(config, journal=True)
    round_one = [plain_updates[(str(c), 1)] for c in range(5)]
    diff, bound = largest_difference(result.store.get(1).parameters, fedavg(round_one))
    print(f"largest difference from FedAvg: {diff:.3g} (bound {bound:.3g})")
    assert diff <= bound
    # the same run in the clear: the same version, within the same bound
    plain = simulate(load_config("configs/digits_fedavg.yaml", {"rounds": 1, "clients": 5, "run": config.run}))
    assert largest_difference(result.store.get(1).parameters, plain.store.get(1).parameters)[0] <= bound


def test_the_server_and_its_journal_hold_no_update_only_their_sum(plain_updates):
    """The curious server: every vector it holds looks uniform and correlates with no
    client's update, and no plain update is anywhere in the journal; yet the sum is exact
    (previous test)."""
    config = load_config(SECURE, {"rounds": 2, "clients": 5})
    result = simulate(config, journal=True)
    journal = journal_of(result, config)
    assert not [m for m in journal if isinstance(m, ParameterUpdate)]
    masked = [m for m in journal if isinstance(m, SecureMasked)]
    assert len(masked) == 10
    for message in masked:
        words = message.vector
        # the high bit of each word is a fair coin (binomial: 5 sigma either side)
        ones = int(np.count_nonzero(words >> np.uint64(63)))
        assert abs(ones - words.size / 2) < 5 * np.sqrt(words.size / 4), (ones, words.size)
        as_float = (words >> np.uint64(11)).astype(np.float64)  # the top 53 bits, exactly
        for (client, round_), (parameters, _) in plain_updates.items():
            flat = np.concatenate([parameters[k].ravel() for k in sorted(parameters)]).astype(np.float64)
            r = np.corrcoef(as_float[: flat.size], flat)[0, 1]
            assert abs(r) < 0.05, (message.client_id, client, round_, r)
    # nothing else a client sends carries its parameters' bytes
    for parameters, _ in plain_updates.values():
        some = next(iter(parameters.values())).tobytes()[:64]
        for message in journal:
            for value in vars(message).values():
                if isinstance(value, (bytes, np.ndarray)):
                    assert some not in (value if isinstance(value, bytes) else value.tobytes())


def test_a_secure_run_is_accounted_for_and_replays_hash_for_hash(capsys):
    config = load_config(SECURE, {"rounds": 3, "clients": 5})
    result = simulate(config, journal=True)
    report = account_run(LocalTransport(result.broker), topology_for(config), result.store)
    assert report.ok, report.summary()
    assert len(report.sent) == 15 and len(report.folded_into) == 15
    assert "secure rounds: 3, 0 dropped" in report.summary()
    journal = list(read_journal(LocalTransport(result.broker), topology_for(config)))
    replayed = replay(journal, config)
    assert replayed.ok and len(replayed.rows) == 4, replayed.table()
    assert [row.replayed_hash for row in replayed.rows[1:]] == [r["sha256"] for r in result.records]
    with pytest.raises(ReplayError, match="secure_aggregation"):
        replay(journal, config, what_if="median")


def one_round_with_leavers(**overrides):
    """One round of 10 clients, those the environment names leaving at their stage
    (tests/secure_dropouts.py), each later stage waiting a second for them."""
    settings = {
        "rounds": 1,
        "clients": 10,
        "extra_handlers": ["tests.secure_dropouts"],
        "secure_aggregation": {"stage_timeout_s": 1.0},
    }
    return load_config(SECURE, {**settings, **overrides})


def test_dropouts_before_and_after_masking_leave_the_sum_of_the_vectors_sent(plain_updates, monkeypatch):
    """Clients 3 and 7 leave once they sent their masked vectors, client 5 before: the sum
    holds the 9 vectors sent, exactly (the 2 that left after sending are unmasked with
    their neighbours' shares)."""
    monkeypatch.setenv(AFTER_MASKED, "3,7")
    monkeypatch.setenv(BEFORE_MASKED, "5")
    config = one_round_with_leavers()
    result = simulate(config, journal=True)
    sent = [c for c in map(str, range(10)) if c != "5"]
    diff, bound = largest_difference(result.store.get(1).parameters, fedavg([plain_updates[(c, 1)] for c in sent]))
    assert diff <= bound
    (record,) = [m for m in journal_of(result, config) if isinstance(m, SecureRound)]
    assert record.version == 1 and sorted(record.masked) == sorted(sent)
    assert record.dropouts == {
        "3": "stage 4 (unmasking): no answer within stage_timeout_s",
        "5": "stage 3 (masked vector): no answer within stage_timeout_s",
        "7": "stage 4 (unmasking): no answer within stage_timeout_s",
    }
    assert result.store.get(1).update_ids == [record.masked[c] for c in sorted(sent)]
    report = account_run(LocalTransport(result.broker), topology_for(config), result.store)
    assert report.ok, report.summary()
    assert "at stage 3 (masked vector): 1" in report.summary()


def test_too_many_dropouts_drop_the_round_with_its_reason(monkeypatch):
    monkeypatch.setenv(AFTER_MASKED, "0,1,2,3,4,5")  # 4 revealers: below every client's threshold of 5
    config = one_round_with_leavers(strategy={"name": "fedavg", "min_clients": 2, "on_too_few": "stop"})
    broker = LocalBroker()  # the failed run's journal is read from it
    too_few = r"stage 4 \(unmasking\): client \d's self-mask seed: \d shares, threshold 5"
    with pytest.raises(SimulationError, match=too_few):
        simulate(config, journal=True, broker=broker)
    messages = [
        from_wire(d.envelope, d.body)
        for d in read_journal(LocalTransport(broker), topology_for(config))
        if not d.routing_key.startswith("dead.")
    ]
    masked = {m.message_id for m in messages if isinstance(m, SecureMasked)}
    dropped = {m.update_id: m.reason for m in messages if isinstance(m, UpdateDropped)}
    assert len(masked) == 10 and masked <= set(dropped)
    assert all("secure round dropped: stage 4" in dropped[uid] for uid in masked)
    (record,) = [m for m in messages if isinstance(m, SecureRound)]
    assert record.version is None and "threshold 5" in record.dropped
    report = account_journal(read_journal(LocalTransport(broker), topology_for(config)))
    assert report.ok and "secure rounds: 1, 1 dropped" in report.summary(), report.summary()


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ({"strategy": {"name": "median"}}, "compares the round's updates one by one"),
        ({"strategy": {"name": "krum"}}, "strategies that can: dp_fedavg, fedadagrad, fedadam, fedavg"),
        ({"strategy": {"name": "fedbuff"}}, "no round to sum"),
        ({"strategy": {"name": "norm_bounding"}}, "bounds each update's norm on the server"),
        (
            {"strategy": {"name": "dp_fedavg", "options": {"adaptive_clipping": True, "noise_multiplier": 0.1}}},
            "adaptive_clipping",
        ),
        ({"compression": {"method": "topk"}}, "does not compress"),
        ({"clients": 2, "strategy": {"min_clients": 2}}, "at least 3 clients per round"),
        ({"secure_aggregation": {"threshold": 4}}, "more than half"),
        ({"secure_aggregation": {"threshold": 10}}, "5..9"),
        ({"secure_aggregation": {"bits": 1}}, "bits"),
        ({"secure_aggregation": {"sharing": 3}}, "sharing"),
        ({"workflow": "swarm"}, "workflow 'swarm'"),
    ],
)
def test_what_cannot_run_securely_is_refused_when_the_config_is_read(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(SECURE, override)


def test_a_secure_run_without_a_journal_as_brokerfl_simulate_runs_it(tmp_path):
    assert main(["simulate", SECURE, "--rounds", "2", "--clients", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    assert (tmp_path / "final_model.npz").exists()


def test_the_server_optimisers_and_dp_fedavg_run_on_the_secure_sum():
    for strategy in (
        {"name": "fedadam", "options": {"eta": 0.01}},
        {"name": "dp_fedavg", "options": {"noise_multiplier": 0.01, "clip_norm": 5.0}},
    ):
        config = load_config(SECURE, {"rounds": 3, "clients": 5, "strategy": strategy})
        result = simulate(config, journal=True)
        assert result.records[-1]["accuracy"] > 0.5, (strategy, result.records)
        replayed = replay(read_journal(LocalTransport(result.broker), topology_for(config)), config)
        assert replayed.ok, replayed.table()


def test_replay_refuses_a_what_if_on_a_secure_run(tmp_path, capsys):
    assert main(["replay", SECURE, "--strategy", "median", "--run", "r", "--journal", str(tmp_path / "j")]) == 2
    assert "holds only masked ones" in capsys.readouterr().err


# ---------------------------------------------------------------- the server's stages, handler by handler


class SecureServer:
    """The server's composed table for a secure run, called directly: each call's
    outbound messages are returned, and its timers due at once are fired in turn."""

    def __init__(self, clients: int) -> None:
        import structlog

        from brokerfl.assembly.roles import coordinator_table
        from brokerfl.handlers.workflows import server
        from brokerfl.storage.metrics_log import MetricsLog
        from brokerfl.storage.store import MemoryModelStore

        self.config = load_config(SECURE, {"run": "secure-stages", "clients": clients})
        self.state = server.make_state(self.config, MemoryModelStore(), MetricsLog(None))
        self.table = coordinator_table(self.config, server)
        self.log = structlog.get_logger()

    def call(self, message) -> list:
        from brokerfl.runtime.handler_table import Context, Timer

        ctx = Context(role="server", run=self.config.run, state=self.state, log=self.log, clock=lambda: 0.0)
        returned = self.table.handler_for(message.TYPE)(message, ctx) or []
        out = [o.message for o in [*ctx.also_send, *returned]]
        for timer in ctx.timer_requests:
            if isinstance(timer, Timer) and timer.due <= 0.0:
                out += self.call(timer.message)
        return out


def staged_round(clients: int, *, leave_before_unmask: bool = True):
    """Run a secure round's stages 1-3 on the server's table with real client sessions;
    returns (server, sessions, the plain vectors, the stage 4 request)."""
    from brokerfl.handlers.secure import protocol, quantise
    from brokerfl.handlers.secure.run_settings import settings_for
    from brokerfl.runtime.handler_table import Started
    from brokerfl.wire.message import (
        Join,
        SecureKeyList,
        SecureKeys,
        SecureShares,
        SecureSharesFor,
        SecureUnmask,
        TrainTask,
    )

    server = SecureServer(clients)
    server.call(Started(run=server.config.run))
    out = []
    for c in map(str, range(clients)):
        out += server.call(Join(client_id=c, num_samples=100))
    (task,) = [m for m in out if isinstance(m, TrainTask)]
    settings = settings_for(server.config)
    rng = np.random.default_rng(0)
    sessions, vectors = {}, {}
    for c in task.participants:
        delta = {k: rng.normal(0, 0.01, v.shape) for k, v in task.parameters.items()}
        vectors[c], _ = quantise.encode(delta, 50 + int(c), settings.quantisation)
        sessions[c] = protocol.ClientSession(c, task.message_id, settings, vectors[c])
    out = []
    for c, s in sessions.items():
        c_pk, s_pk, commitment = s.advertise()
        out += server.call(
            task.reply(
                SecureKeys, client_id=c, session=task.message_id, c_pk=c_pk, s_pk=s_pk, seed_commitment=commitment
            )
        )
    (key_list,) = [m for m in out if isinstance(m, SecureKeyList)]
    out = []
    for c, s in sessions.items():
        keys = {cid: tuple(v) for cid, v in key_list.keys.items()}
        out += server.call(
            key_list.reply(SecureShares, client_id=c, session=task.message_id, ciphertexts=s.share_keys(keys))
        )
    forwarded = {m.client_id: m for m in out if isinstance(m, SecureSharesFor)}
    assert sorted(forwarded) == sorted(sessions)
    out = []
    masked_ids = {}
    for c, s in sessions.items():
        message = forwarded[c].reply(
            SecureMasked, client_id=c, session=task.message_id, vector=s.mask(forwarded[c].ciphertexts)
        )
        masked_ids[c] = message.message_id
        out += server.call(message)
    (unmask,) = [m for m in out if isinstance(m, SecureUnmask)]
    return server, sessions, vectors, unmask, masked_ids


def test_the_stages_on_the_servers_table_give_the_exact_sum():
    from brokerfl.handlers.secure import quantise
    from brokerfl.wire.message import SecureReveal

    server, sessions, vectors, unmask, masked_ids = staged_round(4)
    # the server holds the running sum of the masked vectors, not each one: O(model) memory
    secure = server.state.secure
    arrays = [v for v in vars(secure).values() if isinstance(v, np.ndarray)]
    assert arrays == [secure.total] and secure.total.shape == next(iter(vectors.values())).shape
    assert all(isinstance(uid, str) for uid in secure.masked_ids.values())
    out = []
    for c, s in sessions.items():
        seeds, keys = s.reveal(unmask.masked, unmask.dropped)
        out += server.call(
            unmask.reply(SecureReveal, client_id=c, session=unmask.session, seed_shares=seeds, key_shares=keys)
        )
    (record,) = [m for m in out if isinstance(m, SecureRound)]
    assert record.version == 1 and record.masked == masked_ids and not record.dropouts
    version = server.state.store.get(1)
    assert sorted(version.update_ids) == sorted(masked_ids.values())
    # the stored model is the global one plus the weighted mean of the deltas, within the bound
    like = server.state.store.get(0).parameters
    total = sum(v.astype(object) for v in vectors.values())  # exact integers
    exact, weight, _ = quantise.decode_sum(
        np.array([int(x) % 2**64 for x in total], np.uint64), like, DEFAULT_QUANTISATION
    )
    for name, g in like.items():
        expected = g.astype(np.float64) + exact[name] / weight
        assert np.max(np.abs(version.parameters[name] - expected)) <= 1e-6
    assert server.state.model.version == 1 and server.state.round == 2  # the next round began


def test_an_abort_in_stage_4_records_the_drop_of_every_masked_vector():
    from brokerfl.runtime.operator_commands import AbortRun

    server, _, _, _, masked_ids = staged_round(4)
    out = server.call(AbortRun(sender="admin:test"))
    drops = {m.update_id: m for m in out if isinstance(m, UpdateDropped)}
    assert set(drops) == set(masked_ids.values())
    assert all("aborted by admin:test" in d.reason for d in drops.values())


def test_stage_messages_out_of_turn_are_not_taken():
    from brokerfl.wire.message import SecureKeys, SecureReveal

    server, sessions, _, unmask, _ = staged_round(4)
    # a second masked vector from a client that sent one: an update, dropped on record
    again = unmask.reply(SecureMasked, client_id="1", session=unmask.session, vector=np.zeros(3, np.uint64))
    (drop,) = server.call(again)
    assert isinstance(drop, UpdateDropped) and "stage 3 (masked vector) of round 1 is over" in drop.reason
    # keys now, or a reveal of another session: acked, nothing changes
    late = SecureKeys(
        client_id="2", session=unmask.session, c_pk=b"x" * 32, s_pk=b"x" * 32, seed_commitment=b"x" * 32, round=1
    )
    assert server.call(late) == []
    other = SecureReveal(client_id="2", session="not-this-one", seed_shares={}, key_shares={}, round=1)
    assert server.call(other) == [] and server.state.secure.stage == 4 and not server.state.secure.revealed
    # a reveal with shares it was not asked for is refused (dead-lettered with the reason)
    from brokerfl.runtime.handler_table import Rejected

    with pytest.raises(Rejected, match="not asked for"):
        server.call(
            SecureReveal(client_id="0", session=unmask.session, seed_shares={}, key_shares={"3": b"s"}, round=1)
        )


def test_status_says_the_secure_stage_and_who_it_waits_for():
    from rich.console import Console

    from brokerfl.cli.operate import render
    from brokerfl.handlers.workflows.admin import status_of
    from brokerfl.wire.message import SecureReveal

    server, sessions, _, unmask, _ = staged_round(4)
    seeds, keys = sessions["2"].reveal(unmask.masked, unmask.dropped)
    server.call(unmask.reply(SecureReveal, client_id="2", session=unmask.session, seed_shares=seeds, key_shares=keys))
    status = status_of(server.state)
    assert status["secure_round"] == {"stage": "stage 4 (unmasking)", "waiting": ["0", "1", "3"], "dropouts": []}
    assert status["held_updates"] == 4  # the masked vectors
    console = Console(record=True, width=200)
    console.print(render({"server": status, "queues": {}, "journal_max_bytes": None, "journal_max_age": None}))
    assert "secure aggregation: stage 4 (unmasking), waiting for 0, 1, 3" in console.export_text()


def test_with_identity_enforced_each_stage_message_comes_from_its_own_clients_user():
    """Every stage message reaches the server from its client's own broker user, and one
    sent in another client's name (client 0's user claiming client 1) is dead-lettered
    with the reason; provisioning lets a client publish the stage replies and nothing else."""
    import re

    from brokerfl.ops.provision import definitions, participants
    from brokerfl.runtime.identity import client_user
    from brokerfl.transports.base import ORIGIN_USER_HEADER, REASON_HEADER
    from brokerfl.wire.message import SecureKeys, SecureReveal, SecureShares, to_wire

    config = load_config(SECURE, {"run": "idt-secure", "rounds": 2, "clients": 4, "identity": {"enforce": True}})
    broker = LocalBroker()
    topology = topology_for(config, journal=True)
    topology.declare_provisioned(LocalTransport(broker), config.client_ids())
    attacker = LocalTransport(broker, user=client_user(config.run, "0"))
    forged = SecureMasked(client_id="1", session="s", vector=np.zeros(3, np.uint64), run=config.run, round=1)
    attacker.publish(topology.exchange, "server.secure_masked", *to_wire(forged))
    result = simulate(config, journal=True, broker=broker)
    assert [r["num_updates"] for r in result.records] == [4, 4]
    stage_types = (SecureKeys, SecureShares, SecureMasked, SecureReveal)
    seen = [
        (from_wire(d.envelope, d.body), d.envelope.user_id)
        for d in read_journal(LocalTransport(broker), topology)
        if d.envelope.type in {t.TYPE for t in stage_types} and d.routing_key.startswith("server.")
    ]
    assert len(seen) == 1 + 2 * 4 * 4  # the forgery, then 2 rounds x 4 stages x 4 clients
    assert all(user == client_user(config.run, m.client_id) for m, user in seen if m.message_id != forged.message_id)
    dead = []
    admin = LocalTransport(broker)
    while (d := admin.get(topology.dead_queue)) is not None:
        dead.append((d.envelope.message_id, d.envelope.headers[REASON_HEADER], d.envelope.headers[ORIGIN_USER_HEADER]))
    assert [(i, u) for i, _, u in dead] == [(forged.message_id, client_user(config.run, "0"))]
    assert "claims client '1'" in dead[0][1]
    topics = {t["user"]: t["write"] for t in definitions(config, participants(config), vhost="v")["topic_permissions"]}
    client_may = topics[client_user(config.run, "0")]
    for t in stage_types:
        assert re.search(client_may, f"server.{t.TYPE}"), t.TYPE
    assert not re.search(client_may, "server.secure_round") and not re.search(client_may, "audit.secure_round")


def test_an_update_that_cannot_be_quantised_is_a_failed_training_not_a_silence(monkeypatch):
    """A client whose app returns NaN answers with TrainFailed at once, naming the reason; the
    round goes on with the others."""
    from brokerfl.wire.message import TrainFailed

    answer = secure_client.keys_answer

    def nan_for_client_1(state, task, parameters, metrics, seconds):
        if state.client_id == "1":
            parameters = {k: np.full_like(v, np.nan) for k, v in parameters.items()}
        return answer(state, task, parameters, metrics, seconds)

    monkeypatch.setattr(secure_client, "keys_answer", nan_for_client_1)
    config = load_config(SECURE, {"rounds": 1, "clients": 4})
    result = simulate(config, journal=True)
    assert [r["num_updates"] for r in result.records] == [3]
    (failed,) = [m for m in journal_of(result, config) if isinstance(m, TrainFailed)]
    assert failed.client_id == "1" and "cannot be quantised" in failed.error and "NaN" in failed.error
    (record,) = [m for m in journal_of(result, config) if isinstance(m, SecureRound)]
    assert record.dropouts == {"1": "stage 1 (keys): its training failed"}
