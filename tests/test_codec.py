"""brokerfl.wire.codec: round trips, zero-copy decoding, malformed bodies, limits, no pickle."""

import math
import os
import pickle
import struct
import sys
import types
import warnings

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from brokerfl.wire import codec
from brokerfl.wire.codec import (
    ALIGN,
    DEFAULT_LIMITS,
    NUMPY_DTYPES,
    WIRE_DTYPES,
    DecodeError,
    EncodeError,
    Limits,
    decode,
    encode,
)

NUMPY_NAMES = sorted(NUMPY_DTYPES)
# every wire dtype torch has, by wire name (bfloat16 is torch-only)
TORCH_DTYPES = {
    name: getattr(torch, name) for name in sorted(WIRE_DTYPES) if isinstance(getattr(torch, name, None), torch.dtype)
}
FUZZ_SCALE = float(os.environ.get("BROKERFL_FUZZ_SCALE", "1"))  # e.g. 20 for a long fuzzing session


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max(1, int(max_examples * FUZZ_SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------- helpers


def body_range(body: bytes) -> tuple[int, int]:
    start = np.frombuffer(body, np.uint8).__array_interface__["data"][0]
    return start, start + len(body)


def assert_numpy_view(array: np.ndarray, body: bytes) -> None:
    """A decoded array is a read-only, 64-byte-aligned (relative to the body) view of body."""
    start, end = body_range(body)
    pointer = array.__array_interface__["data"][0]
    assert start <= pointer and pointer + array.nbytes <= end
    assert (pointer - start) % ALIGN == 0
    if array.size:
        assert np.shares_memory(array, np.frombuffer(body, np.uint8))
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array.flags.writeable = True  # it does not own its memory: bytes are immutable


def assert_torch_view(tensor: torch.Tensor, body: bytes) -> None:
    if not tensor.numel():
        return  # an empty tensor has no storage to point into the body (data_ptr() is 0)
    start, end = body_range(body)
    pointer = tensor.data_ptr()
    assert start <= pointer and pointer + tensor.numel() * tensor.element_size() <= end
    assert (pointer - start) % ALIGN == 0
    if tensor.numel():
        flat = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        assert np.shares_memory(flat.numpy(), np.frombuffer(body, np.uint8))


def le(dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder("<")


def assert_same(original, decoded, body: bytes) -> None:
    """decoded is original after a round trip: tuples become lists, numpy scalars Python ones,
    tensors come back bit for bit with their dtype and shape, as views of body."""
    if isinstance(original, np.ndarray):
        assert type(decoded) is np.ndarray
        assert decoded.dtype == le(original.dtype) and decoded.dtype.name == original.dtype.name
        assert decoded.shape == original.shape
        assert decoded.tobytes() == np.ascontiguousarray(original, dtype=le(original.dtype)).tobytes()
        assert_numpy_view(decoded, body)
    elif isinstance(original, torch.Tensor):
        assert isinstance(decoded, torch.Tensor)
        assert decoded.dtype == original.dtype and decoded.shape == original.shape
        bits = (lambda t: t.view(torch.int16)) if original.dtype == torch.bfloat16 else (lambda t: t)
        expected = bits(original.detach().resolve_conj().resolve_neg().contiguous()).numpy()
        assert bits(decoded).numpy().tobytes() == expected.tobytes()
        assert_torch_view(decoded, body)
    elif isinstance(original, dict):
        assert type(decoded) is dict and list(decoded) == list(original)
        for key in original:
            assert_same(original[key], decoded[key], body)
    elif isinstance(original, (list, tuple)):
        assert type(decoded) is list and len(decoded) == len(original)
        for a, b in zip(original, decoded):
            assert_same(a, b, body)
    elif isinstance(original, float) and math.isnan(original):
        assert isinstance(decoded, float) and math.isnan(decoded)
    else:
        if isinstance(original, np.generic):
            original = original.item()
        assert type(decoded) is type(original) and decoded == original


def round_trip(payload, limits=DEFAULT_LIMITS):
    body = encode(payload, limits)
    decoded = decode(body, limits)
    assert_same(payload, decoded, body)
    return body, decoded


ALLOWED_LEAVES = (type(None), bool, int, float, str, bytes, np.ndarray, torch.Tensor)


def decode_or_error(body: bytes, limits: Limits = DEFAULT_LIMITS):
    """Decode garbage: DecodeError or a well-formed payload, never any other exception."""
    try:
        payload = decode(body, limits)
    except DecodeError:
        return None
    assert type(payload) is dict
    stack = [(payload, 1)]
    while stack:  # only whitelisted types come out of a body, within the limits
        item, depth = stack.pop()
        assert depth <= limits.max_depth
        if isinstance(item, dict):
            assert all(isinstance(k, (str, bytes)) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        else:
            assert isinstance(item, ALLOWED_LEAVES), type(item)
            if isinstance(item, np.ndarray):
                assert_numpy_view(item, body)
                assert item.ndim <= limits.max_ndim
            elif isinstance(item, torch.Tensor):
                assert_torch_view(item, body)
    return payload


def assemble(header: bytes, data: bytes = b"", *, header_len: int | None = None, data_len: int | None = None) -> bytes:
    """A body laid out like encode's, from raw header bytes; the lengths can be forged."""
    data_start = 5 + len(header) + 5
    lead = (-data_start) % ALIGN
    return (
        b"\xce"
        + struct.pack(">I", len(header) if header_len is None else header_len)
        + header
        + b"\xc6"
        + struct.pack(">I", lead + len(data) if data_len is None else data_len)
        + bytes(lead)
        + data
    )


def forge(spec, data: bytes = b"", code: int = codec.TENSOR_EXT) -> bytes:
    """A body whose single tensor is described by an arbitrary ext spec."""
    raw = spec if isinstance(spec, bytes) else msgpack.packb(spec)
    return assemble(msgpack.packb({"t": msgpack.ExtType(code, raw)}), data)


# ---------------------------------------------------------------- strategies

byte_orders = st.sampled_from("<>")


@st.composite
def numpy_arrays(draw, max_dims=8, max_side=3):
    name = draw(st.sampled_from(NUMPY_NAMES))
    dtype = np.dtype(name).newbyteorder(draw(byte_orders))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    array = draw(hnp.arrays(dtype, shape))
    # non-contiguous inputs: strided, reversed, transposed, Fortran-ordered
    layout = draw(st.sampled_from(["c", "fortran", "transpose", "stride", "reverse"]))
    if array.ndim >= 1:
        if layout == "fortran":
            array = np.asfortranarray(array)
        elif layout == "transpose":
            array = array.T
        elif layout == "stride":
            array = np.repeat(array, 2, axis=0)[::2]
        elif layout == "reverse":
            array = array[::-1]
    return array


@st.composite
def torch_tensors(draw, max_dims=8, max_side=3):
    name = draw(st.sampled_from(sorted(TORCH_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_dims, min_side=0, max_side=max_side))
    if name == "bfloat16":
        tensor = torch.from_numpy(draw(hnp.arrays(np.float32, shape))).to(torch.bfloat16)
    else:
        tensor = torch.from_numpy(draw(hnp.arrays(np.dtype(name), shape)))
    layout = draw(st.sampled_from(["c", "transpose", "stride", "conj", "grad"]))
    if layout == "transpose" and tensor.ndim >= 2:
        tensor = tensor.transpose(0, -1)
    elif layout == "stride" and tensor.ndim >= 1:
        tensor = tensor.repeat_interleave(2, dim=0)[::2]
    elif layout == "conj" and tensor.is_complex():
        tensor = tensor.conj()  # a lazy conjugate view (conj bit set)
    elif layout == "grad" and tensor.is_floating_point():
        tensor = tensor.clone().requires_grad_(True)
    return tensor


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
keys = st.text(max_size=10)


def payloads(leaves):
    values = st.recursive(
        leaves,
        lambda children: (
            st.lists(children, max_size=4) | st.tuples(children, children) | st.dictionaries(keys, children, max_size=4)
        ),
        max_leaves=12,
    )
    return st.dictionaries(keys, values, max_size=5)


small_tensors = numpy_arrays(max_dims=3, max_side=3) | torch_tensors(max_dims=3, max_side=3)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NUMPY_NAMES)
@pytest.mark.parametrize("order", ["<", ">"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (2, 3, 4), (1,) * 8], ids=str)
def test_numpy_every_dtype_and_shape(name, order, shape):
    dtype = np.dtype(name).newbyteorder(order)
    size = math.prod(shape)
    array = (
        (np.arange(size) % 7 - 3).astype(dtype).reshape(shape)
        if name != "bool"
        else (np.arange(size) % 2 == 0).reshape(shape)
    )
    _, decoded = round_trip({"a": array, "pair": [array, {"again": array}]})
    assert np.array_equal(decoded["a"], array)


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (2, 3, 4), (1,) * 8], ids=str)
def test_torch_every_dtype_and_shape(name, shape):
    tensor = (torch.arange(math.prod(shape)) % 5).reshape(shape).to(TORCH_DTYPES[name])
    round_trip({"t": tensor, "nested": [{"t": tensor}]})


def test_torch_dtype_table_is_complete():
    assert set(TORCH_DTYPES) == set(WIRE_DTYPES)  # torch 2.3+ has uint16/32/64


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2],
        np.arange(24, dtype=np.float64).reshape(4, 6).T,
        np.asfortranarray(np.arange(24, dtype=np.int32).reshape(4, 6)),
        np.arange(10, dtype=">f4")[::-1],
        np.arange(12, dtype=">c16").reshape(3, 4)[::2],
        np.array(3.5, dtype=">f8"),
        np.broadcast_to(np.arange(3, dtype=np.int16), (4, 3)),
    ],
    ids=["strided", "transposed", "fortran", "big-endian-reversed", "big-endian-complex", "big-endian-0d", "broadcast"],
)
def test_non_contiguous_and_big_endian_numpy(array):
    _, decoded = round_trip({"x": array})
    assert decoded["x"].flags.c_contiguous and decoded["x"].dtype.byteorder in "<=|"
    assert np.array_equal(decoded["x"], array)


