"""Model versions kept on the broker: a run's models stream (``brokerfl.<run>.models``).

Every run has one. A version is durable once the broker has confirmed it into the stream,
so a server on a fresh host with an empty directory resumes from the broker alone
(:meth:`BrokerModelStore.refresh` reads the stream from the first offset to a mark it
publishes itself: a stream has no end a reader is told about). Swarm peers taking the
aggregator role over read it the same way.

It is also where clients fetch the model they train (the claim check): a TrainTask
carries the version, its hash and an offset of the stream at or before the version's
message (:meth:`BrokerModelStore.reference`); :class:`brokerfl.storage.model_refs.ModelCache`
reads it from there. The offset is learnt with a small mark published right before the
version: its offset + 1 is at or before the version, and nothing but marks, other versions
and versions' scores lies between.

A version's scores (its evaluation on the server's test data runs off the round's critical
path, after the version is stored) follow it into the stream as a small message of their
own (:meth:`BrokerModelStore.put_scores`), so a server resumed elsewhere knows them too.

The store keeps every version's metadata, but the parameters of the newest ``keep``
versions only (a 10M model is 38 MiB a version); ``get`` of an older one re-reads it from
the stream. ``export`` (e.g. a :class:`brokerfl.storage.store.DirectoryModelStore` on ``DIR/models``)
receives a copy of every version stored or read here, for people and tools that want files.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from typing import Any

import structlog

from brokerfl.storage.store import ModelStore, ModelVersion
from brokerfl.transports.base import Delivery, Transport
from brokerfl.transports.stream_reader import StreamReader
from brokerfl.transports.topology import RunTopology
from brokerfl.wire.codec import decode, encode_parts
from brokerfl.wire.message import Envelope, new_message_id

log = structlog.get_logger("brokerfl.model_store")

VERSION_TYPE = "stored_model_version"
SCORES_TYPE = "model_version_scores"  # a version's evaluation, which comes after the version
MARK_TYPE = "models_mark"
EXPORTS_QUEUED = 1  # versions waiting for their export beside the one being written
OFFSET_HEADER = "x-stream-offset"  # RabbitMQ's (and the local transport's) offset of a stream delivery


def stream_offset(delivery: Delivery) -> int | None:
    offset = (delivery.envelope.headers or {}).get(OFFSET_HEADER)
    return offset if isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0 else None


def version_of(delivery: Delivery) -> int | None:
    """The model version a models-stream message holds (None for marks and strangers)."""
    if delivery.envelope.type != VERSION_TYPE:
        return None
    version = (delivery.envelope.headers or {}).get("model_version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def read_version(
    transport: Transport, stream: str, version: int, start: int | str, *, timeout_s: float, what: str
) -> Delivery:
    """The delivery of ``version`` from ``stream``, reading from offset ``start`` on
    (acked; the consumer is cancelled). TransportError after ``timeout_s`` without a message."""
    with StreamReader(
        transport,
        stream,
        offset=start,
        silence_s=timeout_s,
        what=lambda silence: (
            f"{what}: model version {version} not found in {stream} from offset {start} ({silence:.0f} s without a "
            "message)"
        ),
    ) as reader:
        return next(delivery for delivery in reader if version_of(delivery) == version)


class BrokerModelStore(ModelStore):
    """Versions in the run's models stream, over a connection of its own (reading the
    stream polls that connection, which must not run another consumer's handlers)."""

    def __init__(
        self,
        transport: Transport,
        topology: RunTopology,
        *,
        keep: int = 2,
        export: ModelStore | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        self.transport, self.topology, self.timeout_s = transport, topology, timeout_s
        self.keep, self.export = max(1, keep), export
        self._meta: dict[int, dict[str, Any]] = {}
        self._floor: dict[int, int | str] = {}  # version -> an offset at or before its message
        self._cache: OrderedDict[int, ModelVersion] = OrderedDict()  # the newest `keep` versions, with parameters
        # exports waiting or being written, oldest first, and the one thread writing them
        self._exports: deque[ModelVersion] = deque()
        self._export_lock = threading.Condition()
        self._exporter: threading.Thread | None = None
        self._prepared: int | str | None = None  # the next version's floor, learnt ahead (prepare)
        transport.declare_queue(topology.models_stream, kind="stream")

    @property
    def stream(self) -> str:
        return self.topology.models_stream

    def prepare(self) -> None:
        """Learn the next version's floor now (the mark's round trip to the broker), so that
        :meth:`put` need not: a caller with other work to do meanwhile (hashing the version
        on a thread) takes the round trip off its critical path. Valid until the next put:
        only marks and versions are written to the stream, so an offset taken now is at or
        before the next version's message."""
        if self._prepared is None:
            self._prepared = self._tail()

    def put(self, model: ModelVersion) -> None:
        if model.version in self._meta:
            raise ValueError(f"model version {model.version} is already stored")
        floor, self._prepared = (self._prepared if self._prepared is not None else self._tail()), None
        # the body as its buffers: the transport copies them once, straight into its chunks
        body = encode_parts(
            {"meta": model.metadata(), "parameters": model.parameters, "strategy_state": model.strategy_state}
        )
        envelope = Envelope(
            VERSION_TYPE,
            new_message_id(),
            "model-store",
            time.time(),
            {"run": self.topology.run, "model_version": model.version},
        )
        self.transport.publish("", self.stream, envelope, body)  # returns once confirmed
        del body
        self._remember(model, floor)
        if self.export is not None:
            # The version is durable on the broker now; its export is a copy, written off the
            # round's critical path (a file write and fsync of the whole model) by one thread,
            # in order. A kill mid-write leaves no file (atomic rename) and the next refresh
            # exports it. At most EXPORTS_QUEUED wait (each holds its model): a put waits for
            # room only when the disk falls that far behind, not for the previous fsync.
            self._queue_export(model)

    def put_scores(self, version: int, metrics: dict[str, Any]) -> None:
        """Add ``metrics`` (e.g. accuracy and loss) to a stored version's metadata, in the
        stream too (confirmed), so that :meth:`refresh` elsewhere restores them."""
        if version not in self._meta:
            raise KeyError(f"no model version {version} in {self.stream}")
        metrics = {
            name: None if value is None else float(value) for name, value in metrics.items()
        }  # numpy scalars too
        envelope = Envelope(
            SCORES_TYPE,
            new_message_id(),
            "model-store",
            time.time(),
            {"run": self.topology.run, "model_version": version},
        )
        self.transport.publish("", self.stream, envelope, encode_parts({"model_version": version, "metrics": metrics}))
        self._merge_scores(version, metrics)

    def _merge_scores(self, version: int, metrics: dict[str, Any]) -> None:
        self._meta[version]["metrics"] = {**self._meta[version]["metrics"], **metrics}
        cached = self._cache.get(version)
        if cached is not None:
            cached.metrics.update(metrics)

    def _queue_export(self, model: ModelVersion) -> None:
        with self._export_lock:
            while len(self._exports) > EXPORTS_QUEUED:
                self._export_lock.wait()
            self._exports.append(model)
            if self._exporter is None:
                self._exporter = threading.Thread(target=self._export_all, name="brokerfl-export")
                self._exporter.start()
            self._export_lock.notify_all()

    def _export_all(self) -> None:
        while True:
            with self._export_lock:
                if not self._exports:
                    self._exporter = None
                    self._export_lock.notify_all()
                    return
                model = self._exports[0]  # stays queued until written: wait_for_export sees it
            try:
                if model.version not in self.export.versions():
                    self.export.put(model)
            except Exception as exc:  # a copy: the version is safe in the stream; a refresh exports it again
                log.error("model_store.export_failed", model_version=model.version, error=str(exc)[:300])
            with self._export_lock:
                self._exports.popleft()
                self._export_lock.notify_all()

    def wait_for_export(self) -> None:
        """Return once every version stored so far is exported."""
        with self._export_lock:
            while self._exports or self._exporter is not None:
                self._export_lock.wait()

    def reference(self, version: int) -> tuple[str, int, str]:
        """Where a client fetches ``version``: (stream, offset at or before it, sha256)."""
        floor = self._floor.get(version)
        return self.stream, floor if isinstance(floor, int) else 0, self._meta[version]["sha256"]

    def get(self, version: int) -> ModelVersion:
        cached = self._cache.get(version)
        if cached is not None:
            return cached
        if version not in self._meta:
            raise KeyError(f"no model version {version} in {self.stream}")
        delivery = read_version(
            self.transport,
            self.stream,
            version,
            self._floor.get(version, "first"),
            timeout_s=self.timeout_s,
            what="re-reading a stored version",
        )
        model = _model_from(decode(delivery.body))
        self._remember(model, self._floor.get(version, "first"), newest=False)
        return model

    def metadata(self, version: int) -> dict[str, Any]:
        try:
            return dict(self._meta[version])
        except KeyError:
            raise KeyError(f"no model version {version} in {self.stream}") from None

    def versions(self) -> list[int]:
        return sorted(self._meta)

    def _remember(self, model: ModelVersion, floor: int | str, *, newest: bool = True) -> None:
        self._meta[model.version] = model.metadata()
        self._floor[model.version] = floor
        self._cache[model.version] = model
        self._cache.move_to_end(model.version)
        while len(self._cache) > self.keep:  # the oldest versions' parameters go; their metadata stays
            self._cache.popitem(last=False)

    def _tail(self) -> int | str:
        """An offset at or before the next message of the stream: a mark's offset + 1."""
        mark = Envelope(MARK_TYPE, new_message_id(), "model-store", time.time(), {"run": self.topology.run})
        with StreamReader(
            self.transport,
            self.stream,
            offset="next",
            prefetch=1,
            silence_s=self.timeout_s,
            what=lambda silence: (
                f"the models stream of run {self.topology.run!r} did not return its mark within {silence:.0f} s"
            ),
        ) as reader:
            self.transport.publish("", self.stream, mark, b"")
            returned = next(delivery for delivery in reader if delivery.envelope.message_id == mark.message_id)
        offset = stream_offset(returned)
        return offset + 1 if offset is not None else "first"

    def refresh(self) -> BrokerModelStore:
        """Read every version the stream holds now (those another process stored too):
        metadata of all, parameters of the newest ``keep``; each copied to ``export``."""
        self.wait_for_export()  # one writer of export files at a time
        self._prepared = None  # re-learnt after what this reads
        mark = Envelope(MARK_TYPE, new_message_id(), "model-store", time.time(), {"run": self.topology.run})
        self.transport.publish("", self.stream, mark, b"")
        exported = set(self.export.versions()) if self.export is not None else set()
        previous: int | str = "first"  # the offset after the previous message: at or before this one
        with StreamReader(
            self.transport,
            self.stream,
            offset="first",
            silence_s=self.timeout_s,
            what=lambda silence: (
                f"the models stream of run {self.topology.run!r} did not reach its end mark ({silence:.0f} s without a "
                "message)"
            ),
        ) as reader:
            for delivery in reader:
                if delivery.envelope.message_id == mark.message_id:
                    break
                if delivery.envelope.type == SCORES_TYPE:
                    self._restore_scores(delivery)
                    continue
                version = version_of(delivery)
                floor = previous
                offset = stream_offset(delivery)
                if offset is not None:
                    previous = offset + 1
                if version is None or version in self._meta:
                    continue
                model = _model_from(decode(delivery.body))
                self._remember(model, floor)
                if self.export is not None and model.version not in exported:
                    self.export.put(model)
        return self

    def _restore_scores(self, delivery: Delivery) -> None:
        try:
            payload = decode(delivery.body)
            version, metrics = payload["model_version"], payload["metrics"]
            if not (isinstance(version, int) and isinstance(metrics, dict)):
                raise TypeError("model_version must be an int and metrics a map")
        except (
            ValueError,
            KeyError,
            TypeError,
        ) as exc:  # the server's own stream; a bad record costs a score, not the run
            log.error("model_store.bad_scores", message_id=delivery.envelope.message_id, error=str(exc)[:300])
            return
        if version in self._meta:  # a version's scores come after it; else not this stream's
            self._merge_scores(version, metrics)


def _model_from(payload: dict[str, Any]) -> ModelVersion:
    return ModelVersion(
        parameters=payload["parameters"], strategy_state=payload.get("strategy_state", {}), **payload["meta"]
    )
