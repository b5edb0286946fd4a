"""msgpack bodies with tensors laid out so that decoding them copies nothing.

A body is three msgpack objects back to back:

1. a uint32: the length of the header that follows (so the decoder never has to slice,
   and so copy, the tensor data to find where the header ends);
2. the header: the payload map, in which every tensor is replaced by an ext object
   (code 1) holding ``[kind, dtype, shape, offset, nbytes]``;
3. one ``bin32`` object holding all tensor buffers. Offsets count from the first 64-byte
   aligned position inside it, and every tensor starts on a 64-byte boundary.

Decoding unpacks the small header, then turns each placeholder into
``numpy.frombuffer(body, dtype, count, offset)``: a read-only view over the received bytes.
Encoding costs exactly one copy of the tensor data (``b"".join``), because pika accepts only
``bytes`` bodies. Nothing is ever unpickled: decoding is a whitelist of types and dtypes
with limits on sizes, and every failure is one :class:`DecodeError`.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np


def _loaded_torch() -> Any:
    """torch if this process imported it, else None: the codec never imports torch to
    encode (a torch tensor means torch is loaded), so numpy-only apps run without it."""
    return sys.modules.get("torch")


TENSOR_EXT = 1
ALIGN = 64

# dtype names on the wire; numpy's own names, plus bfloat16 which only torch knows.
NUMPY_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
WIRE_DTYPES = frozenset(NUMPY_DTYPES) | {"bfloat16"}
KINDS = ("numpy", "torch")


class DecodeError(ValueError):
    """A body that cannot be decoded; the message says what is wrong with it."""


class EncodeError(ValueError):
    """A value that brokerfl does not put on the wire (unsupported type or dtype, too large)."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a decoder accepts; a sender is held to the same ones."""

    max_body_bytes: int = 2 * 1024**3
    max_tensors: int = 10_000
    max_ndim: int = 8
    max_header_bytes: int = 16 * 1024**2
    max_container_len: int = 1_000_000
    max_depth: int = 32


DEFAULT_LIMITS = Limits()


class _Placeholder:
    """Where a tensor sits in the body, until the header is fully read."""

    __slots__ = ("kind", "dtype", "shape", "offset", "nbytes")

    def __init__(self, kind: str, dtype: str, shape: tuple[int, ...], offset: int, nbytes: int):
        self.kind, self.dtype, self.shape, self.offset, self.nbytes = kind, dtype, shape, offset, nbytes


# ---------------------------------------------------------------- encoding


def _is_tensor(value: Any) -> bool:
    torch = _loaded_torch()
    return isinstance(value, np.ndarray) or (torch is not None and isinstance(value, torch.Tensor))


def _as_array(value: Any) -> tuple[str, str, np.ndarray]:
    """(kind, wire dtype, C-contiguous little-endian array) for a numpy array or torch tensor."""
    kind = "numpy"
    torch = _loaded_torch()
    if torch is not None and isinstance(value, torch.Tensor):
        kind = "torch"
        try:  # conj/neg views, sparse, nested and meta tensors make torch raise RuntimeError & co.
            value = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
            if value.dtype == torch.bfloat16:
                return kind, "bfloat16", value.view(torch.int16).numpy()
            value = value.numpy()
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            raise EncodeError(
                f"cannot encode torch tensor of dtype {value.dtype}, layout {value.layout}: {exc}"
            ) from None
    name = value.dtype.name
    if name not in NUMPY_DTYPES:
        raise EncodeError(f"dtype {value.dtype} is not supported on the wire (allowed: {sorted(WIRE_DTYPES)})")
    # not np.ascontiguousarray: it turns 0-d arrays into 1-d ones
    return kind, name, np.require(value, dtype=NUMPY_DTYPES[name], requirements="C")


