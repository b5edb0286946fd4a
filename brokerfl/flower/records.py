"""Flower's records as brokerfl payloads, and back, without pickle.

A Flower ``RecordDict`` travels as ``{"records": [[name, kind, items], ...]}`` (lists keep
its order, which is the order a strategy aggregates in and a state dict loads in):

- ``arrays`` (an ``ArrayRecord``): ``[[key, {dtype, shape, stype, header, values}], ...]``.
  An ``Array`` holds ``.npy`` bytes (``stype`` ``numpy.ndarray``); ``values`` is the array
  those bytes hold, as a tensor the codec carries without a copy (a view over the ``.npy``
  bytes here, a view over the received body there), and ``header`` the ``.npy`` header, so
  the receiver rebuilds the very same bytes: ``header + values``. Bytes that are not a
  plain ``.npy`` (another ``stype``) travel as a ``uint8`` tensor with an empty header.
- ``config`` and ``metrics``: ``[[key, value], ...]``, values as msgpack types them (int,
  float, bool, str, bytes, and lists of one of those), which are Flower's own value types.

Everything from the wire is checked before Flower sees it: a malformed record is a
:class:`RecordsError` (the message is dead-lettered with it), never a crash deeper in.
"""

from __future__ import annotations

import hashlib
import io
import math
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from brokerfl.wire.codec import NUMPY_DTYPES

if TYPE_CHECKING:  # flwr is imported where a Flower run needs it, never by the wire layer
    from flwr.app import RecordDict

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NPY = "numpy.ndarray"
MAX_KEY_CHARS = 1024
_SCALARS = (bool, int, float, str, bytes)


class RecordsError(ValueError):
    """Content that is not a Flower ``RecordDict`` as :func:`pack` writes it."""


def pack(content: RecordDict) -> dict[str, Any]:
    """A ``RecordDict`` as a payload (arrays as zero-copy views of their ``.npy`` bytes)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    records: list[list[Any]] = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            records.append([name, ARRAYS, [[key, _pack_array(array)] for key, array in record.items()]])
        elif isinstance(record, ConfigRecord):
            records.append([name, CONFIG, [[key, value] for key, value in record.items()]])
        elif isinstance(record, MetricRecord):
            records.append([name, METRICS, [[key, value] for key, value in record.items()]])
        else:  # RecordDict's own check allows only those three
            raise RecordsError(f"record {name!r}: {type(record).__name__} is not a Flower record")
    return {"records": records}


def _pack_array(array: Any) -> dict[str, Any]:
    data = array.data
    header, values = _npy_parts(data) if array.stype == NPY else (b"", None)
    if values is None:
        header, values = b"", np.frombuffer(data, dtype=np.uint8)
    return {"dtype": array.dtype, "shape": list(array.shape), "stype": array.stype, "header": header, "values": values}


def _npy_parts(data: bytes) -> tuple[bytes, np.ndarray | None]:
    """The ``.npy`` header of ``data`` and a view of the array after it (None: not a plain
    little-endian, C-ordered ``.npy`` of a dtype the wire carries)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return b"", None
    except ValueError:
        return b"", None
    offset = stream.tell()
    if fortran or dtype.name not in NUMPY_DTYPES or dtype.byteorder == ">":
        return b"", None
    count = math.prod(shape)
    if offset + count * dtype.itemsize != len(data):
        return b"", None
    return data[:offset], np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _header_array(header: bytes) -> tuple[str, tuple[int, ...]] | None:
    """(dtype name, shape) a plain ``.npy`` header says, or None."""
    stream = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(stream)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            return None
        shape, fortran, dtype = read(stream)
    except (ValueError, SyntaxError, TypeError):
        return None
    if fortran or stream.tell() != len(header) or dtype.byteorder == ">":
        return None
    return dtype.name, tuple(shape)


def check(payload: Any) -> None:
    """What :func:`unpack` checks, without building Flower's records (no array is copied):
    :class:`RecordsError` if ``payload`` is not a RecordDict as :func:`pack` writes it."""
    _checked(payload)


