"""Models sent once (claim check): tasks name a version of the run's models stream, a client
process fetches it once for all its logical clients and checks its hash; replay and
accounting work from what is stored. On the local transport (the AMQP path is exercised by
tests/test_faults.py's fresh-host resume)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from brokerfl.assembly.roles import client_worker, topology_for
from brokerfl.assembly.simulate import simulate
from brokerfl.config import parse_config
from brokerfl.ops.replay import replay
from brokerfl.runtime.handler_table import Outbound
from brokerfl.runtime.worker import Worker
from brokerfl.storage.accounting import account_run
from brokerfl.storage.broker_store import BrokerModelStore
from brokerfl.storage.journal import read_journal
from brokerfl.storage.model_refs import ModelCache
from brokerfl.storage.store import MemoryModelStore, ModelVersion
from brokerfl.transports.base import REASON_HEADER
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import CLIENTS
from brokerfl.wire.message import Envelope, ModelVersionStored, TrainTask, from_wire


def _config(transfer: str, **extra):
    return parse_config(
        {
            "run": "refs",
            "rounds": 3,
            "clients": 4,
            "seed": 3,
            "model_transfer": transfer,
            "train": {"epochs": 1, "max_batches": 2},
            "strategy": {"name": "fedavg", "min_clients": 4},
            **extra,
        }
    )


def test_by_reference_gives_the_same_versions_and_replays():
    inline = simulate(_config("inline"))
    broker = LocalBroker()
    by_ref = simulate(_config("reference"), broker=broker, journal=True)
    assert [r["sha256"] for r in by_ref.records] == [r["sha256"] for r in inline.records]

    journal = list(read_journal(LocalTransport(broker), topology_for(_config("reference"))))
    tasks = [from_wire(d.envelope, d.body) for d in journal if d.envelope.type == TrainTask.TYPE]
    assert len(tasks) == 3
    for task in tasks:  # no tensors in the tasks: a version, its hash and where it is
        assert task.parameters == {} and task.model_stream == "brokerfl.refs.models" and len(task.model_sha256) == 64
    stored = {
        d.envelope.headers["model_version"]: from_wire(d.envelope, d.body)
        for d in journal
        if d.envelope.type == ModelVersionStored.TYPE
    }
    assert {v: t.model_sha256 for v, t in ((t.model_version, t) for t in tasks)} == {
        v: stored[v].sha256 for v in (0, 1, 2)
    }

    result = replay(journal, _config("reference"))
    assert result.ok and [row.version for row in result.rows] == [0, 1, 2, 3]
    report = account_run(LocalTransport(broker), topology_for(_config("reference")), by_ref.store)
    assert report.ok and len(report.sent) == 12


def test_a_process_fetches_each_version_once_for_all_its_clients():
    config = _config("reference")
    broker = LocalBroker()
    topology = topology_for(config)
    topology.declare(LocalTransport(broker))
    store = BrokerModelStore(LocalTransport(broker), topology)
    parameters = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    store.put(ModelVersion(0, 0, None, "fedavg", [], parameters))
    models = ModelCache(LocalTransport(broker), topology)
    seen = []
    workers = [client_worker(LocalTransport(broker), config, cid, models=models) for cid in config.client_ids()]
    recording = workers[0].table.copy()  # what each handler is given, instead of training
    recording.register(TrainTask, lambda task, ctx: seen.append(task.parameters) or [])
    for worker in workers:
        worker.table = recording
        worker.start()
    stream, offset, sha256 = store.reference(0)
    task = TrainTask(
        run=config.run,
        round=1,
        model_version=0,
        participants=config.client_ids(),
        model_stream=stream,
        model_offset=offset,
        model_sha256=sha256,
    )
    Worker(LocalTransport(broker), topology, topology.server_queue, recording, None, name="server").publish(
        [Outbound(CLIENTS, task)]
    )
    for _ in range(20):
        for worker in workers:
            worker.step(0.01)
        if len(seen) == 4:
            break
    assert len(seen) == 4 and models.fetches == 1
    first = seen[0]["w"]
    assert all(s["w"] is first for s in seen)  # one decoded copy, shared
    assert not first.flags.writeable
    np.testing.assert_array_equal(first, parameters["w"])


@pytest.mark.parametrize("what", ["hash", "stream"])
def test_a_wrong_reference_is_dead_lettered_with_its_reason(what):
    config = _config("reference", clients=1, strategy={"name": "fedavg", "min_clients": 1})
    broker = LocalBroker()
    topology = topology_for(config)
    topology.declare(LocalTransport(broker))
    store = BrokerModelStore(LocalTransport(broker), topology)
    store.put(ModelVersion(0, 0, None, "fedavg", [], {"w": np.ones(3, dtype=np.float32)}))
    worker = client_worker(LocalTransport(broker), config, "0")
    worker.start()
    stream, offset, sha256 = store.reference(0)
    task = TrainTask(
        run=config.run,
        round=1,
        model_version=0,
        participants=["0"],
        model_offset=offset,
        model_stream=stream if what == "hash" else "brokerfl.other.models",
        model_sha256="0" * 64 if what == "hash" else sha256,
    )
    Worker(LocalTransport(broker), topology, topology.server_queue, worker.table, None, name="server").publish(
        [Outbound(CLIENTS, task)]
    )
    for _ in range(20):
        worker.step(0.01)
        if worker.dead_lettered:
            break
    dead = LocalTransport(broker).get(topology.dead_queue)
    assert dead is not None and dead.envelope.message_id == task.message_id  # nothing lost: the task is kept, with why
    reason = dead.envelope.headers[REASON_HEADER]
    assert (
        ("has hash" in reason and "the task says" in reason)
        if what == "hash"
        else "not this run's models stream" in reason
    )
    assert worker.handled == 1  # only Started: no handler saw the task


def test_the_store_keeps_metadata_of_every_version_and_parameters_of_the_newest():
    broker = LocalBroker()
    topology = topology_for(_config("reference"))
    topology.declare(LocalTransport(broker))
    store = BrokerModelStore(LocalTransport(broker), topology, keep=2)
    for v in range(5):
        store.put(ModelVersion(v, v, v - 1 if v else None, "fedavg", [f"u{v}"], {"w": np.full(4, v, dtype=np.float32)}))
    assert len(store._cache) == 2 and store.versions() == [0, 1, 2, 3, 4]
    assert store.get(1).parameters["w"][0] == 1  # re-read from the stream
    fresh = BrokerModelStore(LocalTransport(broker), topology).refresh()  # a server on a fresh host
    assert fresh.versions() == [0, 1, 2, 3, 4] and fresh.metadata(3)["update_ids"] == ["u3"]
    assert fresh.latest().parameters["w"][0] == 4 and fresh.get(0).parameters["w"][0] == 0


def test_scores_that_come_after_a_version_are_restored_with_it():
    """The server evaluates a version after storing it (off the round's critical path); a
    server resumed on a fresh host must know the score too (its metrics lines, its curve)."""
    broker = LocalBroker()
    topology = topology_for(_config("reference"))
    topology.declare(LocalTransport(broker))
    store = BrokerModelStore(LocalTransport(broker), topology)
    for v in range(3):
        store.put(
            ModelVersion(
                v,
                v,
                v - 1 if v else None,
                "fedavg",
                [],
                {"w": np.full(4, v, dtype=np.float32)},
                metrics={"accuracy": None, "loss": None},
            )
        )
    store.put_scores(1, {"accuracy": np.float64(0.75), "loss": 0.5})
    assert store.metadata(1)["metrics"] == {"accuracy": 0.75, "loss": 0.5}
    # a malformed scores record (the stream is the server's own, but bytes are bytes) costs only itself
    LocalTransport(broker).publish(
        "", topology.models_stream, Envelope("model_version_scores", "bad", "model-store", 0.0, {}), b"\xc1not msgpack"
    )
    store.put_scores(2, {"accuracy": 0.8, "loss": 0.4})
    fresh = BrokerModelStore(LocalTransport(broker), topology).refresh()
    assert [fresh.metadata(v)["metrics"]["accuracy"] for v in range(3)] == [None, 0.75, 0.8]
    assert fresh.latest().metrics["accuracy"] == 0.8  # the parameters kept, with their score
    with pytest.raises(KeyError):
        store.put_scores(7, {"accuracy": 1.0})


class _SlowExport(MemoryModelStore):
    """An export whose writes block until released (a disk that lags), recording their order."""

    def __init__(self, fail: set[int] = frozenset()) -> None:
        super().__init__(keep=None)
        self.release, self.written, self.fail = threading.Event(), [], fail

    def put(self, model: ModelVersion) -> None:
        assert self.release.wait(30)
        if model.version in self.fail:
            raise OSError("disk full")
        super().put(model)
        self.written.append(model.version)


def test_a_put_does_not_wait_for_the_previous_export_and_exports_stay_in_order():
    broker = LocalBroker()
    topology = topology_for(_config("reference"))
    topology.declare(LocalTransport(broker))
    export = _SlowExport(fail={1})
    store = BrokerModelStore(LocalTransport(broker), topology, export=export)
    # the first is being written (blocked), the second waits: neither put waits for a write
    puts = threading.Thread(
        target=lambda: [
            store.put(ModelVersion(v, v, v - 1 if v else None, "fedavg", [], {"w": np.full(4, v, dtype=np.float32)}))
            for v in range(2)
        ]
    )
    puts.start()
    puts.join(10)
    assert not puts.is_alive() and export.written == [] and store.versions() == [0, 1]
    waiter = threading.Thread(
        target=lambda: store.put(ModelVersion(2, 2, 1, "fedavg", [], {"w": np.full(4, 2, dtype=np.float32)}))
    )
    waiter.start()  # a third would hold a third model: it waits for room
    waiter.join(0.2)
    assert waiter.is_alive()
    export.release.set()
    waiter.join(30)
    store.wait_for_export()
    assert export.written == [0, 2]  # in order; version 1's failed export did not stop the next
    assert store.versions() == [0, 1, 2]


def test_a_floor_learnt_ahead_still_finds_the_version():
    broker = LocalBroker()
    topology = topology_for(_config("reference"))
    topology.declare(LocalTransport(broker))
    store = BrokerModelStore(LocalTransport(broker), topology)
    store.put(ModelVersion(0, 0, None, "fedavg", [], {"w": np.zeros(4, dtype=np.float32)}))
    store.prepare()  # learnt before version 1 exists, with another writer's message in between
    LocalTransport(broker).publish(
        "", topology.models_stream, Envelope("models_mark", "someone-else", "other", 0.0, {}), b""
    )
    store.put(ModelVersion(1, 1, 0, "fedavg", [], {"w": np.ones(4, dtype=np.float32)}))
    stream, offset, sha256 = store.reference(1)
    cache = ModelCache(LocalTransport(broker), topology)
    assert cache.parameters(stream, 1, offset, sha256)["w"][0] == 1
    assert store.reference(0)[1] < offset


def test_a_version_the_transport_could_not_reassemble_is_refused_with_the_transports_reason(monkeypatch):
    """Over max_message_mib, a stream consumer hands out each chunk with the reason (a stream
    dead-letters nothing): the fetch names that reason, not a failure to decode one chunk."""
    import brokerfl.storage.model_refs as model_refs
    from brokerfl.transports.base import Delivery

    topology = topology_for(_config("reference"))
    reason = "chunked message m: 652148758 bytes is more than reassembly holds (... with max_message_mib)"
    first_chunk = Delivery(
        topology.models_stream,
        "",
        "",
        Envelope("model_version", "server", "refs", 0.0, {}),
        b"x" * 64,
        False,
        None,
        problem=reason,
    )
    monkeypatch.setattr(model_refs, "read_version", lambda *args, **kwargs: first_chunk)
    cache = ModelCache(LocalTransport(LocalBroker()), topology)
    with pytest.raises(model_refs.ModelRefError, match="cannot be read: .*max_message_mib"):
        cache.parameters(topology.models_stream, 0, 0, "0" * 64)