def encode(payload: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Encode a payload map into one body.

    Values may be None, bool, int, float, str, bytes, lists, tuples, str-keyed dicts, numpy
    arrays and torch tensors. The tensor data is copied once, into the returned bytes.
    """
    return b"".join(encode_parts(payload, limits))


def encode_parts(payload: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """:func:`encode`'s body as the buffers that make it up, in order, without joining them
    (the tensors' own memory, not copies): a writer to a file needs no second copy of a
    model. The buffers are valid while the payload's arrays are."""
    if not isinstance(payload, dict):
        raise EncodeError(f"payload must be a dict, got {type(payload).__name__}")
    _check_encodable(payload, limits)
    arrays: list[tuple[int, np.ndarray]] = []
    data_len = 0

    def default(value: Any) -> Any:
        nonlocal data_len
        if _is_tensor(value):
            kind, dtype, array = _as_array(value)
            if array.ndim > limits.max_ndim:
                raise EncodeError(f"tensor has {array.ndim} dimensions, the limit is {limits.max_ndim}")
            if len(arrays) >= limits.max_tensors:
                raise EncodeError(f"more than {limits.max_tensors} tensors")
            offset = data_len + (-data_len) % ALIGN
            arrays.append((offset, array))
            data_len = offset + array.nbytes
            return msgpack.ExtType(TENSOR_EXT, msgpack.packb([kind, dtype, list(array.shape), offset, array.nbytes]))
        if isinstance(value, np.generic):
            return value.item()
        raise EncodeError(f"cannot encode a value of type {type(value).__name__}")

    try:
        header = msgpack.packb(payload, default=default, use_bin_type=True)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:  # e.g. an int beyond 64 bits, a non-str key
        raise EncodeError(f"cannot encode payload: {exc}") from None
    if len(header) > limits.max_header_bytes:
        raise EncodeError(f"header is {len(header)} bytes, the limit is {limits.max_header_bytes}")
    # Offsets count from the first 64-byte-aligned position after the bin marker, so the
    # header does not depend on its own length.
    data_start = 5 + len(header) + 5
    lead = (-data_start) % ALIGN
    parts: list[Any] = [
        _U32 + struct.pack(">I", len(header)),
        header,
        _BIN32 + struct.pack(">I", lead + data_len),
        bytes(lead),
    ]
    position = 0
    for offset, array in arrays:
        if offset > position:
            parts.append(bytes(offset - position))
        parts.append(array.reshape(-1).view(np.uint8))
        position = offset + array.nbytes
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    if size > limits.max_body_bytes:
        raise EncodeError(f"body is {size} bytes, the limit is {limits.max_body_bytes}")
    return parts


_U32 = b"\xce"
_BIN32 = b"\xc6"


def _check_encodable(payload: dict[str, Any], limits: Limits) -> None:
    """Hold a sender to the decoder's limits: depth (counted as :func:`_check_depth` does),
    container lengths, and map keys (str or bytes, as ``strict_map_key`` demands)."""
    stack: list[tuple[Any, int]] = [(payload, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limits.max_depth:
            raise EncodeError(f"payload nests deeper than {limits.max_depth} levels")
        if isinstance(item, dict):
            if len(item) > limits.max_container_len:
                raise EncodeError(f"a map holds {len(item)} items, the limit is {limits.max_container_len}")
            for key, v in item.items():
                if not isinstance(key, (str, bytes)):
                    raise EncodeError(f"map key {key!r} is a {type(key).__name__}, keys must be str (or bytes)")
                stack.append((v, depth + 1))
        elif isinstance(item, (list, tuple)):
            if len(item) > limits.max_container_len:
                raise EncodeError(f"a list holds {len(item)} items, the limit is {limits.max_container_len}")
            stack.extend((v, depth + 1) for v in item)


# ---------------------------------------------------------------- decoding


def decode(body: bytes, limits: Limits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Decode a body made by :func:`encode`. Tensors come back as read-only views of ``body``."""
    if not isinstance(body, bytes):
        raise DecodeError(f"body must be bytes, got {type(body).__name__}")
    if len(body) > limits.max_body_bytes:
        raise DecodeError(f"body is {len(body)} bytes, the limit is {limits.max_body_bytes}")
    if len(body) < 5 or body[0] != 0xCE:
        raise DecodeError("body does not start with its header length (msgpack uint32)")
    header_len = struct.unpack_from(">I", body, 1)[0]
    if header_len > limits.max_header_bytes:
        raise DecodeError(f"header is {header_len} bytes, the limit is {limits.max_header_bytes}")
    if 5 + header_len > len(body):
        raise DecodeError(f"header of {header_len} bytes overruns the {len(body)}-byte body")
    found: list[_Placeholder] = []

    def ext_hook(code: int, data: bytes) -> Any:
        if code != TENSOR_EXT:
            raise DecodeError(f"unknown ext type {code}")
        if len(found) >= limits.max_tensors:
            raise DecodeError(f"more than {limits.max_tensors} tensors")
        found.append(_parse_spec(data, limits))
        return found[-1]

    try:
        payload = msgpack.unpackb(
            memoryview(body)[5 : 5 + header_len],
            raw=False,
            strict_map_key=True,
            ext_hook=ext_hook,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=1024,
        )
    except DecodeError:
        raise
    except msgpack.ExtraData:
        raise DecodeError("header holds more than one msgpack object") from None
    except Exception as exc:  # msgpack raises many types for garbage; callers want one
        raise DecodeError(f"malformed header: {type(exc).__name__}: {exc}") from None
    data_start, data_len = _read_bin_header(body, 5 + header_len)
    if data_start + data_len != len(body):
        raise DecodeError(f"tensor section says {data_len} bytes, the body has {len(body) - data_start}")
    if not isinstance(payload, dict):
        raise DecodeError(f"payload must be a map, got {type(payload).__name__}")
    _check_depth(payload, limits.max_depth)
    if not found:
        return payload
    base = data_start + (-data_start) % ALIGN
    views = {id(p): _view(body, p, base, data_start + data_len) for p in found}
    try:
        return _substitute(payload, views)
    except RecursionError:  # only reachable with a max_depth above Python's recursion limit
        raise DecodeError("payload nests too deeply to rebuild") from None


def _read_bin_header(body: bytes, at: int) -> tuple[int, int]:
    if at + 5 > len(body) or body[at] != 0xC6:
        raise DecodeError("tensor section is missing or not a msgpack bin32 object")
    return at + 5, struct.unpack_from(">I", body, at + 1)[0]


def _parse_spec(data: bytes, limits: Limits) -> _Placeholder:
    try:
        spec = msgpack.unpackb(data, raw=False, max_array_len=16, max_str_len=32, max_map_len=0)
    except Exception as exc:
        raise DecodeError(f"malformed tensor header: {type(exc).__name__}") from None
    if not (isinstance(spec, list) and len(spec) == 5):
        raise DecodeError("tensor header must be [kind, dtype, shape, offset, nbytes]")
    kind, dtype, shape, offset, nbytes = spec
    if kind not in KINDS:
        raise DecodeError(f"tensor kind {kind!r} is not one of {KINDS}")
    if dtype not in WIRE_DTYPES:
        raise DecodeError(f"dtype {dtype!r} is not allowed (allowed: {sorted(WIRE_DTYPES)})")
    if dtype == "bfloat16" and kind != "torch":
        raise DecodeError("bfloat16 is only allowed for torch tensors")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise DecodeError(f"tensor shape must be a list of at most {limits.max_ndim} sizes")
    if not all(type(s) is int and 0 <= s for s in shape):
        raise DecodeError(f"tensor shape {shape!r} must hold non-negative integers")
    if not (type(offset) is int and type(nbytes) is int and offset >= 0 and nbytes >= 0):
        raise DecodeError("tensor offset and size must be non-negative integers")
    if offset % ALIGN:
        raise DecodeError(f"tensor offset {offset} is not a multiple of {ALIGN}")
    itemsize = 2 if dtype == "bfloat16" else NUMPY_DTYPES[dtype].itemsize
    count = 1
    for s in shape:
        count *= s
    if count * itemsize != nbytes:
        raise DecodeError(
            f"tensor of shape {shape} and dtype {dtype} needs {count * itemsize} bytes, header says {nbytes}"
        )
    return _Placeholder(kind, dtype, tuple(shape), offset, nbytes)


def _view(body: bytes, p: _Placeholder, base: int, end: int) -> Any:
    if base + p.offset + p.nbytes > end:
        raise DecodeError(f"tensor at offset {p.offset} of {p.nbytes} bytes overruns the tensor section")
    np_dtype = NUMPY_DTYPES["int16" if p.dtype == "bfloat16" else p.dtype]
    count = p.nbytes // np_dtype.itemsize
    try:  # an empty tensor may declare other dimensions too big for numpy or torch
        array = np.frombuffer(body, dtype=np_dtype, count=count, offset=base + p.offset).reshape(p.shape)
        if p.kind == "numpy":
            return array
        # torch warns on read-only buffers; we keep the zero-copy view and document that it is
        # read-only, exactly like the numpy case.
        import warnings

        import torch  # a torch tensor on the wire: its reader gets one (imported at first need)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if p.dtype == "bfloat16" else tensor
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise DecodeError(f"tensor of shape {list(p.shape)} and dtype {p.dtype}: {exc}") from None


# Types of a decoded value that hold nothing further (the walks below skip lists of them).
_LEAVES = frozenset({str, int, float, bool, bytes, type(None)})


def _only_leaves(items: list[Any]) -> bool:
    """Does a list hold leaves only? In C (map, set): a broadcast task's list of N
    participants is decoded by each of N clients, so a Python step per element costs N^2."""
    return set(map(type, items)) <= _LEAVES


def _substitute(value: Any, views: dict[int, Any]) -> Any:
    if isinstance(value, _Placeholder):
        return views[id(value)]
    if isinstance(value, dict):
        return {k: _substitute(v, views) for k, v in value.items()}
    if isinstance(value, list):
        return value if _only_leaves(value) else [_substitute(v, views) for v in value]
    return value


def _check_depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise DecodeError(f"payload nests deeper than {limit} levels")
        if isinstance(item, msgpack.Timestamp):  # msgpack decodes ext -1 itself, past ext_hook
            raise DecodeError("msgpack timestamps are not allowed in a payload")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list) and not (
            depth < limit and _only_leaves(item)
        ):  # leaves one level down are within the limit
            stack.extend((v, depth + 1) for v in item)
