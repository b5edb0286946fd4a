"""Flower apps run by brokerfl (config ``flower_app``), in process (``simulate``): the
test app ``tests/flower_apps/tiny`` (FedAvg over two numpy arrays, deterministic) trains
to the same arrays on every run; a node keeps its Context across rounds and across a
restart; a failing ClientApp is a Flower Error the ServerApp's strategy leaves out; a
malformed reply is dead-lettered; every mistake in the app or its config is a clear
ConfigError before the run starts."""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

import brokerfl.flower  # noqa: E402
from brokerfl.assembly.roles import topology_for  # noqa: E402
from brokerfl.assembly.simulate import simulate  # noqa: E402
from brokerfl.config import ConfigError, parse_config  # noqa: E402
from brokerfl.flower import node_id_of, records  # noqa: E402
from brokerfl.flower.app_dir import load_flower_app, node_config  # noqa: E402
from brokerfl.flower.node import CLIENT_APP_RAISED_EXCEPTION, Node, to_flower_request  # noqa: E402
from brokerfl.storage.journal import read_journal  # noqa: E402
from brokerfl.transports.base import REASON_HEADER  # noqa: E402
from brokerfl.transports.local import LocalBroker, LocalTransport  # noqa: E402
from brokerfl.transports.topology import SERVER, routing_key  # noqa: E402
from brokerfl.wire.message import FlowerReply, FlowerRequest, from_wire, to_wire  # noqa: E402

pytestmark = pytest.mark.timeout(60)

APPS = Path(__file__).resolve().parent / "flower_apps"
TINY = APPS / "tiny"
ROUNDS = 3


def tiny_config(run: str = "tiny", clients: int = 3, **flower_config) -> object:
    return parse_config(
        {
            "run": run,
            "clients": clients,
            "flower_app": str(TINY),
            "flower_config": {"num-server-rounds": ROUNDS, **flower_config},
        }
    )


