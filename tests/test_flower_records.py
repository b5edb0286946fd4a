"""Flower records on the wire (brokerfl.flower.records): a RecordDict packs and unpacks to
the same records, byte for byte through a FlowerRequest's wire form; the request digest
is stable and says what was asked; whatever malformed content a peer sends is a
RecordsError, never another exception."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from brokerfl.flower import records  # noqa: E402
from brokerfl.flower.records import RecordsError  # noqa: E402
from brokerfl.wire.message import FlowerRequest, from_wire, to_wire  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def through_the_wire(content: dict) -> dict:
    """``content`` as the receiver of a FlowerRequest carrying it decodes it."""
    request = FlowerRequest(run="r", client_id="0", node_id=7, request_id="q", message_type="train", content=content)
    envelope, body = to_wire(request)
    received = from_wire(envelope, body)
    assert isinstance(received, FlowerRequest)
    return received.content


def every_kind(empty_shape: tuple[int, ...] = (0, 2)) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "f32": Array(np.arange(12, dtype=np.float32).reshape(3, 4)),
                    "f64": Array(np.linspace(-1.0, 1.0, 5)),
                    "i64": Array(np.array([-(2**62), 0, 2**62], dtype=np.int64)),
                    "scalar": Array(np.array(3.5)),
                    "empty": Array(np.zeros(empty_shape, dtype=np.float32)),
                    "blob": Array(dtype="opaque", shape=(5,), stype="my.format", data=b"hello"),
                    "fortran": Array(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))),
                    "big-endian": Array(np.arange(3, dtype=">f4")),
                }
            ),
            "config": ConfigRecord(
                {
                    "int": -3,
                    "float": 0.25,
                    "bool": True,
                    "str": "text ü",
                    "bytes": b"\x00\xff",
                    "ints": [1, 2, 3],
                    "floats": [0.5, 1.5],
                    "bools": [True, False],
                    "strs": ["a", "b"],
                    "bytess": [b"a", b""],
                    "none-yet": [],
                }
            ),
            "metrics": MetricRecord({"loss": 0.125, "num-examples": 10, "per-class": [0.5, 0.25], "counts": [1, 2]}),
        }
    )


def described(content: RecordDict) -> list:
    """Everything a RecordDict holds, in order, with each Array's fields and bytes."""
    out = []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            items = [(k, a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for k, a in record.items()]
        else:
            items = [(k, v, type(v), [type(x) for x in v] if isinstance(v, list) else None) for k, v in record.items()]
        out.append((name, type(record).__name__, items))
    return out


# ---------------------------------------------------------------- round trips


def test_every_record_kind_round_trips_through_the_wire_byte_for_byte():
    content = every_kind()
    packed = records.pack(content)
    assert described(records.unpack(packed)) == described(content)
    assert described(records.unpack(through_the_wire(packed))) == described(content)


def test_arrays_come_back_as_the_same_numpy_arrays():
    content = every_kind()
    back = records.unpack(through_the_wire(records.pack(content)))["arrays"]
    for key in ("f32", "f64", "i64", "scalar", "empty", "fortran", "big-endian"):
        sent = content["arrays"][key].numpy()
        got = back[key].numpy()
        assert got.dtype == sent.dtype and got.shape == sent.shape, key
        np.testing.assert_array_equal(got, sent)
    assert back["blob"].data == b"hello" and back["blob"].stype == "my.format"


def test_a_plain_npy_array_travels_as_a_tensor_and_other_bytes_as_uint8():
    packed = records.pack(every_kind())
    arrays = dict(packed["records"][0][2])
    f32 = arrays["f32"]
    assert f32["values"].dtype == np.float32 and f32["values"].shape == (3, 4)
    assert f32["header"].startswith(b"\x93NUMPY")
    for key in ("blob", "fortran", "big-endian"):  # no .npy the wire carries as a tensor: raw bytes
        assert arrays[key]["header"] == b"" and arrays[key]["values"].dtype == np.uint8


def test_record_order_and_item_order_are_kept():
    content = RecordDict(
        {
            "z": MetricRecord({"b": 1, "a": 2}),
            "a": ArrayRecord({"w2": Array(np.ones(2)), "w1": Array(np.zeros(1))}),
        }
    )
    back = records.unpack(through_the_wire(records.pack(content)))
    assert list(back) == ["z", "a"]
    assert list(back["z"]) == ["b", "a"] and list(back["a"]) == ["w2", "w1"]


def test_an_empty_record_dict_round_trips():
    assert records.pack(RecordDict()) == {"records": []}
    assert len(records.unpack(through_the_wire({"records": []}))) == 0


# ---------------------------------------------------------------- the digest


def digest_of(content: RecordDict, message_type: str = "train", group_id: str = "1", node_id: int = 5) -> str:
    return records.digest(message_type=message_type, group_id=group_id, node_id=node_id, content=records.pack(content))


def with_digestible_arrays() -> RecordDict:
    """Every kind of record, its empty array one-dimensional (see the xfail below)."""
    return every_kind(empty_shape=(0,))


def test_the_digest_is_stable_and_the_same_after_the_wire():
    first, again = digest_of(with_digestible_arrays()), digest_of(with_digestible_arrays())
    assert first == again
    received = through_the_wire(records.pack(with_digestible_arrays()))
    assert records.digest(message_type="train", group_id="1", node_id=5, content=received) == first


def test_the_digest_changes_with_content_type_group_and_node():
    base = digest_of(with_digestible_arrays())
    changed_value = with_digestible_arrays()
    changed_value["arrays"]["f32"] = Array(np.arange(12, dtype=np.float32).reshape(3, 4) + 1)
    changed_dtype = with_digestible_arrays()  # the same bytes, read as another dtype
    changed_dtype["arrays"]["f32"] = Array(np.arange(12, dtype=np.float32).reshape(3, 4).view(np.int32))
    changed_shape = with_digestible_arrays()
    changed_shape["arrays"]["f32"] = Array(np.arange(12, dtype=np.float32).reshape(4, 3))
    changed_blob = with_digestible_arrays()
    changed_blob["arrays"]["blob"] = Array(dtype="opaque", shape=(5,), stype="my.format", data=b"hellO")
    changed_config = with_digestible_arrays()
    changed_config["config"]["int"] = -2
    changed_config_type = with_digestible_arrays()  # -3 and -3.0 are different config values
    changed_config_type["config"]["int"] = -3.0
    changed_metric = with_digestible_arrays()
    changed_metric["metrics"]["loss"] = 0.126
    digests = {
        base,
        digest_of(changed_value),
        digest_of(changed_dtype),
        digest_of(changed_shape),
        digest_of(changed_blob),
        digest_of(changed_config),
        digest_of(changed_config_type),
        digest_of(changed_metric),
        digest_of(with_digestible_arrays(), message_type="evaluate"),
        digest_of(with_digestible_arrays(), group_id="2"),
        digest_of(with_digestible_arrays(), node_id=6),
    }
    assert len(digests) == 11


@pytest.mark.parametrize("shape", [(0, 2), (2, 0), (3, 0, 1)])
def test_the_digest_of_an_empty_multi_dimensional_array(shape):
    content = RecordDict({"arrays": ArrayRecord({"empty": Array(np.zeros(shape, dtype=np.float32))})})
    assert digest_of(content) != digest_of(RecordDict({"arrays": ArrayRecord({"empty": Array(np.zeros(0))})}))


# ---------------------------------------------------------------- hostile content


def npy_header(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()[: len(out.getvalue()) - array.nbytes]


def an_array(**changes) -> dict:
    values = np.arange(3, dtype=np.float32)
    fields = {"dtype": "float32", "shape": [3], "stype": records.NPY, "header": npy_header(values), "values": values}
    return {**fields, **changes}


def arrays_payload(fields) -> dict:
    return {"records": [["a", records.ARRAYS, [["w", fields]]]]}


HOSTILE = {
    "not a dict": [1, 2],
    "no records key": {"recs": []},
    "an extra key": {"records": [], "more": 1},
    "records not a list": {"records": {"a": 1}},
    "an entry not a triple": {"records": [["a", "metrics"]]},
    "a name not a str": {"records": [[1, "metrics", []]]},
    "an empty name": {"records": [["", "metrics", []]]},
    "a name too long": {"records": [["n" * 2000, "metrics", []]]},
    "items not a list": {"records": [["a", "metrics", {"x": 1}]]},
    "an unknown kind": {"records": [["a", "tensors", []]]},
    "a kind not a str": {"records": [["a", 3, []]]},
    "an item not a pair": {"records": [["a", "metrics", [["x", 1, 2]]]]},
    "an item key not a str": {"records": [["a", "metrics", [[1, 1]]]]},
    "an empty item key": {"records": [["a", "config", [["", 1]]]]},
    "a duplicate item key": {"records": [["a", "metrics", [["x", 1], ["x", 2]]]]},
    "a bool metric": {"records": [["a", "metrics", [["x", True]]]]},
    "a list of bool metrics": {"records": [["a", "metrics", [["x", [True, False]]]]]},
    "a str metric": {"records": [["a", "metrics", [["x", "1"]]]]},
    "a mixed metric list": {"records": [["a", "metrics", [["x", [1, 2.0]]]]]},
    "a mixed config list": {"records": [["a", "config", [["x", [1, "a"]]]]]},
    "a bool and int config list": {"records": [["a", "config", [["x", [True, 1]]]]]},
    "a nested config list": {"records": [["a", "config", [["x", [[1]]]]]]},
    "a dict config value": {"records": [["a", "config", [["x", {"k": 1}]]]]},
    "a None config value": {"records": [["a", "config", [["x", None]]]]},
    "array fields not a dict": arrays_payload([1, 2]),
    "an array field missing": arrays_payload({k: v for k, v in an_array().items() if k != "header"}),
    "an extra array field": arrays_payload(an_array(more=1)),
    "a dtype not a str": arrays_payload(an_array(dtype=5)),
    "a dtype too long": arrays_payload(an_array(dtype="f" * 100)),
    "a shape not a list": arrays_payload(an_array(shape="3")),
    "a negative shape": arrays_payload(an_array(shape=[-3])),
    "a bool in a shape": arrays_payload(an_array(shape=[True, 3])),
    "a shape of too many dims": arrays_payload(an_array(shape=[1] * 40)),
    "a shape unlike the values": arrays_payload(an_array(shape=[4])),
    "a dtype unlike the values": arrays_payload(an_array(dtype="float64")),
    "values not a tensor": arrays_payload(an_array(values=[0.0, 1.0, 2.0])),
    "a header not bytes": arrays_payload(an_array(header="\x93NUMPY")),
    "a header with another stype": arrays_payload(an_array(stype="other")),
    "raw bytes not uint8": arrays_payload(an_array(header=b"", values=np.arange(3, dtype=np.int16))),
    "raw bytes not a vector": arrays_payload(an_array(header=b"", values=np.zeros((2, 2), dtype=np.uint8))),
}


@pytest.mark.parametrize("payload", list(HOSTILE.values()), ids=list(HOSTILE))
def test_malformed_content_is_a_records_error(payload):
    with pytest.raises(RecordsError):
        records.unpack(payload)


HOSTILE_CONTENT = {name: payload for name, payload in HOSTILE.items() if isinstance(payload, dict)}


@pytest.mark.parametrize("payload", list(HOSTILE_CONTENT.values()), ids=list(HOSTILE_CONTENT))
def test_malformed_content_from_the_wire_is_a_records_error(payload):
    """The same, as a receiver gets it: decoded from a FlowerRequest's body (a FlowerRequest's
    content is a dict; the codec's tensors are read-only views of the body)."""
    with pytest.raises(RecordsError):
        records.unpack(through_the_wire(payload))


@pytest.mark.parametrize(
    "header",
    [npy_header(np.zeros(3, dtype=np.float64)), npy_header(np.zeros(4, dtype=np.float32)), b"not a npy header"],
    ids=["another dtype", "another shape", "garbage"],
)
def test_a_header_unlike_the_values_is_a_records_error(header):
    with pytest.raises(RecordsError):
        records.unpack(through_the_wire(arrays_payload(an_array(header=header))))


def test_a_duplicate_record_name_is_a_records_error():
    with pytest.raises(RecordsError):
        records.unpack({"records": [["a", "metrics", [["x", 1]]], ["a", "config", [["y", "s"]]]]})


wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
array_fields = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["float32", "uint8", "int64", "x"]),
        "shape": st.lists(st.integers(-1, 4), max_size=3),
        "stype": st.sampled_from([records.NPY, "other"]),
        "header": st.sampled_from([b"", npy_header(np.zeros(3, dtype=np.float32)), b"junk"]),
        "values": st.sampled_from(
            [np.arange(3, dtype=np.float32), np.zeros(4, dtype=np.uint8), np.zeros((2, 2), dtype=np.int64)]
        ),
    }
)
items = st.lists(st.tuples(st.text(max_size=4), wire_values | array_fields).map(list) | wire_values, max_size=4)
kinds = st.sampled_from([records.ARRAYS, records.CONFIG, records.METRICS, "other"])
entries = st.lists(st.tuples(st.text(max_size=4), kinds, items).map(list), max_size=3)


@settings(max_examples=200, deadline=None)
@given(entries)
def test_any_payload_is_a_record_dict_or_a_records_error(entries):
    try:
        records.unpack({"records": entries})
    except RecordsError:
        pass
