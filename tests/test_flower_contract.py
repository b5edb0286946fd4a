"""Contract tests: every part of flwr that brokerfl.flower and the Flower handler sets
use, as they use it. A flwr release that renames, moves or changes one of them fails
here, by name, before a Flower run fails somewhere inside an app; passing here is what
admits a release to brokerfl.flower.SUPPORTED_FLWR."""

from __future__ import annotations

import inspect
import io
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

import brokerfl.flower  # noqa: E402
from brokerfl.flower import grid as broker_grid  # noqa: E402
from brokerfl.flower import node as broker_node  # noqa: E402
from brokerfl.flower import records  # noqa: E402

pytestmark = pytest.mark.timeout(60)

GRID_METHODS = {
    "set_run": ["self", "run"],
    "create_message": ["self", "content", "message_type", "dst_node_id", "group_id", "ttl"],
    "get_node_ids": ["self"],
    "push_messages": ["self", "messages"],
    "pull_messages": ["self", "message_ids"],
    "send_and_receive": ["self", "messages", "timeout"],
}


@pytest.fixture
def task_identity():
    """Flower's process-wide task identity, as the server sets it; restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id = 77
    TaskIdentity.node_id = 1
    TaskIdentity.task_id = 0
    yield TaskIdentity
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def a_metadata(**changes) -> Metadata:
    fields = dict(
        run_id=5,
        message_id="m" * 32,
        src_node_id=1,
        dst_node_id=9,
        reply_to_message_id="",
        group_id="3",
        created_at=1000.0,
        ttl=60.0,
        message_type="train",
    )
    return Metadata(**{**fields, **changes})


# ---------------------------------------------------------------- versions


def test_the_installed_flwr_is_a_supported_one():
    from importlib import metadata

    installed = metadata.version("flwr")
    assert brokerfl.flower.check_flwr() == installed
    low, high = brokerfl.flower.SUPPORTED_FLWR
    assert low <= tuple(int(part) for part in installed.split(".")[:2]) < high


# ---------------------------------------------------------------- the Grid


def test_grid_has_the_abstract_methods_brokergrid_implements():
    assert set(Grid.__abstractmethods__) == {*GRID_METHODS, "run"}
    assert isinstance(inspect.getattr_static(Grid, "run"), property)


@pytest.mark.parametrize("name", list(GRID_METHODS))
def test_grid_method_signatures(name):
    assert parameters(getattr(Grid, name)) == GRID_METHODS[name]
    assert parameters(getattr(broker_grid.BrokerGrid, name)) == GRID_METHODS[name]


def test_send_and_receive_takes_timeout_by_keyword_only():
    timeout = inspect.signature(Grid.send_and_receive).parameters["timeout"]
    assert timeout.kind is inspect.Parameter.KEYWORD_ONLY and timeout.default is None
    ttl = inspect.signature(Grid.create_message).parameters["ttl"]
    assert ttl.default is None


def test_the_broker_grid_is_a_flower_grid_with_nothing_abstract_left():
    grid = broker_grid.flower_grid("contract", {11: "0", 12: "1"})
    assert isinstance(grid, Grid) and isinstance(grid, broker_grid.BrokerGrid)
    assert not getattr(type(grid), "__abstractmethods__", None)
    for name in GRID_METHODS:  # BrokerGrid's own, not an abstract stub of Grid's
        assert getattr(type(grid), name) is getattr(broker_grid.BrokerGrid, name)
    assert list(grid.get_node_ids()) == [11, 12]
    assert grid.run.run_id == brokerfl.flower.run_id_of("contract")  # flwr.supercore.run.Run.create_empty


def test_the_broker_grid_creates_messages_as_flower_grids_do(task_identity):
    grid = broker_grid.flower_grid("contract", {11: "0"})
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    message = grid.create_message(content, "train", 11, "1", ttl=30.0)
    meta = message.metadata
    assert isinstance(message, Message) and message.content is content
    assert (meta.dst_node_id, meta.message_type, meta.group_id, meta.ttl) == (11, "train", "1", 30.0)
    assert (meta.run_id, meta.src_node_id, meta.reply_to_message_id, meta.message_id) == (77, 1, "", "")


# ---------------------------------------------------------------- Message, Metadata, Error


def test_a_message_from_content_destination_type_ttl_and_group(task_identity):
    content = RecordDict({"metrics": MetricRecord({"x": 1.0})})
    before = time.time()
    message = Message(content, 9, "evaluate", ttl=12.5, group_id="4")
    meta = message.metadata
    assert message.content is content and not message.has_error()
    assert (meta.run_id, meta.src_node_id, meta.dst_node_id) == (77, 1, 9)
    assert (meta.message_type, meta.group_id, meta.ttl, meta.reply_to_message_id) == ("evaluate", "4", 12.5, "")
    assert before - 1 <= meta.created_at <= time.time() + 1


def test_metadata_takes_the_fields_brokerfl_sets():
    assert parameters(Metadata.__init__)[:10] == [
        "self",
        "run_id",
        "message_id",
        "src_node_id",
        "dst_node_id",
        "reply_to_message_id",
        "group_id",
        "created_at",
        "ttl",
        "message_type",
    ]
    meta = a_metadata(reply_to_message_id="r" * 32)
    assert (meta.run_id, meta.message_id, meta.src_node_id, meta.dst_node_id) == (5, "m" * 32, 1, 9)
    assert (meta.reply_to_message_id, meta.group_id, meta.created_at, meta.ttl, meta.message_type) == (
        "r" * 32,
        "3",
        1000.0,
        60.0,
        "train",
    )


def test_a_message_id_lives_in_the_metadata_dict_as_message_id():
    """BrokerGrid.push_messages sets a pushed message's id there, as Flower's own grids do
    (``Metadata.message_id`` has no setter)."""
    meta = a_metadata(message_id="")
    assert meta.__dict__["_message_id"] == ""
    meta.__dict__["_message_id"] = "new-id"
    assert meta.message_id == "new-id"
    message = Message(metadata=a_metadata(message_id=""), content=RecordDict())
    message.metadata.__dict__["_message_id"] = "pushed"
    assert message.metadata.message_id == "pushed"


def test_a_message_from_metadata_and_content_or_error():
    content = RecordDict({"metrics": MetricRecord({"x": 1.0})})
    with_content = Message(metadata=a_metadata(), content=content)
    assert with_content.content is content and not with_content.has_error()
    assert with_content.metadata.message_id == "m" * 32
    with_error = Message(metadata=a_metadata(), error=Error(3, "too late"))
    assert with_error.has_error() and (with_error.error.code, with_error.error.reason) == (3, "too late")


def test_an_error_is_a_code_and_an_optional_reason():
    assert parameters(Error.__init__) == ["self", "code", "reason"]
    assert (Error(2, "boom").code, Error(2, "boom").reason) == (2, "boom")
    assert Error(0, None).reason is None  # the grid passes None for a reply's empty reason


def test_a_reply_made_with_reply_to():
    request = Message(metadata=a_metadata(), content=RecordDict())
    reply = Message(RecordDict({"metrics": MetricRecord({"x": 2.0})}), reply_to=request)
    meta = reply.metadata
    assert (meta.reply_to_message_id, meta.run_id, meta.group_id, meta.message_type) == ("m" * 32, 5, "3", "train")
    assert (meta.src_node_id, meta.dst_node_id) == (9, 1)
    error_reply = Message(Error(2, "failed"), reply_to=request)
    assert error_reply.has_error() and error_reply.metadata.reply_to_message_id == "m" * 32


def test_flowers_error_codes_and_superlink_node_id_are_brokerfls():
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    assert (ErrorCode.UNKNOWN, ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.MESSAGE_UNAVAILABLE) == (0, 2, 3)
    assert (broker_node.UNKNOWN, broker_node.CLIENT_APP_RAISED_EXCEPTION, broker_node.MESSAGE_UNAVAILABLE) == (0, 2, 3)
    assert broker_grid.MESSAGE_UNAVAILABLE == ErrorCode.MESSAGE_UNAVAILABLE
    assert SUPERLINK_NODE_ID == 1 == broker_grid.SUPERLINK_NODE_ID


def test_the_task_identity_has_run_node_and_task_setters():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    try:
        import threading

        from brokerfl.flower.grid import flower_grid

        grid = flower_grid("contract", {})
        grid.attach(lambda message: None, threading.Event())
        assert (TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id) == (grid.run_id, 1, 0)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


# ---------------------------------------------------------------- Context and records


def test_a_context_from_its_five_fields():
    state = RecordDict({"seen": MetricRecord({"count": 1})})
    context = Context(run_id=5, node_id=9, node_config={"partition-id": 0}, state=state, run_config={"a": 1})
    assert (context.run_id, context.node_id, context.state) == (5, 9, state)
    assert (context.node_config, context.run_config) == ({"partition-id": 0}, {"a": 1})
    assert context.state is state


def test_an_array_from_its_four_fields_and_from_a_numpy_array():
    assert parameters(Array.__init__)[2:6] == ["dtype", "shape", "stype", "data"]
    raw = Array(dtype="opaque", shape=(2,), stype="my.format", data=b"ab")
    assert (raw.dtype, tuple(raw.shape), raw.stype, raw.data) == ("opaque", (2,), "my.format", b"ab")
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    array = Array(values)
    saved = io.BytesIO()
    np.save(saved, values, allow_pickle=False)
    assert array.stype == "numpy.ndarray" == records.NPY
    assert (array.dtype, tuple(array.shape)) == ("float32", (2, 3))
    assert isinstance(array.data, bytes) and array.data == saved.getvalue()
    np.testing.assert_array_equal(array.numpy(), values)


def test_the_records_and_the_record_dict():
    arrays = ArrayRecord({"b": Array(np.ones(2)), "a": Array(np.zeros(1))})
    assert list(arrays) == ["b", "a"] and isinstance(arrays["a"], Array)
    config = ConfigRecord({"i": 1, "f": 0.5, "b": True, "s": "x", "by": b"\x00", "l": [1, 2]})
    assert dict(config) == {"i": 1, "f": 0.5, "b": True, "s": "x", "by": b"\x00", "l": [1, 2]}
    metrics = MetricRecord({"loss": 0.5, "n": 3, "per": [0.1, 0.2]})
    assert dict(metrics) == {"loss": 0.5, "n": 3, "per": [0.1, 0.2]}
    content = RecordDict({"arrays": arrays, "config": config, "metrics": metrics})
    assert [(name, type(record)) for name, record in content.items()] == [
        ("arrays", ArrayRecord),
        ("config", ConfigRecord),
        ("metrics", MetricRecord),
    ]
    content["extra"] = MetricRecord({"x": 1})
    assert list(content) == ["arrays", "config", "metrics", "extra"]


@pytest.mark.parametrize(
    "make",
    [
        lambda: ConfigRecord({"x": {"nested": 1}}),
        lambda: ConfigRecord({"x": None}),
        lambda: MetricRecord({"x": "text"}),
        lambda: ArrayRecord({"x": 3}),
        lambda: RecordDict({"x": {"a": 1}}),
    ],
    ids=["config dict", "config None", "metric str", "array not an Array", "record not a record"],
)
def test_records_refuse_wrong_values_with_type_or_value_error(make):
    """records.unpack turns these into RecordsError; another exception would escape it."""
    with pytest.raises((TypeError, ValueError)):
        make()


# ---------------------------------------------------------------- the apps


def test_a_server_app_is_called_with_a_grid_and_a_context():
    app = ServerApp()
    called = []

    @app.main()
    def main(grid, context):
        called.append((grid, context))

    grid = broker_grid.flower_grid("contract", {11: "0"})
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    assert app(grid, context) is None
    assert called == [(grid, context)]


def test_a_client_app_is_called_with_a_message_and_a_context():
    app = ClientApp()

    @app.train()
    def train(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"node": context.node_id})}), reply_to=message)

    @app.evaluate()
    def evaluate(message, context):
        return Message(RecordDict({"metrics": MetricRecord({"evaluated": 1})}), reply_to=message)

    context = Context(run_id=5, node_id=9, node_config={}, state=RecordDict(), run_config={})
    reply = app(Message(metadata=a_metadata(), content=RecordDict()), context)
    assert reply.metadata.reply_to_message_id == "m" * 32 and reply.content["metrics"]["node"] == 9
    reply = app(Message(metadata=a_metadata(message_type="evaluate"), content=RecordDict()), context)
    assert dict(reply.content["metrics"]) == {"evaluated": 1}


class RecordingGrid(Grid):
    """A grid that answers every train and evaluate request at once, and records how it
    was asked (as it was asked: FedAvg reuses one ConfigRecord for every round)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes
        self.calls: list[dict] = []

    @property
    def run(self):
        raise AssertionError("FedAvg does not read the run")

    def set_run(self, run) -> None:
        raise AssertionError("FedAvg does not set the run")

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        raise AssertionError("FedAvg.start sends with send_and_receive")

    def pull_messages(self, message_ids):
        raise AssertionError("FedAvg.start receives with send_and_receive")

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls.append(
            {
                "types": [m.metadata.message_type for m in messages],
                "nodes": sorted(m.metadata.dst_node_id for m in messages),
                "server-rounds": [m.content["config"]["server-round"] for m in messages],
                "rounds": [broker_grid._round_of(m.metadata.group_id, records.pack(m.content)) for m in messages],
                "timeout": timeout,
            }
        )
        replies = []
        for i, message in enumerate(messages):
            message.metadata.__dict__["_message_id"] = f"{len(self.calls)}-{i}"
            metrics = MetricRecord({"num-examples": 1 + i, "loss": 0.5})
            if message.metadata.message_type == "train":
                content = RecordDict({"arrays": message.content["arrays"], "metrics": metrics})
            else:
                content = RecordDict({"metrics": metrics})
            replies.append(Message(content, reply_to=message))
        return replies


def test_fedavg_start_sends_with_send_and_receive_and_puts_the_server_round_in_the_config(task_identity):
    """The grid takes a request's round from its group id if that is a number, else from
    this ``server-round`` (FedAvg leaves group_id empty)."""
    grid = RecordingGrid([21, 22, 23])
    initial = ArrayRecord([np.ones((2, 2), dtype=np.float32)])
    result = FedAvg(fraction_train=1.0, fraction_evaluate=1.0).start(grid=grid, initial_arrays=initial, num_rounds=2)
    assert [call["types"] for call in grid.calls] == [["train"] * 3, ["evaluate"] * 3] * 2
    for index, call in enumerate(grid.calls):
        server_round = index // 2 + 1
        assert call["timeout"] is not None and call["timeout"] > 0
        assert call["nodes"] == [21, 22, 23]
        assert call["server-rounds"] == call["rounds"] == [server_round] * 3
    np.testing.assert_array_equal(result.arrays.to_numpy_ndarrays()[0], np.ones((2, 2), dtype=np.float32))