def test_non_contiguous_torch():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    complex_ = torch.randn(3, 4, dtype=torch.complex64)
    payload = {
        "t": base.t(),
        "s": base[:, ::2],
        "conj": complex_.conj(),  # conj bit set
        "neg": complex_.conj().imag,  # neg bit set
        "grad": torch.ones(3, requires_grad=True) * 2,
        "bf16": base.to(torch.bfloat16).t(),
    }
    _, decoded = round_trip(payload)
    assert torch.equal(decoded["conj"], complex_.conj().resolve_conj())
    assert torch.equal(decoded["neg"], -complex_.imag)


def test_tensors_are_packed_aligned_and_the_body_is_the_only_copy():
    arrays = [np.full(n, n, np.float32) for n in (1, 3, 16, 17, 100, 0, 5)]
    body, decoded = round_trip({"xs": arrays, "k": {"t": torch.arange(7, dtype=torch.int64)}})
    pointers = [a.__array_interface__["data"][0] for a in decoded["xs"] if a.size]
    assert len(set(pointers)) == len(pointers)  # each non-empty tensor has its own slot
    data = sum(a.nbytes + ALIGN for a in arrays) + 7 * 8 + ALIGN
    assert len(body) < 200 + data  # no hidden duplicate of the tensor data


def test_encode_does_not_alias_its_input():
    array = np.arange(4, dtype=np.float32)
    body = encode({"a": array})
    array[0] = 99
    assert decode(body)["a"][0] == 0


