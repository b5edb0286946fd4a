"""The worked example of docs/how-to/new-message-type.md: clients handle a new message type
(Gradients, ``handlers/gradients.py``)."""

from __future__ import annotations

import numpy as np

from brokerfl.assembly.roles import client_worker, topology_for
from brokerfl.config import load_config
from brokerfl.handlers.datasets import load_dataset
from brokerfl.handlers.trainer import init_parameters
from brokerfl.runtime.handler_table import to_clients
from brokerfl.transports.base import REASON_HEADER
from brokerfl.transports.local import LocalBroker, LocalTransport
from brokerfl.wire.message import EvaluateResult, Gradients, TrainTask, from_wire


def test_clients_answer_gradients_with_an_evaluation():
    config = load_config(None, {"clients": 2, "extra_handlers": ["gradients"]})
    broker = LocalBroker()
    admin = LocalTransport(broker)
    worker = client_worker(LocalTransport(broker), config, "0", journal=False)
    topology = topology_for(config, journal=False)
    data = load_dataset("digits")
    params = init_parameters(data.num_features, config.model.hidden, data.num_classes, seed=0)
    gradients = {k: np.ones_like(v) for k, v in params.items()}

    def send(message):
        worker.publish([to_clients(message)])

    worker.start()
    assert admin.get(topology.server_queue).envelope.type == "join"
    send(Gradients(gradients=gradients, learning_rate=0.1))  # before any model: rejected
    send(TrainTask(parameters=params, participants=["0"], round=1))
    send(Gradients(gradients=gradients, learning_rate=0.1))
    send(Gradients(gradients={"nope": np.ones(3, np.float32)}, learning_rate=0.1))
    while worker.step(0.0):
        pass
    types = []
    while (delivery := admin.get(topology.server_queue)) is not None:
        if delivery.envelope.type != "heartbeat":  # on a loaded machine its timer may fire meanwhile
            types.append(delivery.envelope.type)
        if delivery.envelope.type == "evaluate_result":
            result = from_wire(delivery.envelope, delivery.body)
            assert isinstance(result, EvaluateResult) and 0 <= result.accuracy <= 1 and result.client_id == "0"
        admin.ack(delivery)
    # heartbeats go out on their own clock (a slow machine may take a beat between steps)
    assert [t for t in types if t != "heartbeat"] == ["parameter_update", "evaluate_result"]
    reasons = []
    while (dead := admin.get(topology.dead_queue)) is not None:
        reasons.append(dead.envelope.headers[REASON_HEADER])
        admin.ack(dead)
    assert len(reasons) == 2
    assert "no global model received yet" in reasons[0]
    assert "gradients do not fit the model" in reasons[1]
