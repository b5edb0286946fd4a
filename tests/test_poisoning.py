"""A client's own updates cannot break the model: a client that joined with its
real partition and then sends NaN, a finite 1e30, or a million-sample claim is refused with
a reason on every path that folds updates, and the run keeps the accuracy of a clean one;
robust strategies at their defaults hold against a sign-flipping client among six.

The attacker is :mod:`tests.tools.hostile.poisoning` (client 0 unless said otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import structlog
import yaml
from cli_processes import kill_the_rest
from structlog.testing import capture_logs

from brokerfl.assembly.roles import coordinator_table
from brokerfl.cli.operate import _this_round
from brokerfl.config import load_config
from brokerfl.handlers.strategies.aggregate import BadUpdate
from brokerfl.handlers.workflows import async_server, server, server_state
from brokerfl.runtime.handler_table import Context, Started
from brokerfl.runtime.operator_commands import StatusReply, StatusRequest
from brokerfl.storage.metrics_log import MetricsLog, read_metrics
from brokerfl.storage.store import MemoryModelStore
from brokerfl.wire.message import Heartbeat, Heartbeats, Join, ParameterUpdate, UpdateDropped
from tests.tools.hostile.poisoning import simulated_run

ROOT = Path(__file__).resolve().parents[1]

# The digits app, default FedAvg, six clients; every round waits for its six answers (a
# refused one counts as an answer), so a run's rounds do not depend on the machine's speed.
SIX = {
    "run": "poison",
    "seed": 0,
    "rounds": 20,
    "clients": 6,
    "strategy": {"name": "fedavg", "min_clients": 5, "round_deadline_s": 60},
}

REASONS = {
    "nan": r"holds NaN or infinite values",
    "huge": r"more than strategy\.max_update_ratio \(10\)",
    # digits: ~240 samples a client
    "noise_claim": r"the update claims 1000000 samples, more than the 2\d\d it declared for its partition",
}


class Server:
    """A server's handler table called directly (no worker, no transport)."""

    def __init__(self, module=server, **overrides) -> None:
        self.config = load_config(
            None, {"run": "poison", "clients": 2, "rounds": 3, "strategy.min_clients": 1, "journal": True, **overrides}
        )
        self.module = module
        self.table = coordinator_table(self.config, module)
        self.state = module.make_state(self.config, MemoryModelStore(), MetricsLog(None))
        self(Started(run="poison"))

    def __call__(self, message):
        ctx = Context(
            role="server", run=self.config.run, state=self.state, log=structlog.get_logger(), clock=lambda: 0.0
        )
        message.run = message.run or self.config.run
        return [*ctx.also_send, *(self.table.handler_for(message.TYPE)(message, ctx) or [])]

    def update(self, client_id: str, num_samples: int, **tensors) -> ParameterUpdate:
        parameters = {name: value.copy() for name, value in self.state.model.parameters.items()}
        parameters.update(tensors)
        return ParameterUpdate(
            client_id=client_id,
            task_id="t",
            parameters=parameters,
            num_samples=num_samples,
            round=self.state.round,
            model_version=self.state.model.version,
        )


# ---------------------------------------------------------------- the sample count a client declared


def test_an_update_claiming_more_than_its_client_declared_is_refused_and_the_round_goes_on():
    run = Server()
    run(Join(client_id="0", num_samples=100))
    run(Join(client_id="1", num_samples=100))
    assert run.state.round_open and run.state.participants == ["0", "1"]
    with pytest.raises(BadUpdate, match="claims 101 samples, more than the 100 it declared for its partition"):
        run(run.update("0", 101))
    assert run.state.refused == {"0"} and run.state.strategy.folded() == 0
    status = next(o.message for o in run(StatusRequest()) if isinstance(o.message, StatusReply)).status
    assert status["refused"] == ["0"] and status["still_training"] == ["1"]
    assert _this_round({"id": "0"}, status) == "update refused"  # as `brokerfl status` shows it
    run(run.update("1", 100))  # the last answer: the round may close now, without its deadline
    assert run.state.strategy.folded() == 1 and run.state.answered == {"1"}
    assert run.state.participants and run.state.answered | run.state.refused >= set(run.state.participants)
    # a refused update may have been sent in the client's name by another (no identity
    # enforcement): the client's own, if it comes while the round is open, still counts
    run(run.update("0", 100))
    assert run.state.strategy.folded() == 2 and run.state.answered == {"0", "1"}