def metrics_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_arrays(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{i}"] for i in range(len(saved.files))]


# ---------------------------------------------------------------- runs


def test_the_tiny_app_trains_to_the_same_arrays_bit_for_bit(tmp_path):
    finals = []
    for attempt in ("first", "second"):
        out = tmp_path / attempt
        simulate(tiny_config(**{"final-model": str(tmp_path / f"{attempt}.npz")}), out)
        lines = metrics_lines(out)
        assert [(line["round"], line["flower"]) for line in lines] == [
            (r, kind) for r in range(1, ROUNDS + 1) for kind in ("train", "evaluate")
        ]
        assert all(line["num_updates"] == 3 and line["errors"] == 0 for line in lines)
        finals.append(final_arrays(tmp_path / f"{attempt}.npz"))
    first, second = finals
    assert [(a.dtype, a.shape) for a in first] == [(np.float32, (3, 4)), (np.float64, (5,))]
    assert all(a.tobytes() == b.tobytes() for a, b in zip(first, second, strict=True))
    assert any(a.any() for a in first)  # trained: not the initial zeros and arange


def test_a_nodes_context_state_persists_across_rounds(tmp_path):
    """The ClientApp counts the requests it handled in ``context.state``: a train then an
    evaluate each round, so every node has seen 2r-1 after round r's train, 2r after its
    evaluate (the weighted mean of equal counts is the count)."""
    simulate(tiny_config(), tmp_path)
    seen = {(line["round"], line["flower"]): line["metrics"]["seen"] for line in metrics_lines(tmp_path)}
    assert [seen[(r, "train")] for r in range(1, ROUNDS + 1)] == [1.0, 3.0, 5.0]
    assert [seen[(r, "evaluate")] for r in range(1, ROUNDS + 1)] == [2.0, 4.0, 6.0]


def test_a_failing_client_app_is_a_flower_error_and_the_run_finishes(tmp_path):
    config = tiny_config(**{"fail-on": "1:2", "final-model": str(tmp_path / "final.npz")})
    result = simulate(config, tmp_path / "out", journal=True)
    lines = {(line["round"], line["flower"]): line for line in metrics_lines(tmp_path / "out")}
    assert len(lines) == 2 * ROUNDS
    assert (lines[(2, "train")]["num_updates"], lines[(2, "train")]["errors"]) == (2, 1)
    others = [line for key, line in lines.items() if key != (2, "train")]
    assert all((line["num_updates"], line["errors"]) == (3, 0) for line in others)
    assert (tmp_path / "final.npz").exists()
    assert result.server_state.errors == 1 and result.server_state.failure is None

    replies = [
        message
        for delivery in read_journal(LocalTransport(result.broker), topology_for(config, journal=True))
        if isinstance(message := from_wire(delivery.envelope, delivery.body), FlowerReply)
    ]
    failed = [reply for reply in replies if reply.error_code is not None]
    assert len(replies) == 3 * 2 * ROUNDS
    assert [(r.client_id, r.round, r.message_type, r.error_code) for r in failed] == [
        ("1", 2, "train", CLIENT_APP_RAISED_EXCEPTION)
    ]
    assert failed[0].error_reason == "RuntimeError: partition 1 fails in round 2"
    assert failed[0].content == {}


def test_a_malformed_reply_to_the_server_is_dead_lettered_and_the_run_goes_on(tmp_path):
    """A reply whose records are not Flower's (a bool metric), in the server's queue before
    the run starts: the server dead-letters it with the reason; the rounds are unchanged."""
    config = tiny_config()
    broker = LocalBroker()
    topology = topology_for(config)
    attacker = LocalTransport(broker)
    topology.declare(attacker)
    malformed = FlowerReply(
        run=config.run,
        round=1,
        client_id="0",
        node_id=node_id_of(config.run, "0"),
        request_id="0" * 32,
        reply_id="1" * 32,
        message_type="train",
        content={"records": [["metrics", "metrics", [["accuracy", True]]]]},
    )
    attacker.publish(topology.exchange, routing_key(SERVER, FlowerReply.TYPE), *to_wire(malformed))
    simulate(config, tmp_path, broker=broker)
    lines = metrics_lines(tmp_path)
    assert len(lines) == 2 * ROUNDS and all(line["num_updates"] == 3 for line in lines)
    reasons = []
    while (delivery := attacker.get(topology.dead_queue)) is not None:
        assert delivery.envelope.message_id == malformed.message_id
        reasons.append(delivery.envelope.headers[REASON_HEADER])
        attacker.ack(delivery)
    assert len(reasons) == 1
    assert f"reply {malformed.reply_id}" in reasons[0]
    assert "record 'metrics'['accuracy']: a metric is a number, not a bool" in reasons[0]


# ---------------------------------------------------------------- a node's context and replies on disk


def a_request(run: str = "tiny", client_id: str = "0", server_round: int = 1, seq: int = 0) -> FlowerRequest:
    content = records.pack(
        RecordDict(
            {
                "arrays": ArrayRecord([np.zeros((3, 4), dtype=np.float32), np.arange(5, dtype=np.float64)]),
                "config": ConfigRecord({"server-round": server_round}),
            }
        )
    )
    return FlowerRequest(
        run=run,
        round=server_round,
        client_id=client_id,
        node_id=node_id_of(run, client_id),
        request_id=f"{seq:032d}",
        message_type="train",
        group_id=str(server_round),
        ttl=3600.0,
        created_at=1000.0,
        seq=seq,
        content=content,
    )


def a_node(state_file: Path, client_id: str = "0") -> Node:
    app = load_flower_app(TINY)
    return Node(
        run="tiny",
        client_id=client_id,
        node_id=node_id_of("tiny", client_id),
        node_config=node_config(0, 3),
        run_config=dict(app.run_config),
        state_file=state_file,
    )


class NeverCalled:
    def __call__(self, *args):
        raise AssertionError("the ClientApp ran again on a request it had answered")


def test_a_node_keeps_its_reply_and_context_across_a_restart(tmp_path):
    """The reply and ``context.state`` are saved before the reply is sent: a fresh Node on
    the same file (a restarted client) answers the request again with the very reply, and
    goes on from the state it left."""
    client_app = load_flower_app(TINY).load_client_app()
    state_file = tmp_path / "site" / "0.flower-context"
    first = a_request()
    node = a_node(state_file)
    reply = node.handle(client_app, first, to_flower_request(first))
    assert reply.error_code is None and state_file.exists()
    assert node.context.state["seen"]["count"] == 1

    restarted = a_node(state_file)
    again = restarted.answered(first)
    assert again is not None
    assert to_wire(again)[1] == to_wire(reply)[1]  # the same reply, byte for byte
    assert (again.request_id, again.reply_id, again.message_id) == (reply.request_id, reply.reply_id, reply.message_id)
    assert restarted.context.state["seen"]["count"] == 1
    assert restarted.answered(a_request(server_round=2, seq=1)) is None

    second = a_request(server_round=2, seq=1)
    restarted.handle(client_app, second, to_flower_request(second))
    assert restarted.context.state["seen"]["count"] == 2
    assert a_node(state_file).answered(second).request_id == second.request_id


def test_a_request_delivered_again_gets_the_saved_reply_without_running_the_app(tmp_path):
    from brokerfl.handlers.workflows.flower_client import FlowerNodeState, handle_request

    client_app = load_flower_app(TINY).load_client_app()
    state_file = tmp_path / "0.flower-context"
    request = a_request()
    reply = a_node(state_file).handle(client_app, request, to_flower_request(request))

    restarted = a_node(state_file)
    state = FlowerNodeState(config=tiny_config(), client_id="0", node=restarted, client_app=NeverCalled())
    logged = []
    ctx = SimpleNamespace(state=state, log=SimpleNamespace(info=lambda event, **fields: logged.append(event)))
    redelivered = from_wire(*to_wire(request))
    (out,) = handle_request(redelivered, ctx)
    assert out.message.reply_id == reply.reply_id and to_wire(out.message)[1] == to_wire(reply)[1]
    assert logged == ["request delivered again: its reply is sent again"]
    assert restarted.context.state["seen"]["count"] == 1


def test_a_client_app_that_raises_is_an_error_reply_and_its_state_is_kept(tmp_path):
    state_file = tmp_path / "0.flower-context"
    client_app = load_flower_app(TINY).load_client_app()
    node = a_node(state_file)
    first = a_request()
    node.handle(client_app, first, to_flower_request(first))
    node.context.run_config["fail-on"] = "0:2"  # the Context holds its own copy
    second = a_request(server_round=2, seq=1)
    reply = node.handle(client_app, second, to_flower_request(second))
    assert (reply.error_code, reply.error_reason) == (
        CLIENT_APP_RAISED_EXCEPTION,
        "RuntimeError: partition 0 fails in round 2",
    )
    restarted = a_node(state_file)
    assert restarted.answered(second).error_code == CLIENT_APP_RAISED_EXCEPTION
    assert restarted.context.state["seen"]["count"] == 1


# ---------------------------------------------------------------- mistakes


@pytest.fixture
def own_imports(monkeypatch):
    """The app directories a test puts on sys.path, and the modules it imports from them,
    are gone after it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("broken_import_app", "wrong_kind_components")):
            del sys.modules[name]


def app_dir(tmp_path: Path, name: str, pyproject: str, **modules: str) -> Path:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "pyproject.toml").write_text(pyproject)
    for module, source in modules.items():
        (directory / f"{module}.py").write_text(source)
    return directory


def config_with(**keys) -> dict:
    return {"run": "tiny", "clients": 3, **keys}


def test_a_missing_directory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"flower_app .*nowhere: no such directory"):
        parse_config(config_with(flower_app=str(tmp_path / "nowhere")))


def test_a_directory_without_pyproject_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"not a Flower app \(no pyproject.toml\)"):
        parse_config(config_with(flower_app=str(tmp_path)))


def test_a_pyproject_without_components_is_a_config_error():
    with pytest.raises(ConfigError, match=r"not a Flower app \(pyproject.toml has no \[tool.flwr.app.components\]\)"):
        parse_config(config_with(flower_app=str(APPS / "no_components")))


def test_a_component_that_fails_to_import_is_a_config_error_before_the_run(tmp_path, own_imports):
    config = parse_config(config_with(flower_app=str(APPS / "broken_import")))  # components import in the processes
    with pytest.raises(
        ConfigError,
        match=r"serverapp 'broken_import_app.server:app' failed to import: RuntimeError: this ServerApp module fails",
    ):
        simulate(config, tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_component_that_is_not_the_app_kind_is_a_config_error(tmp_path, own_imports):
    pyproject = (
        "[tool.flwr.app.components]\n"
        'serverapp = "wrong_kind_components:server"\n'
        'clientapp = "wrong_kind_components:client"\n'
    )
    directory = app_dir(tmp_path, "wrong", pyproject, wrong_kind_components="server = 3\n")
    config = parse_config(config_with(flower_app=str(directory)))
    with pytest.raises(ConfigError, match=r"serverapp 'wrong_kind_components:server' is a int, not a ServerApp"):
        simulate(config, tmp_path / "out")


def test_a_component_reference_that_is_not_module_colon_attribute_is_a_config_error(tmp_path):
    pyproject = '[tool.flwr.app.components]\nserverapp = "server.app"\nclientapp = "client:app"\n'
    with pytest.raises(ConfigError, match=r"serverapp must be 'module:attribute', not 'server.app'"):
        parse_config(config_with(flower_app=str(app_dir(tmp_path, "refs", pyproject))))


def test_a_flower_config_key_the_app_does_not_have_is_a_config_error():
    with pytest.raises(
        ConfigError,
        match=r"flower_config: 'num-rounds' is not in the app's \[tool.flwr.app.config\] \(its keys: fail-on, "
        r"final-model, fraction-evaluate, num-server-rounds, slow-s\)",
    ):
        parse_config(config_with(flower_app=str(TINY), flower_config={"num-rounds": 2}))


def test_a_bool_for_a_number_in_flower_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"flower_config: 'num-server-rounds' must be a int like the app's default"):
        parse_config(config_with(flower_app=str(TINY), flower_config={"num-server-rounds": True}))


def test_a_str_for_a_number_in_flower_config_is_a_config_error():
    with pytest.raises(ConfigError, match=r"flower_config: 'num-server-rounds' must be a int like the app's default"):
        parse_config(config_with(flower_app=str(TINY), flower_config={"num-server-rounds": "3"}))


def test_node_config_for_a_client_not_in_the_run_is_a_config_error():
    with pytest.raises(ConfigError, match=r"flower_node_config: '7' is not a client id of the run \(0-2\)"):
        parse_config(config_with(flower_app=str(TINY), flower_node_config={"7": {"data": "x"}}))


def test_a_swarm_workflow_with_a_flower_app_is_a_config_error():
    with pytest.raises(ConfigError, match=r"flower_app: .* workflow must be server, not 'swarm'"):
        parse_config(config_with(flower_app=str(TINY), workflow="swarm"))


@pytest.mark.parametrize("version", ["1.39.2", "1.43.0", "2.0.0", "unknown"])
def test_an_unsupported_flwr_is_a_config_error(monkeypatch, version):
    monkeypatch.setattr(brokerfl.flower.metadata, "version", lambda name: version)
    with pytest.raises(
        ConfigError, match=rf"flwr {version} is installed; brokerfl runs Flower apps with flwr>=1\.40,<1\.43"
    ):
        parse_config(config_with(flower_app=str(TINY)))


def test_a_missing_flwr_is_a_config_error(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(brokerfl.flower.metadata, "version", not_installed)
    with pytest.raises(ConfigError, match=r"a Flower app needs flwr>=1\.40,<1\.43: pip install 'brokerfl\[flower\]'"):
        parse_config(config_with(flower_app=str(TINY)))


def test_a_sites_node_config_entries_are_typed_and_its_contexts_kept_on_disk():
    import argparse

    from brokerfl.cli.commands import _flower_client_config

    config = parse_config(config_with(flower_app=str(TINY), flower_node_config={"*": {"shared": "x"}}))
    args = argparse.Namespace(node_config=["data-path=/srv/site a", "batch=32", "on=true", "lr=0.5"], client_id=["1"])
    site = _flower_client_config(config, args)
    assert site.flower_node_config["1"] == {"data-path": "/srv/site a", "batch": 32, "on": True, "lr": 0.5}
    assert site.flower_node_config["*"] == {"shared": "x"}
    assert site.client_state_dir == "runs/tiny/nodes"
    with pytest.raises(SystemExit, match="give KEY=VALUE"):
        _flower_client_config(config, argparse.Namespace(node_config=["no-value"], client_id=["1"]))
    with pytest.raises(SystemExit, match="a bool, number or string"):
        _flower_client_config(config, argparse.Namespace(node_config=["list=[1, 2]"], client_id=["1"]))