def unpack(payload: Any) -> RecordDict:
    """The ``RecordDict`` a payload of :func:`pack` holds; :class:`RecordsError` if it is not one."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    content = RecordDict()
    for name, kind, pairs in _checked(payload):
        try:
            if kind == ARRAYS:
                content[name] = ArrayRecord({key: Array(**_array_of(fields)) for key, fields in pairs})
            elif kind == CONFIG:
                content[name] = ConfigRecord(dict(pairs))
            else:
                content[name] = MetricRecord(dict(pairs))
        except (TypeError, ValueError) as exc:  # Flower's own checks of keys and values
            raise RecordsError(f"record {name!r}: {str(exc)[:300]}") from None
    return content


def _checked(payload: Any) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    """(name, kind, [(key, value)]) of each record, every part checked (an array's value:
    its checked fields)."""
    records = payload.get("records") if isinstance(payload, dict) else None
    if not isinstance(records, list) or set(payload) != {"records"}:
        raise RecordsError("content must be {'records': [...]}")
    checked: list[tuple[str, str, list[tuple[str, Any]]]] = []
    names: set[str] = set()
    for i, entry in enumerate(records):
        if not (
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[2], list)
        ):
            raise RecordsError(f"records[{i}] must be [name, kind, items]")
        name, kind, items = entry
        _check_key(name, f"records[{i}]")
        if name in names:
            raise RecordsError(f"record {name!r} appears twice")
        names.add(name)
        pairs = _pairs(items, f"record {name!r}")
        if kind == ARRAYS:
            pairs = [(key, _array_fields(value, f"{name}[{key!r}]")) for key, value in pairs]
        elif kind in (CONFIG, METRICS):
            pairs = _values(pairs, name, numbers_only=kind == METRICS)
        else:
            raise RecordsError(f"record {name!r}: unknown kind {str(kind)[:40]!r}")
        checked.append((name, kind, pairs))
    return checked


def _pairs(items: list[Any], where: str) -> list[tuple[str, Any]]:
    pairs = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            raise RecordsError(f"{where}: an item is not [key, value]")
        _check_key(item[0], where)
        pairs.append((item[0], item[1]))
    if len({key for key, _ in pairs}) != len(pairs):
        raise RecordsError(f"{where}: a key appears twice")
    return pairs


def _check_key(key: str, where: str) -> None:
    if not 0 < len(key) <= MAX_KEY_CHARS:
        raise RecordsError(f"{where}: a key must be 1-{MAX_KEY_CHARS} characters")


def _array_fields(value: Any, where: str) -> dict[str, Any]:
    """An array's fields on the wire, checked (its bytes not copied)."""
    if not (isinstance(value, dict) and set(value) == {"dtype", "shape", "stype", "header", "values"}):
        raise RecordsError(f"array {where}: must have dtype, shape, stype, header and values")
    dtype, shape, stype, header, values = (value[k] for k in ("dtype", "shape", "stype", "header", "values"))
    if not (isinstance(dtype, str) and isinstance(stype, str) and len(dtype) <= 64 and len(stype) <= 64):
        raise RecordsError(f"array {where}: dtype and stype must be short strings")
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape) and len(shape) <= 32):
        raise RecordsError(f"array {where}: shape must be a list of non-negative ints")
    if not (isinstance(header, bytes) and isinstance(values, np.ndarray)):
        raise RecordsError(f"array {where}: header must be bytes and values a tensor")
    if header:  # a .npy: its header must describe its values, and so must the Array's fields where they say
        # anything (Flower's legacy parameters leave dtype and shape empty)
        described = _header_array(header)
        if (
            stype != NPY
            or described is None
            or described != (values.dtype.name, values.shape)
            or dtype not in ("", values.dtype.name)
            or (shape and tuple(shape) != values.shape)
        ):
            raise RecordsError(
                f"array {where}: its .npy header does not describe its values {values.dtype.name}{list(values.shape)}"
            )
    elif values.dtype != np.uint8 or values.ndim != 1:
        raise RecordsError(f"array {where}: raw bytes must travel as a uint8 vector")
    return value


def _array_of(fields: dict[str, Any]) -> dict[str, Any]:
    """Flower's ``Array`` arguments from checked fields: its bytes are the header and the
    values, joined (the one copy: Flower's Array holds bytes)."""
    return {
        "dtype": fields["dtype"],
        "shape": tuple(fields["shape"]),
        "stype": fields["stype"],
        "data": b"".join((fields["header"], _bytes_view(fields["values"]))),
    }


def _values(pairs: list[tuple[str, Any]], name: str, *, numbers_only: bool) -> list[tuple[str, Any]]:
    allowed = (int, float) if numbers_only else _SCALARS
    for key, value in pairs:
        items = value if isinstance(value, list) else [value]
        kinds = {type(v) for v in items}
        if not all(issubclass(kind, allowed) for kind in kinds) or len(kinds) > 1:
            what = "numbers" if numbers_only else "int, float, bool, str or bytes"
            raise RecordsError(f"record {name!r}[{key!r}]: must be {what}, or a list of one of those")
        if numbers_only and bool in kinds:
            raise RecordsError(f"record {name!r}[{key!r}]: a metric is a number, not a bool")
    return pairs


def _bytes_view(values: np.ndarray) -> memoryview:
    """The bytes of an array without a copy (of an empty one too, whatever its shape)."""
    flat = np.ascontiguousarray(values).reshape(-1).view(np.uint8)
    return memoryview(flat.data)


def digest(*, message_type: str, group_id: str, node_id: int, content: dict[str, Any]) -> str:
    """What a request asks, as a hash: its type, group, destination and content (arrays by
    their bytes). ``created_at`` and ``ttl`` are left out: a re-run creates its messages
    anew, later."""
    h = hashlib.sha256()
    h.update(msgpack.packb([message_type, group_id, node_id]))
    for name, kind, items in content["records"]:
        h.update(msgpack.packb([name, kind]))
        if kind == ARRAYS:
            for key, array in items:
                h.update(msgpack.packb([key, array["dtype"], array["shape"], array["stype"], array["header"]]))
                h.update(_bytes_view(array["values"]))
        else:
            h.update(msgpack.packb(items, use_bin_type=True))
    return h.hexdigest()