def test_a_declaration_without_a_count_keeps_the_last_one_and_a_rise_is_logged():
    run = Server()
    run(Join(client_id="0", num_samples=100))
    run(Heartbeat(client_id="0"))  # a sender that does not say: 100 stands
    assert run.state.clients["0"].num_samples == 100
    with capture_logs() as logs:
        run(Heartbeats(clients={"0": 150}))  # a client restarted with more data says so
    assert run.state.clients["0"].num_samples == 150
    assert [e for e in logs if e["event"] == "a client declares more samples than before"] == [
        {
            "event": "a client declares more samples than before",
            "client": "0",
            "before": 100,
            "now": 150,
            "log_level": "warning",
        }
    ]
    for message in (Join(client_id="1", num_samples=-5), Heartbeat(client_id="1", num_samples=2_000_000)):
        with pytest.raises(BadUpdate, match="claims"):
            run(message)


def test_a_client_that_declared_nothing_may_claim_nothing_and_one_not_yet_known_the_outer_cap():
    run = Server()
    run(Join(client_id="0"))  # num_samples 0: no partition size
    run(Join(client_id="1", num_samples=10))
    with pytest.raises(BadUpdate, match="more than the 0 it declared"):
        run(run.update("0", 1))
    # an aggregator that takes over knows no declaration until the next heartbeat
    server_state.see_client(run.state, "2", None)
    server_state.check_claimed_samples(
        ParameterUpdate(client_id="2", task_id="t", parameters={}, num_samples=1_000_000), run.state
    )
    with pytest.raises(BadUpdate, match="more than strategy.max_num_samples"):
        server_state.check_claimed_samples(
            ParameterUpdate(client_id="2", task_id="t", parameters={}, num_samples=1_000_001), run.state
        )


def test_the_asynchronous_server_drops_an_overclaiming_or_huge_update_with_its_reason_and_tasks_the_client_again():
    run = Server(async_server, **{"strategy.name": "fedbuff"})
    run(Join(client_id="0", num_samples=100))
    run(Join(client_id="1", num_samples=100))
    name = next(iter(run.state.model.parameters))
    for update, reason in [
        (run.update("0", 101), "malformed: the update claims 101 samples, more than the 100 it declared"),
        (
            run.update("0", 100, **{name: np.full_like(run.state.model.parameters[name], 1e30)}),
            "malformed: it is .* from the global model .* strategy.max_update_ratio",
        ),
    ]:
        out = run(update)
        drops = [o.message for o in out if isinstance(o.message, UpdateDropped)]
        assert len(drops) == 1 and re.match(reason, drops[0].reason), drops
        assert [o.dest for o in out if not isinstance(o.message, UpdateDropped)] == ["client.0"]  # its next task
    assert run.state.strategy.folded() == 0


# ---------------------------------------------------------------- whole runs: the default FedAvg


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> float:
    run = simulated_run(SIX, None, tmp_path_factory.mktemp("clean"))
    assert not run.stopped and len(run.records) == SIX["rounds"]
    return run.accuracy


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attack", sorted(REASONS))
def test_a_poisoning_client_is_refused_with_its_reason_and_the_run_keeps_its_accuracy(attack, clean, tmp_path):
    run = simulated_run(SIX, attack, tmp_path)
    assert not run.stopped and len(run.records) == SIX["rounds"]
    assert len(run.attackers_updates) == SIX["rounds"]
    for uid in run.attackers_updates:  # every one dead-lettered with its reason, none folded
        assert uid not in run.folded
        assert len(run.dead[uid]) == 1 and re.search(REASONS[attack], run.dead[uid][0]), run.dead[uid]
    assert all(r["num_updates"] == 5 for r in run.records)
    assert abs(run.accuracy - clean) <= 0.01, (run.accuracy, clean)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["trimmed_mean", "norm_bounding"])