def test_nested_scalars():
    payload = {
        "none": None,
        "t": True,
        "f": False,
        "i": -(2**63),
        "u": 2**64 - 1,
        "x": 1.5,
        "nan": float("nan"),
        "inf": float("-inf"),
        "s": "héllo ✓",
        "b": b"\x00\xff",
        "empty": {},
        "lst": [],
        "tup": (1, "a", None),
        "deep": {"a": [{"b": [1, [2, [3]]]}]},
        "np": [np.float32(1.5), np.int64(-3), np.bool_(True)],
        b"bytes-key": 1,
    }
    round_trip(payload)


def test_bytes_like_values_come_back_as_bytes():
    assert decode(encode({"a": bytearray(b"xy"), "m": memoryview(b"z")})) == {"a": b"xy", "m": b"z"}


@fuzz(300)
@given(numpy_arrays())
def test_hypothesis_numpy_round_trip(array):
    round_trip({"a": array, "again": [array]})


@fuzz(200)
@given(torch_tensors())
def test_hypothesis_torch_round_trip(tensor):
    round_trip({"t": tensor})


@fuzz(250)
@given(payloads(scalars | small_tensors))
def test_hypothesis_payload_round_trip(payload):
    round_trip(payload)


# ---------------------------------------------------------------- malformed bodies


