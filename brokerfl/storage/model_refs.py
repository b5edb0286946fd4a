"""Models sent once: the client side of the claim check.

A task that carries its model by reference (``model_stream``, ``model_offset``,
``model_sha256``; see :class:`brokerfl.wire.message.TrainTask`) is completed here before any
handler sees it: the version is read from the run's models stream once per process, its
hash checked, and the decoded parameters (read-only arrays over the received body) shared
by every logical client of the process. So a process's memory holds one copy of a version,
however many logical clients it hosts, and the broker carries the model once per process,
not once per client queue.

A reference that cannot be right (another stream, a hash that does not match what the
stream holds) is a :class:`ModelRefError`: the worker dead-letters the task with the
reason. A fetch that fails for the broker's sake (:class:`TransportError`) gives the task
back to its queue instead: it was not the task's fault.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from brokerfl.storage.broker_store import read_version
from brokerfl.storage.store import parameters_hash
from brokerfl.transports.base import Transport
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.codec import DecodeError, decode
from brokerfl.wire.message import Message, Tensors


class ModelRefError(ValueError):
    """A task's model reference is wrong; the task is dead-lettered with this reason."""


def by_reference(message: Message) -> bool:
    return bool(getattr(message, "model_stream", ""))


class ModelCache:
    """The versions this process fetched (the newest ``keep``), shared by its logical
    clients. ``transport`` is a connection of its own: fetching polls it while a handler's
    delivery is in hand on the workers' connection."""

    def __init__(self, transport: Transport, topology: RunTopology, *, keep: int = 1, timeout_s: float = 120.0) -> None:
        self.transport, self.topology, self.keep, self.timeout_s = transport, topology, max(1, keep), timeout_s
        self._versions: OrderedDict[int, tuple[str, Tensors]] = OrderedDict()  # version -> (sha256, parameters)
        self.fetches = 0
        self.bytes_fetched = 0

    def resolve(self, message: Message) -> None:
        """Fill a by-reference task's ``parameters`` (a no-op for an inline one)."""
        if not by_reference(message):
            return
        if message.parameters:
            raise ModelRefError(f"{message.TYPE} carries parameters and a model reference: one or the other")
        # a dict of its own (handlers may add or drop names), over the one shared read-only copy
        message.parameters = dict(
            self.parameters(message.model_stream, message.model_version, message.model_offset, message.model_sha256)
        )

    def parameters(self, stream: str, version: int, offset: int, sha256: str) -> Tensors:
        if stream != self.topology.models_stream:
            raise ModelRefError(
                f"the model reference names stream {stream[:200]!r}, not this run's models stream "
                f"{self.topology.models_stream!r}"
            )
        held = self._versions.get(version)
        if held is None:
            held = self._fetch(version, offset)
        actual, parameters = held
        if actual != sha256:
            raise ModelRefError(
                f"model version {version} in {stream} has hash {actual[:16]}..., the task says {sha256[:16]}...: the "
                "task is not trusted"
            )
        return parameters

    def _fetch(self, version: int, offset: int) -> tuple[str, Tensors]:
        while len(self._versions) >= self.keep:  # room first: never the old and the new version at once
            self._versions.popitem(last=False)
        delivery = read_version(
            self.transport,
            self.topology.models_stream,
            version,
            offset,
            timeout_s=self.timeout_s,
            what="fetching a task's model",
        )
        if delivery.problem:  # e.g. more than max_message_mib: its pieces come one by one, each with why
            raise ModelRefError(
                f"model version {version} in {self.topology.models_stream} cannot be read: {delivery.problem}"
            )
        try:
            payload = decode(delivery.body)
        except DecodeError as exc:
            raise ModelRefError(
                f"model version {version} in {self.topology.models_stream} cannot be decoded: {exc}"
            ) from None
        parameters = payload.get("parameters") if isinstance(payload, dict) else None
        if not isinstance(parameters, dict) or not all(
            isinstance(k, str) and isinstance(v, np.ndarray) for k, v in parameters.items()
        ):
            raise ModelRefError(f"model version {version} in {self.topology.models_stream} holds no named arrays")
        held = (parameters_hash(parameters), parameters)
        self.fetches += 1
        self.bytes_fetched += len(delivery.body)
        self._versions[version] = held  # the oldest went above: a superseded version is not trained on again
        return held

    def stats(self) -> dict[str, Any]:
        return {"fetches": self.fetches, "bytes_fetched": self.bytes_fetched, "cached_versions": sorted(self._versions)}


REFERENCE_MIN_BYTES = 1024**2  # model_transfer auto: from here on by reference (docs/concepts/models-by-reference.md)


def task_model_fields(config: Any, store: Any, model: Any) -> dict[str, Any]:
    """The fields of a task that carry stored version ``model``: a reference to the run's
    models stream where the store keeps versions there (and ``model_transfer`` wants one),
    else the parameters inline."""
    reference = getattr(store, "reference", None)
    mode = config.model_transfer
    if reference is not None and (
        mode == "reference"
        or (mode == "auto" and sum(a.nbytes for a in model.parameters.values()) >= REFERENCE_MIN_BYTES)
    ):
        stream, offset, sha256 = reference(model.version)
        return {"model_stream": stream, "model_offset": offset, "model_sha256": sha256}
    return {"parameters": model.parameters}