def test_trimmed_mean_and_norm_bounding_at_their_defaults_hold_against_one_sign_flipper_of_six(
    strategy, clean, tmp_path
):
    config = {**SIX, "strategy": {**SIX["strategy"], "name": strategy}}
    poisoned = simulated_run(config, "sign_flip", tmp_path / "poisoned")
    assert not poisoned.stopped and all(
        r["num_updates"] == 6 for r in poisoned.records
    )  # nothing refused: the robust rule copes
    assert poisoned.accuracy >= clean - 0.04, (poisoned.accuracy, clean)
    fedavg = simulated_run({**config, "strategy": SIX["strategy"]}, "sign_flip", tmp_path / "fedavg")
    assert fedavg.accuracy < 0.5  # the same attack wrecks plain FedAvg


# ---------------------------------------------------------------- the other workflows


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workflow", ["cyclic", "fedbuff", "swarm"])
def test_a_huge_update_is_refused_on_the_other_paths_too(workflow, tmp_path):
    config = {"run": "poison", "seed": 0, "rounds": 2, "clients": 3, "train": {"epochs": 1}}
    if workflow == "cyclic":
        config |= {"workflow": "cyclic", "cyclic": {"hop_timeout_s": 2.0}}
    elif workflow == "swarm":
        config |= {
            "workflow": "swarm",
            "strategy": {"min_clients": 2, "round_deadline_s": 30},
            "swarm": {"min_responses_required": 2, "wait_after_min_s": 0.5},
        }
    else:
        config |= {"rounds": 6, "strategy": {"name": "fedbuff", "options": {"buffer_size": 2}}}
    run = simulated_run(config, "huge", tmp_path)
    assert not run.stopped and run.records
    assert run.attackers_updates and not set(run.attackers_updates) & run.folded
    reasons = [why for uid in run.attackers_updates for why in run.dead.get(uid, []) + run.dropped.get(uid, [])]
    refused = [why for why in reasons if "strategy.max_update_ratio" in why]
    assert refused and all(why in refused or why.startswith("late: the run is finished") for why in reasons), reasons
    assert run.accuracy > 0.5


# ---------------------------------------------------------------- over RabbitMQ


@pytest.mark.broker
@pytest.mark.timeout(420)
def test_a_huge_update_over_rabbitmq_is_dead_lettered_with_its_reason_and_the_run_keeps_its_accuracy(
    amqp_url, run_name, tmp_path, clean
):
    from brokerfl.transports.amqp import AmqpTransport
    from brokerfl.transports.base import REASON_HEADER
    from brokerfl.transports.topology import RunTopology

    path = tmp_path / "poison.yaml"
    path.write_text(yaml.safe_dump({**SIX, "run": run_name, "client_handlers": "tests.tools.hostile.poisoning"}))
    common = [str(path), "--broker", amqp_url, "--log-level", "warning"]
    env = {**os.environ, "BROKERFL_ATTACK": "huge", "BROKERFL_ATTACKERS": "0"}
    topology = RunTopology(run_name)

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "brokerfl.cli", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    procs = [
        start("server", *common, "--out", str(tmp_path / "out")),
        start("client", *common, "--client-id", "0"),
        start("client", *common, "--client-id", "1-5"),
    ]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outputs
        records = read_metrics(tmp_path / "out" / "metrics.jsonl")
        assert len(records) == SIX["rounds"] and all(r["num_updates"] == 5 for r in records)
        assert abs(records[-1]["accuracy"] - clean) <= 0.01, (records[-1]["accuracy"], clean)
        with AmqpTransport(amqp_url) as transport:
            reasons = []
            while (dead := transport.get(topology.dead_queue)) is not None:
                transport.ack(dead)
                if dead.envelope.type == ParameterUpdate.TYPE:
                    reasons.append(str(dead.envelope.headers.get(REASON_HEADER, "")))
        assert len(reasons) == SIX["rounds"], reasons
        assert all("update from client 0" in why and "strategy.max_update_ratio (10)" in why for why in reasons), (
            reasons
        )
    finally:
        kill_the_rest(procs)
        with AmqpTransport(amqp_url) as transport:
            topology.delete(transport, [str(i) for i in range(SIX["clients"])])
