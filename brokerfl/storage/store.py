"""Global model versions and where they are kept.

Every version records what it is made of: its parent, the strategy, and the ids of the
updates folded into it in fold order; a stateful strategy's state (a server optimizer's
moments, say) is stored with it as named arrays, in the same file and so atomically. That is what makes a redelivered
update recognisable
(it is already in) and a run replayable (fold the same updates in the same order and get
the same hash).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from brokerfl.wire.codec import decode, encode_parts
from brokerfl.wire.message import Tensors


def parameters_hash(parameters: Tensors) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(parameters):
        array = np.ascontiguousarray(parameters[name])
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(memoryview(array).cast("B") if array.size else b"")
    return digest.hexdigest()


@dataclass
class ModelVersion:
    version: int
    round: int
    parent: int | None
    strategy: str
    update_ids: list[str]
    parameters: Tensors
    sha256: str = ""
    created: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    strategy_state: Tensors = field(default_factory=dict)  # named arrays the strategy resumes from
    dropped_updates: int = 0  # the run's updates dropped so far (a restarted server's count goes on from here)

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = parameters_hash(self.parameters)

    def metadata(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would deep-copy the parameters only to drop them
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("parameters", "strategy_state")}


class ModelStore(abc.ABC):
    @abc.abstractmethod
    def put(self, model: ModelVersion) -> None:
        """Store a version durably; returns only once it is safe (acks may follow)."""

    @abc.abstractmethod
    def get(self, version: int) -> ModelVersion: ...

    @abc.abstractmethod
    def versions(self) -> list[int]: ...

    def latest(self) -> ModelVersion | None:
        versions = self.versions()
        return self.get(versions[-1]) if versions else None

    def metadata(self, version: int) -> dict[str, Any]:
        """A version's metadata (no parameters): cheap where the store can do it."""
        return self.get(version).metadata()

    def put_scores(self, version: int, metrics: dict[str, Any]) -> None:  # noqa: B027 - optional: a store may keep no scores
        """Scores that come after a stored version (its evaluation runs off the round's
        critical path). Stores that restore versions elsewhere keep them (the models
        stream); the others do not need to: their versions are the server's own objects,
        or files whose metrics are those known when they were written."""


class MemoryModelStore(ModelStore):
    """For simulation: metadata of every version, parameters of the newest ``keep`` only."""

    def __init__(self, keep: int | None = 2) -> None:
        self.keep = keep
        self._models: dict[int, ModelVersion] = {}

    def put(self, model: ModelVersion) -> None:
        if model.version in self._models:
            raise ValueError(f"model version {model.version} is already stored")
        self._models[model.version] = model
        if self.keep is not None:
            for old in sorted(self._models)[: -self.keep]:
                self._models[old].parameters = {}
                self._models[old].strategy_state = {}

    def get(self, version: int) -> ModelVersion:
        try:
            return self._models[version]
        except KeyError:
            raise KeyError(f"no model version {version}") from None

    def versions(self) -> list[int]:
        return sorted(self._models)


class DirectoryModelStore(ModelStore):
    """One file per version, written atomically (temp file, fsync, rename, fsync dir)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def _file(self, version: int) -> Path:
        return self.path / f"v{version:08d}.model"

    def put(self, model: ModelVersion) -> None:
        target = self._file(model.version)
        if target.exists():
            raise ValueError(f"model version {model.version} is already stored in {self.path}")
        meta = model.metadata()
        # the model file is the version; the JSON beside it only saves readers of metadata
        # from loading parameters, and is rebuilt from the model file if missing
        # written buffer by buffer: no body-sized copy of the model (server memory)
        self._write_atomically(
            target, encode_parts({"meta": meta, "parameters": model.parameters, "strategy_state": model.strategy_state})
        )
        self._write_atomically(target.with_suffix(".json"), [json.dumps(meta).encode()])

    def _write_atomically(self, target: Path, parts: list[Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for part in parts:
                    f.write(part)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def metadata(self, version: int) -> dict[str, Any]:
        sidecar = self._file(version).with_suffix(".json")
        if sidecar.exists():
            return json.loads(sidecar.read_text())
        return self.get(version).metadata()

    def get(self, version: int) -> ModelVersion:
        target = self._file(version)
        if not target.exists():
            raise KeyError(f"no model version {version} in {self.path}")
        payload = decode(target.read_bytes())
        return ModelVersion(
            parameters=payload["parameters"], strategy_state=payload.get("strategy_state", {}), **payload["meta"]
        )

    def versions(self) -> list[int]:
        return sorted(int(p.stem[1:]) for p in self.path.glob("v*.model"))