@fuzz(1500)
@given(st.binary(max_size=300))
def test_arbitrary_bytes(body):
    decode_or_error(body)


@fuzz(1000)
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_arbitrary_header_and_data_in_a_valid_frame(header, data):
    decode_or_error(assemble(header, data))
    decode_or_error(b"\xce" + struct.pack(">I", len(header)) + header + data)


_leaves = scalars | small_tensors
valid_bodies = st.dictionaries(keys, _leaves | st.lists(_leaves, max_size=3), min_size=1, max_size=4).map(encode)


def header_end(body: bytes) -> int:
    return 5 + struct.unpack_from(">I", body, 1)[0]


@fuzz(2500)
@given(valid_bodies, st.data())
def test_mutated_bodies(body, data):
    mutated = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        # aim most mutations at the header, where the structure is
        limit = header_end(body) + 10 if data.draw(st.booleans()) else len(mutated)
        at = data.draw(st.integers(0, max(0, min(limit, len(mutated)) - 1)))
        how = data.draw(
            st.sampled_from(["truncate", "flip", "insert", "delete", "overwrite", "header_len", "data_len", "append"])
        )
        if how == "truncate":
            del mutated[at:]
        elif how == "flip" and mutated:
            mutated[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "insert":
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del mutated[at : at + data.draw(st.integers(1, 8))]
        elif how == "overwrite":
            chunk = data.draw(st.binary(min_size=1, max_size=8))
            mutated[at : at + len(chunk)] = chunk
        elif how == "header_len" and len(mutated) >= 5:
            value = data.draw(
                st.integers(0, 2**32 - 1) | st.integers(max(0, header_end(body) - 8), header_end(body) + 8)
            )
            mutated[1:5] = struct.pack(">I", value)
        elif how == "data_len" and len(mutated) >= header_end(body) + 5:
            at = header_end(body)
            mutated[at + 1 : at + 5] = struct.pack(">I", data.draw(st.integers(0, 2**32 - 1)))
        elif how == "append":
            mutated += data.draw(st.binary(min_size=1, max_size=70))
    decode_or_error(bytes(mutated))


def int_like():
    return (
        st.integers(-2, 70)
        | st.integers(-(2**63), 2**64 - 1)
        | st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1])
    )


any_value = st.none() | st.booleans() | st.floats() | st.text(max_size=5) | st.binary(max_size=5) | int_like()
dtype_names = st.sampled_from(
    sorted(WIRE_DTYPES)
    + [
        "object",
        "O",
        "<f4",
        ">f4",
        "float128",
        "longdouble",
        "str",
        "U4",
        "V8",
        "void",
        "datetime64",
        "M8[ns]",
        "int",
        "float",
        "complex256",
        "",
    ]
)


def sometimes(draw, usual, unusual, tenths: int = 2):
    """usual, or unusual in about tenths/10 of the draws (so most specs get past the early checks)."""
    return draw(unusual) if draw(st.integers(0, 9)) < tenths else draw(usual)


@st.composite
def specs(draw):
    """[kind, dtype, shape, offset, nbytes], mostly plausible, sometimes not even a list."""
    kind = sometimes(draw, st.sampled_from(["numpy", "torch"]), st.sampled_from(["jax", "", "NUMPY"]) | any_value, 1)
    dtype = sometimes(draw, st.sampled_from(sorted(WIRE_DTYPES)), dtype_names | any_value)
    shape = sometimes(
        draw,
        st.lists(st.integers(0, 5), max_size=10),
        st.lists(int_like(), max_size=12) | any_value | st.lists(any_value, max_size=3),
    )
    offset = sometimes(draw, st.sampled_from([0, 64, 128, 192, 256, 320]), int_like() | any_value, 3)
    nbytes = draw(int_like() | any_value)
    if (
        draw(st.integers(0, 9)) < 7
        and isinstance(shape, list)
        and all(type(s) is int for s in shape)
        and dtype in WIRE_DTYPES
    ):
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        nbytes = math.prod(shape) * itemsize  # consistent, so that later checks are reached
        assume(-(2**63) <= nbytes < 2**64)
    spec = [kind, dtype, shape, offset, nbytes]
    variant = draw(st.sampled_from(["spec"] * 16 + ["short", "long", "map", "scalar"]))
    if variant == "short":
        spec = spec[: draw(st.integers(0, 4))]
    elif variant == "long":
        spec = spec + [draw(any_value)]
    elif variant == "map":
        return {"kind": kind, "dtype": dtype}
    elif variant == "scalar":
        return draw(any_value)
    return spec


