"""What a client process keeps of a task once its update is published: nothing model-sized
(the trained arrays, the torch module, the encoded body). Asserted with weak references,
not timing or RSS (benchmarks/client_memory.py measures the process's peak)."""

from __future__ import annotations

import weakref

import numpy as np

from brokerfl.app import App
from brokerfl.assembly.roles import client_worker, topology_for
from brokerfl.config import parse_config
from brokerfl.runtime.handler_table import Outbound
from brokerfl.runtime.worker import Worker
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.transports.topology import CLIENTS
from brokerfl.wire.message import ParameterUpdate, TrainTask, from_wire


class RecordingTransport(LocalTransport):
    """A local transport that records the type of each body it is given (it keeps what it
    is given joined: a broker's copy)."""

    given: list[str] = []

    def publish(self, exchange, routing_key, envelope, body):
        self.given.append(type(body).__name__)
        super().publish(exchange, routing_key, envelope, body)


def test_a_client_keeps_nothing_of_a_task_after_publishing_its_update(monkeypatch):
    config = parse_config(
        {
            "run": "keeps",
            "clients": 1,
            "seed": 1,
            "rounds": 1,
            "model": {"hidden": [600, 600]},
            "train": {"epochs": 1, "batch_size": 8, "max_batches": 1, "momentum": 0.0},
            "strategy": {"name": "fedavg", "min_clients": 1},
        }
    )
    broker = LocalBroker()
    topology = topology_for(config)
    worker = client_worker(RecordingTransport(broker), config, "0")
    trained: list[weakref.ref] = []
    original = App.train

    def train(self, parameters, data, settings, seed, context=None):
        new, metrics = original(self, parameters, data, settings, seed, context)
        trained.extend(weakref.ref(a) for a in new.values())
        return new, metrics

    monkeypatch.setattr(App, "train", train)
    worker.start()  # handles Started (its Join)
    joined = worker.handled
    initial = worker.state.app.initial_parameters(1)
    task = TrainTask(run=config.run, round=1, model_version=0, participants=["0"], parameters=initial)
    Worker(LocalTransport(broker), topology, topology.server_queue, worker.table, None, name="server").publish(
        [Outbound(CLIENTS, task)]
    )
    for _ in range(100):
        worker.step(0.01)
        if worker.handled > joined:
            break
    assert worker.handled == joined + 2 and len(trained) == len(
        initial
    )  # the task, then its training's outcome (Trained)
    assert "list" in RecordingTransport.given  # the update went out as its buffers, unjoined
    assert all(ref() is None for ref in trained), "the trained arrays outlived the published update"
    (update,) = [
        from_wire(m.envelope, m.body)
        for m in broker.queues[topology.server_queue].ready
        if m.envelope.type == ParameterUpdate.TYPE
    ]
    assert update.parameters.keys() == initial.keys()
    assert not all(np.array_equal(update.parameters[k], initial[k]) for k in initial)  # it did train
