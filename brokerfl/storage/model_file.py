"""The trained model as a file an app loads back: ``final_model.npz`` and ``brokerfl export``.

The format is numpy's ``.npz``: a zip archive of ``.npy`` arrays, one per parameter, named
as the model's ``state_dict`` (weights and buffers; a torch model's bfloat16 tensors as
float32, see :mod:`brokerfl.app.torch_adapter`), plus ``__brokerfl__.npy``: a uint8 array holding
UTF-8 JSON metadata::

    {"format": "brokerfl-model", "format_version": 1, "run": ..., "app": ..., "version": ...,
     "round": ..., "strategy": ..., "sha256": ..., "created": ...}

``sha256`` is :func:`brokerfl.storage.store.parameters_hash` of the arrays, the hash the run's
metrics and journal show for that version. Any numpy reads it without brokerfl and without
pickle (``np.load(path, allow_pickle=False)``); :func:`read_model_file` does so and checks
the hash; :func:`brokerfl.app.load_model` loads it into the app's own model.

Where the files come from: ``brokerfl simulate`` and ``brokerfl server`` write the run's
final model to ``OUT/final_model.npz``; ``brokerfl export SOURCE [--version V] --out
FILE`` writes any stored version, SOURCE being a run's output directory (its ``models/``:
the server's export of every version, or ``simulate --keep-versions``'s) or such a
``models/`` directory itself.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from brokerfl.storage.private_files import replaced_atomically
from brokerfl.storage.store import DirectoryModelStore, ModelVersion, parameters_hash

FORMAT = "brokerfl-model"
FORMAT_VERSION = 1
METADATA = "__brokerfl__"
FINAL_MODEL = "final_model.npz"


class ModelFileError(ValueError):
    """A file that is not a brokerfl model file, or one whose arrays do not match its hash."""


def write_model_file(
    path: str | os.PathLike, model: ModelVersion, *, run: str = "", app: str = "", base_fingerprint: str = ""
) -> Path:
    """Write ``model``'s parameters and metadata to ``path`` (atomically: temp file, rename).
    ``base_fingerprint``: the app's base, for a model that holds only what travels
    (brokerfl.app's ``exchanged``), so that loading it onto another base is refused."""
    path = Path(path)
    if METADATA in model.parameters:
        raise ModelFileError(f"a parameter is named {METADATA!r}, which the file format reserves")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "run": run,
        "app": app,
        "version": model.version,
        "round": model.round,
        "strategy": model.strategy,
        "sha256": model.sha256 or parameters_hash(model.parameters),
        "created": model.created,
        **({"base_fingerprint": base_fingerprint} if base_fingerprint else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path, 0o644) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in [
            (METADATA, np.frombuffer(json.dumps(meta).encode(), np.uint8)),
            *sorted(model.parameters.items()),
        ]:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    return path


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(parameters, metadata)`` of a model file, never unpickled; the arrays checked
    against the file's sha256."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelFileError(f"{path} is not a brokerfl model file: {exc}") from None
    raw = arrays.pop(METADATA, None)
    try:
        meta = json.loads(bytes(raw).decode()) if raw is not None and raw.dtype == np.uint8 else None
    except (UnicodeDecodeError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a brokerfl model file (no {METADATA} metadata)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"{path}: model file format version {meta.get('format_version')!r} is not supported (this build reads "
            f"{FORMAT_VERSION})"
        )
    if parameters_hash(arrays) != meta.get("sha256"):
        raise ModelFileError(f"{path}: its arrays do not match its sha256 (the file is damaged or was edited)")
    return arrays, meta


def versions_in(source: str | os.PathLike) -> DirectoryModelStore:
    """The stored versions of a run's output directory (its ``models/``) or of a ``models/``
    directory itself."""
    source = Path(source)
    for candidate in (source / "models", source):
        if candidate.is_dir() and any(candidate.glob("v*.model")):
            return DirectoryModelStore(candidate)
    raise ModelFileError(
        f"no stored model versions in {source} or {source / 'models'} (a server's --out, or simulate --keep-versions)"
    )


def export_version(
    source: str | os.PathLike, out: str | os.PathLike, *, version: int | None = None, run: str = "", app: str = ""
) -> dict[str, Any]:
    """Write version ``version`` (default: the newest) of ``source`` to the model file
    ``out``; returns its metadata. Without stored versions, ``source``'s final model file
    serves for the newest version."""
    source = Path(source)
    final = source / FINAL_MODEL
    try:
        store = versions_in(source)
    except ModelFileError:
        if version is None and final.is_file():
            parameters, meta = read_model_file(final)
            write_model_file(
                out,
                ModelVersion(
                    meta["version"],
                    meta["round"],
                    None,
                    meta["strategy"],
                    [],
                    parameters,
                    meta["sha256"],
                    meta["created"],
                ),
                run=meta["run"],
                app=meta["app"],
                base_fingerprint=meta.get("base_fingerprint", ""),
            )
            return meta
        raise
    base_fingerprint = ""
    if final.is_file():  # the run's names and base, from its final model file
        _, final_meta = read_model_file(final)
        run, app = run or final_meta.get("run", ""), app or final_meta.get("app", "")
        base_fingerprint = final_meta.get("base_fingerprint", "")
    versions = store.versions()
    chosen = versions[-1] if version is None else version
    if chosen not in versions:
        raise ModelFileError(f"no model version {chosen} in {store.path} (versions {versions[0]}-{versions[-1]})")
    model = store.get(chosen)
    write_model_file(out, model, run=run, app=app, base_fingerprint=base_fingerprint)
    return read_model_file(out)[1]