@fuzz(1500)
@given(specs(), st.binary(max_size=600), st.sampled_from([codec.TENSOR_EXT] * 16 + [0, 2, 127, -1, -128]))
def test_forged_tensor_specs(spec, data, code):
    try:
        body = forge(spec, data, code)
    except (OverflowError, TypeError, ValueError):  # msgpack cannot even express it
        assume(False)
    decode_or_error(body)


@fuzz(300)
@given(st.binary(max_size=40))
def test_garbage_inside_a_tensor_ext(raw):
    decode_or_error(forge(raw, bytes(256)))


def spec_body(kind="numpy", dtype="float32", shape=(4,), offset=0, nbytes=16, data=bytes(16)):
    return forge([kind, dtype, list(shape), offset, nbytes], data)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(spec_body(), id="control"),
        pytest.param(spec_body(dtype="object", nbytes=32, data=bytes(32)), id="dtype-object"),
        pytest.param(spec_body(dtype="O"), id="dtype-O"),
        pytest.param(spec_body(dtype="<f4"), id="dtype-numpy-string"),
        pytest.param(spec_body(dtype="float128", nbytes=64, data=bytes(64)), id="dtype-float128"),
        pytest.param(spec_body(dtype="bfloat16", nbytes=8), id="bfloat16-as-numpy"),
        pytest.param(spec_body(kind="pickle"), id="kind-pickle"),
        pytest.param(spec_body(offset=-1), id="negative-offset"),
        pytest.param(spec_body(offset=2**64 - 1), id="huge-offset"),
        pytest.param(spec_body(offset=-(2**63)), id="most-negative-offset"),
        pytest.param(spec_body(offset=64), id="overruns-section"),
        pytest.param(spec_body(offset=4, data=bytes(20)), id="unaligned-offset"),
        pytest.param(
            spec_body(kind="torch", dtype="float64", shape=(1,), offset=1, nbytes=8, data=bytes(9)),
            id="unaligned-torch",
        ),
        pytest.param(spec_body(nbytes=12), id="nbytes-too-small-for-shape"),
        pytest.param(spec_body(nbytes=20), id="nbytes-too-big-for-shape"),
        pytest.param(spec_body(nbytes=-16), id="negative-nbytes"),
        pytest.param(spec_body(shape=(-4,), nbytes=-16), id="negative-dim"),
        pytest.param(spec_body(shape=(2**31, 2**31), nbytes=2**64 - 2**62), id="huge-declared-size"),
        pytest.param(spec_body(shape=(2**61,), nbytes=2**63), id="huge-declared-size-2"),
        pytest.param(spec_body(shape=(0, 2**64 - 1), nbytes=0), id="empty-with-uint64-dim"),
        pytest.param(spec_body(shape=(0, 2**63 - 1), nbytes=0), id="empty-with-int64-max-dim"),
        pytest.param(
            spec_body(kind="torch", shape=(0, 2**62, 4), dtype="float64", nbytes=0), id="empty-overflowing-torch"
        ),
        pytest.param(spec_body(shape=(1,) * 9 + (4,)), id="too-many-dims"),
        pytest.param(spec_body(shape=[True] * 4, nbytes=4), id="bool-dims"),
        pytest.param(spec_body(shape=(4.0,)), id="float-dim"),
        pytest.param(forge(["numpy", "float32", 4, 0, 16], bytes(16)), id="shape-not-a-list"),
        pytest.param(forge(["numpy", "float32", [4], 0], bytes(16)), id="spec-too-short"),
        pytest.param(forge(["numpy", "float32", [4], 0, 16, 0], bytes(16)), id="spec-too-long"),
        pytest.param(forge({"dtype": "float32"}, bytes(16)), id="spec-a-map"),
        pytest.param(forge(["numpy", ["float32"], [4], 0, 16], bytes(16)), id="dtype-unhashable"),
        pytest.param(forge(b"\xc1", bytes(16)), id="spec-not-msgpack"),
        pytest.param(forge(b"\x95", bytes(16)), id="spec-truncated"),
        pytest.param(
            forge(msgpack.packb(["numpy", "float32", [4], 0, 16]) + b"\x00", bytes(16)), id="spec-trailing-byte"
        ),
        pytest.param(forge(["numpy", "float32", [4], 0, 16], bytes(16), code=2), id="unknown-ext-code"),
        pytest.param(assemble(msgpack.packb({"t": msgpack.Timestamp(1, 0)})), id="msgpack-timestamp"),
        pytest.param(assemble(b"\x81\xa1t\xd4\xff\x00"), id="bad-msgpack-timestamp"),
    ],
)
def test_malformed_tensor_specs(body, request):
    if request.node.callspec.id == "control":
        assert decode(body)["t"].shape == (4,)
        return
    with pytest.raises(DecodeError):
        decode(body)


