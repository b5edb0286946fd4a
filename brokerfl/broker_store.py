"""Model versions kept on the broker: a run's models stream (``brokerfl.<run>.models``).

For workflows where no process owns a disk the next one could read (swarm: whoever holds
the aggregator role next may run on another host), a version is durable once the broker
has confirmed it into the stream. :meth:`BrokerModelStore.refresh` reads the stream from
the first offset to a mark it publishes itself (a stream has no end a reader is told
about), so a process taking the aggregator role over sees every version stored before.

The store keeps every version it has read in memory (parameters too): fine for the models
swarm runs train here; a large model would keep metadata only and re-read on ``get``.
"""

from __future__ import annotations

import time
from collections import deque

from brokerfl.codec import decode, encode
from brokerfl.message import Envelope, new_message_id
from brokerfl.store import ModelStore, ModelVersion
from brokerfl.topology import RunTopology
from brokerfl.transport import Delivery, Transport, TransportError

VERSION_TYPE = "stored_model_version"
MARK_TYPE = "models_mark"


class BrokerModelStore(ModelStore):
    """Versions in the run's models stream, over a connection of its own."""

    def __init__(self, transport: Transport, topology: RunTopology, *, timeout_s: float = 120.0) -> None:
        self.transport, self.topology, self.timeout_s = transport, topology, timeout_s
        self._models: dict[int, ModelVersion] = {}

    def put(self, model: ModelVersion) -> None:
        if model.version in self._models:
            raise ValueError(f"model version {model.version} is already stored")
        body = encode({"meta": model.metadata(), "parameters": model.parameters})
        envelope = Envelope(VERSION_TYPE, new_message_id(), "model-store", time.time(), {"run": self.topology.run, "model_version": model.version})
        self.transport.publish("", self.topology.models_stream, envelope, body)  # returns once confirmed
        self._models[model.version] = model

    def get(self, version: int) -> ModelVersion:
        try:
            return self._models[version]
        except KeyError:
            raise KeyError(f"no model version {version} in {self.topology.models_stream}") from None

    def versions(self) -> list[int]:
        return sorted(self._models)

    def refresh(self) -> BrokerModelStore:
        """Read every version the stream holds now (those another process stored too)."""
        mark = Envelope(MARK_TYPE, new_message_id(), "model-store", time.time(), {"run": self.topology.run})
        self.transport.publish("", self.topology.models_stream, mark, b"")
        pending: deque[Delivery] = deque()
        tag = self.transport.consume(self.topology.models_stream, pending.append, prefetch=64, offset="first")
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                if not pending:
                    if time.monotonic() > deadline:
                        raise TransportError(f"the models stream of run {self.topology.run!r} did not reach its end mark within {self.timeout_s:.0f} s")
                    self.transport.poll(0.1)
                    continue
                delivery = pending.popleft()
                self.transport.ack(delivery)
                if delivery.envelope.message_id == mark.message_id:
                    return self
                if delivery.envelope.type == VERSION_TYPE:
                    payload = decode(delivery.body)
                    meta = payload["meta"]
                    if meta["version"] not in self._models:
                        self._models[meta["version"]] = ModelVersion(parameters=payload["parameters"], **meta)
        finally:
            self.transport.cancel(tag)