GOOD = encode({"a": np.arange(6, dtype=np.float32), "s": "x"})


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xce\x00\x00", id="short"),
        pytest.param(b"\xcd" + GOOD[1:], id="not-uint32"),
        pytest.param(GOOD[:-1], id="truncated-data"),
        pytest.param(GOOD[: header_end(GOOD)], id="no-tensor-section"),
        pytest.param(GOOD[: header_end(GOOD) - 1], id="truncated-header"),
        pytest.param(GOOD + b"\x00", id="trailing-byte"),
        pytest.param(GOOD[:1] + struct.pack(">I", header_end(GOOD) - 4) + GOOD[5:], id="header-len-too-long"),
        pytest.param(GOOD[:1] + struct.pack(">I", header_end(GOOD) - 6) + GOOD[5:], id="header-len-too-short"),
        pytest.param(GOOD[:1] + struct.pack(">I", 2**32 - 1) + GOOD[5:], id="header-len-huge"),
        pytest.param(
            GOOD[: header_end(GOOD)] + b"\xc6\xff\xff\xff\xff" + GOOD[header_end(GOOD) + 5 :], id="data-len-huge"
        ),
        pytest.param(GOOD[: header_end(GOOD)] + b"\xc5" + GOOD[header_end(GOOD) + 1 :], id="bin16-marker"),
        pytest.param(assemble(msgpack.packb([1, 2])), id="payload-a-list"),
        pytest.param(assemble(msgpack.packb(7)), id="payload-an-int"),
        pytest.param(assemble(msgpack.packb({}) + msgpack.packb({})), id="two-headers"),
        pytest.param(assemble(msgpack.packb({1: 2})), id="int-key"),
        pytest.param(assemble(msgpack.packb({"a": {1.5: 2}})), id="float-key"),
        pytest.param(assemble(b"\x81\xa1a" + b"\x91" * 5000 + b"\xc0"), id="nested-5000"),
        pytest.param(assemble(b"\x81\xa1a" + b"\x91" * 40 + b"\xc0"), id="nested-past-max-depth"),
        pytest.param(assemble(b"\xdd\xff\xff\xff\xff"), id="huge-array-length"),
        pytest.param(assemble(b"\xdf\x7f\xff\xff\xff"), id="huge-map-length"),
        pytest.param(assemble(b"\x81\xa1a\xdb\xff\xff\xff\xff"), id="huge-str-length"),
        pytest.param(assemble(b"\x81\xa1a\xc6\x7f\xff\xff\xff"), id="huge-bin-length"),
        pytest.param(assemble(b"\x81\xa1a\xc1"), id="reserved-byte"),
        pytest.param(assemble(b"\x81\xa2\xff\xfe\x01"), id="invalid-utf8-key"),
        pytest.param(assemble(b"\x81\xa1a\xa2\xff\xfe"), id="invalid-utf8-value"),
    ],
)
def test_malformed_framing(body):
    with pytest.raises(DecodeError):
        decode(body)


@pytest.mark.parametrize("body", [bytearray(GOOD), memoryview(GOOD), GOOD.decode("latin-1"), None, 5])
def test_body_must_be_bytes(body):
    with pytest.raises(DecodeError):
        decode(body)


def test_every_truncation_and_single_bit_flip_of_the_header():
    body = encode(
        {"w": np.ones((2, 3), np.float32), "b": torch.zeros(3, dtype=torch.bfloat16), "meta": {"n": [1, "x", None]}}
    )
    for end in range(len(body)):
        with pytest.raises(DecodeError):
            decode(body[:end])
    for at in range(header_end(body) + 5):
        for bit in range(8):
            flipped = bytearray(body)
            flipped[at] ^= 1 << bit
            decode_or_error(bytes(flipped))


# ---------------------------------------------------------------- limits


def nested(depth: int):
    value = 0
    for _ in range(depth):
        value = [value]
    return value


LIMIT_CASES = [
    # (limits, a payload within them, the same payload one step past them)
    (Limits(max_tensors=3), {"t": [np.zeros(1)] * 3}, {"t": [np.zeros(1)] * 4}),
    (Limits(max_tensors=0), {"x": 1}, {"t": np.zeros(0)}),
    (Limits(max_ndim=3), {"t": np.zeros((1, 2, 3))}, {"t": np.zeros((1, 2, 3, 1))}),
    (Limits(max_ndim=0), {"t": np.zeros(())}, {"t": torch.zeros(1)}),
    (Limits(max_body_bytes=1024), {"t": np.zeros(16, np.float32)}, {"t": np.zeros(256, np.float32)}),
    (Limits(max_header_bytes=64), {"s": "x" * 40}, {"s": "x" * 80}),
    (Limits(max_header_bytes=64), {"b": b"x" * 40}, {"b": b"x" * 80}),
    (Limits(max_depth=5), {"a": nested(3)}, {"a": nested(4)}),  # the payload map is level 1, a leaf a level too
    (Limits(max_depth=1), {}, {"a": 1}),
    (Limits(max_container_len=4), {"a": [1] * 4, "b": {str(i): i for i in range(4)}}, {"a": [1] * 5}),
    (Limits(max_container_len=4), {"a": (1,) * 4}, {"b": {str(i): i for i in range(5)}}),
]


@pytest.mark.parametrize("limits, within, beyond", LIMIT_CASES)
def test_limits_are_enforced_on_encode_and_decode(limits, within, beyond):
    round_trip(within, limits)
    with pytest.raises(EncodeError):
        encode(beyond, limits)
    body = encode(beyond)  # a sender with looser limits
    with pytest.raises(DecodeError):
        decode(body, limits)


def test_default_limits_on_ndim_and_depth():
    round_trip({"t": np.zeros((1,) * DEFAULT_LIMITS.max_ndim)})
    with pytest.raises(EncodeError):
        encode({"t": np.zeros((1,) * (DEFAULT_LIMITS.max_ndim + 1))})
    round_trip({"a": nested(DEFAULT_LIMITS.max_depth - 2)})
    with pytest.raises(EncodeError):
        encode({"a": nested(DEFAULT_LIMITS.max_depth - 1)})
    cycle: list = []
    cycle.append(cycle)
    with pytest.raises(EncodeError):
        encode({"a": cycle})


def test_deep_nesting_with_a_generous_depth_limit():
    limits = Limits(max_depth=5000)
    deep = {"a": nested(2000)}  # past msgpack's own nesting limits either way
    with pytest.raises(EncodeError):
        encode(deep, limits)
    body = assemble(
        b"\x81\xa1a" + b"\x91" * 900 + msgpack.packb(msgpack.ExtType(1, msgpack.packb(["numpy", "uint8", [], 0, 1]))),
        b"\x07",
    )
    payload = decode_or_error(body, limits)  # a tensor 900 levels down: rebuilt, or refused
    if payload is not None:
        leaf = payload["a"]
        while isinstance(leaf, list):
            leaf = leaf[0]
        assert leaf == 7


tight_limits = st.builds(
    Limits,
    max_body_bytes=st.integers(0, 4096),
    max_tensors=st.integers(0, 4),
    max_ndim=st.integers(0, 3),
    max_header_bytes=st.integers(0, 300),
    max_container_len=st.integers(0, 5),
    max_depth=st.integers(1, 6),
)


@fuzz(400)
@given(payloads(scalars | small_tensors), tight_limits)
def test_sender_and_receiver_agree_on_limits(payload, limits):
    """encode(payload, limits) refuses exactly what decode(body, limits) refuses."""
    body = encode(payload)
    try:
        decoded = decode(body, limits)
    except DecodeError:
        with pytest.raises(EncodeError):
            encode(payload, limits)
    else:
        assert encode(payload, limits) == body
        assert_same(payload, decoded, body)


# ---------------------------------------------------------------- unsupported values, no pickle


class Custom:
    pass


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


UNSUPPORTED = [
    pytest.param({"a": np.array([1, "x"], dtype=object)}, id="object-array"),
    pytest.param({"a": np.array([None])}, id="object-array-none"),
    pytest.param({"a": np.array(["abc"])}, id="str-array"),
    pytest.param({"a": np.array([b"abc"])}, id="bytes-array"),
    pytest.param({"a": np.zeros(2, dtype=[("x", "f4"), ("y", "i4")])}, id="structured-array"),
    pytest.param({"a": np.zeros(2, dtype="M8[ns]")}, id="datetime64-array"),
    pytest.param({"a": np.zeros(2, dtype="m8[s]")}, id="timedelta64-array"),
    pytest.param(
        {"a": np.zeros(2, dtype=np.longdouble)},
        id="longdouble-array",
        marks=pytest.mark.skipif(np.longdouble == np.float64, reason="longdouble is float64 here"),
    ),
    pytest.param({"a": torch.zeros(2, dtype=torch.float8_e4m3fn)}, id="torch-float8"),
    pytest.param({"a": quiet(torch.zeros, 2, dtype=torch.complex32)}, id="torch-complex32"),
    pytest.param({"a": torch.zeros(2, 2).to_sparse()}, id="torch-sparse"),
    pytest.param({"a": torch.zeros(2, device="meta")}, id="torch-meta"),
    pytest.param({"a": {1, 2}}, id="set"),
    pytest.param({"a": frozenset()}, id="frozenset"),
    pytest.param({"a": Custom()}, id="custom-object"),
    pytest.param({"a": Custom}, id="class"),
    pytest.param({"a": len}, id="function"),
    pytest.param({"a": 1j}, id="complex-scalar"),
    pytest.param({"a": np.complex64(1j)}, id="numpy-complex-scalar"),
    pytest.param({"a": 2**64}, id="int-too-big"),
    pytest.param({"a": -(2**63) - 1}, id="int-too-small"),
    pytest.param({"a": {1: "x"}}, id="int-key"),
    pytest.param({"a": {(1, 2): "x"}}, id="tuple-key"),
    pytest.param({"a": {None: "x"}}, id="none-key"),
    pytest.param({"a": slice(1)}, id="slice"),
    pytest.param([1, 2], id="payload-a-list"),
    pytest.param(None, id="payload-none"),
    pytest.param(b"x", id="payload-bytes"),
]


@pytest.mark.parametrize("payload", UNSUPPORTED)
def test_unsupported_values_are_refused(payload):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EncodeError):
            encode(payload)


def test_pickle_is_never_used(monkeypatch):
    assert "pickle" not in vars(codec)
    assert not any(
        isinstance(v, types.ModuleType) and v.__name__ in ("pickle", "_pickle", "cloudpickle", "dill")
        for v in vars(codec).values()
    )

    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("loads", "load", "dumps", "dump", "Unpickler", "Pickler"):
        monkeypatch.setattr(pickle, name, refuse)
        if "_pickle" in sys.modules:
            monkeypatch.setattr(sys.modules["_pickle"], name, refuse)
    round_trip({"a": np.arange(3), "t": torch.ones(2, dtype=torch.bfloat16), "n": [None, b"x"]})
    with pytest.raises(EncodeError):
        encode({"a": np.array([Custom()], dtype=object)})
    with pytest.raises(DecodeError):
        decode(spec_body(dtype="object", nbytes=32, data=bytes(32)))
    # a pickle on the wire is only ever bytes
    decoded = decode(encode({"blob": b"\x80\x04\x95cos\nsystem\n."}))
    assert decoded == {"blob": b"\x80\x04\x95cos\nsystem\n."}
