"""brokerfl.wire.message: every registered type round-trips through to_wire/from_wire; bad
envelopes and bodies are DecodeErrors; subclasses register themselves."""

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from brokerfl.wire import message as message_module
from brokerfl.wire.codec import DecodeError, encode
from brokerfl.wire.message import (
    ENVELOPE_FIELDS,
    MESSAGE_TYPES,
    SCHEMA_VERSION,
    Envelope,
    EvaluateResult,
    Join,
    Message,
    ParameterUpdate,
    Tensors,
    TrainTask,
    from_wire,
    to_wire,
)

BUILT_INS = [
    "join",
    "leave",
    "heartbeat",
    "train_task",
    "parameter_update",
    "gradients",
    "evaluate_task",
    "evaluate_result",
    "exit",
]
FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- helpers


def payload_fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name not in ENVELOPE_FIELDS}


def required(cls) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in ENVELOPE_FIELDS
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    }


class UnknownHint(Exception):
    pass


arrays = hnp.arrays(
    st.sampled_from([np.float32, np.float32, np.float32, np.float64, np.int64, np.uint8]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.binary(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


def strategy_for(hint) -> st.SearchStrategy:
    """Values a field of this type may hold on the wire (as they come back: lists, not tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return json_like
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(-(2**63), 2**63 - 1)
    if hint is float:
        return st.floats(allow_nan=False)
    if hint is str:
        return st.text(max_size=20)
    if hint is bytes:
        return st.binary(max_size=20)
    if hint is np.ndarray:
        return arrays
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is list:
        return st.lists(strategy_for(args[0] if args else Any), max_size=4)
    if origin is dict:
        key, value = args or (Any, Any)
        keys = st.text(max_size=8) if key in (str, Any) else strategy_for(key)
        return st.dictionaries(keys, strategy_for(value), max_size=4)
    raise UnknownHint(hint)


def assert_same(a, b):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert type(a) is type(b) and a == b


def assert_round_trip(message: Message) -> Message:
    envelope, body = to_wire(message)
    assert isinstance(body, bytes)
    assert envelope.type == type(message).TYPE
    assert (envelope.message_id, envelope.sender, envelope.timestamp) == (
        message.message_id,
        message.sender,
        message.timestamp,
    )
    assert envelope.headers == {
        "run": message.run,
        "round": message.round,
        "model_version": message.model_version,
        "schema_version": message.schema_version,
    }
    back = from_wire(envelope, body)
    assert type(back) is type(message)
    for f in dataclasses.fields(message):
        assert_same(getattr(message, f.name), getattr(back, f.name))
    return back


envelopes = st.fixed_dictionaries(
    {
        "sender": st.text(max_size=20),
        "run": st.text(max_size=20),
        "round": st.integers(0, 2**40),
        "model_version": st.integers(0, 2**40),
        "timestamp": st.floats(0, 4e9),
    },
    optional={"message_id": st.text(min_size=1, max_size=32)},
)
names = st.from_regex(r"\A[A-Za-z0-9_-]{1,64}\Z")
# Protocol rules beyond types (brokerfl.wire.message._check_ranges): what a field of that name may hold.
FIELD_STRATEGIES = {
    "client_id": names,
    "participants": st.lists(names, max_size=4),
    "clients": st.dictionaries(names, st.integers(0, 2**63 - 1), max_size=4),  # Heartbeats
    "num_samples": st.integers(0, 2**63 - 1),
    "version": st.integers(0, 2**63 - 1),
    "parent": st.none() | st.integers(0, 2**63 - 1),
    "model_offset": st.integers(0, 2**63 - 1),
    "node_id": st.integers(0, 2**63 - 1),  # Flower's node ids (FlowerRequest, FlowerReply)
    "seq": st.integers(0, 2**63 - 1),  # a Flower request's number
    "call": st.integers(0, 2**63 - 1),  # a Flower exchange's number
    "training": st.dictionaries(names, st.floats(0, 1e8), max_size=4),  # Heartbeats: seconds training
    "training_s": st.none() | st.floats(0, 1e8),  # Heartbeat
    "error": st.text(max_size=300),  # TrainFailed, Leave
    # ParameterUpdate, EvaluateResult, ModelVersionStored: names an app chose (brokerfl.wire.app_metrics)
    "metrics": st.dictionaries(
        st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,63}", fullmatch=True), st.floats(allow_nan=False), max_size=8
    ),
}


def example_value(hint):
    """One valid value of a field's type."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (Any, object):
        return 1
    if origin in (typing.Union, types.UnionType):
        return example_value(next(a for a in args if a is not type(None)))
    if origin is list:
        return [example_value(args[0])] if args else []
    if origin is dict:
        return {"k": example_value(args[1])} if args else {}
    return {int: 1, float: 1.5, str: "x", bytes: b"x", bool: True, np.ndarray: np.zeros(2, np.float32)}[hint]


def valid_payload(cls) -> dict[str, Any]:
    return {name: example_value(hint) for name, hint in payload_fields(cls).items()}


def envelope_for(cls, **headers) -> Envelope:
    return Envelope(
        type=cls.TYPE,
        message_id="m1",
        sender="s",
        timestamp=1.0,
        headers={"run": "r", "round": 1, "model_version": 2, "schema_version": SCHEMA_VERSION, **headers},
    )


# ---------------------------------------------------------------- round trips


def test_built_ins_are_registered():
    for name in BUILT_INS:
        assert name in MESSAGE_TYPES and MESSAGE_TYPES[name].TYPE == name
    assert MESSAGE_TYPES["parameter_update"] is ParameterUpdate
    assert "" not in MESSAGE_TYPES and Message.TYPE == ""


# LOCAL types are made and handled in one process (timers, work aside's outcomes): never encoded
@pytest.mark.parametrize(
    "name",
    sorted(n for n in set(BUILT_INS) | set(MESSAGE_TYPES) if n not in MESSAGE_TYPES or not MESSAGE_TYPES[n].LOCAL),
)
@settings(max_examples=60, **FUZZ)
@given(data=st.data())
def test_every_registered_type_round_trips(name, data):
    cls = MESSAGE_TYPES[name]
    try:
        strategies = {
            f: FIELD_STRATEGIES[f] if f in FIELD_STRATEGIES else strategy_for(h) for f, h in payload_fields(cls).items()
        }
    except UnknownHint as exc:
        pytest.skip(f"{name}: no strategy for field type {exc}")
    values = {}
    for f, strategy in strategies.items():
        if f in required(cls) or data.draw(st.booleans(), label=f"set {f}"):
            values[f] = data.draw(strategy, label=f)
    message = cls(**data.draw(envelopes, label="envelope"), **values)
    assert_round_trip(message)


@settings(max_examples=100, **FUZZ)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20),
        hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=4, max_side=6)),
        max_size=8,
    ),
    st.integers(0, 2**62),
)
def test_parameter_update_with_float32_parameters(parameters, num_samples):
    message = ParameterUpdate(
        client_id="c1",
        task_id="t1",
        parameters=parameters,
        num_samples=num_samples,
        metrics={"loss": 0.5, "acc": 1.0},
        round=3,
        model_version=7,
    )
    assert_round_trip(message)
    envelope, body = to_wire(message)
    flat = np.frombuffer(body, np.uint8)
    for array in from_wire(envelope, body).parameters.values():  # handlers get read-only zero-copy views
        assert array.dtype == np.float32 and not array.flags.writeable
        assert array.size == 0 or np.shares_memory(array, flat)


def test_torch_tensors_arrive_as_numpy():
    parameters = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    message = TrainTask(parameters=parameters, participants=["a", "b"], config={"lr": 0.1, "epochs": 2})
    back = from_wire(*to_wire(message))
    assert isinstance(back.parameters["w"], np.ndarray) and back.parameters["w"].dtype == np.float32
    assert np.array_equal(back.parameters["w"], parameters["w"].numpy())
    assert back.parameters["b"].dtype == np.float32 and np.array_equal(back.parameters["b"], np.ones(2, np.float32))


def test_ints_widen_to_floats_and_defaults_fill_in():
    payload = {"client_id": "c", "task_id": "t", "loss": 1, "accuracy": 0, "num_samples": 5}
    back = from_wire(envelope_for(EvaluateResult), encode(payload))
    assert back.loss == 1.0 and type(back.loss) is float and type(back.accuracy) is float
    back = from_wire(envelope_for(Join), encode({"client_id": "c"}))
    assert back.num_samples == 0
    assert (back.message_id, back.sender, back.run, back.round, back.model_version, back.timestamp) == (
        "m1",
        "s",
        "r",
        1,
        2,
        1.0,
    )
    bare = Envelope(type="join", message_id="m", sender="", timestamp=2, headers={})
    back = from_wire(bare, encode({"client_id": "c"}))
    assert (back.run, back.round, back.model_version, back.schema_version, back.timestamp) == (
        "",
        0,
        0,
        SCHEMA_VERSION,
        2.0,
    )


def test_reply_keeps_run_round_and_version():
    task = TrainTask(parameters={}, participants=["c"], run="r9", round=4, model_version=3, sender="server")
    update = task.reply(ParameterUpdate, client_id="c", task_id=task.message_id, parameters={}, num_samples=1)
    assert (update.run, update.round, update.model_version) == ("r9", 4, 3)
    assert update.message_id != task.message_id
    assert_round_trip(update)


# ---------------------------------------------------------------- from_wire errors


def wrong_values(hint) -> list:
    """Values that are not of this type (and that the codec can still encode)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (Any, object):
        return []
    if hint is int:
        return ["1", 1.5, True, None, [1], {"a": 1}, b"1", np.zeros(1)]
    if hint is float:
        return ["1.0", True, None, [1.0], b"x", np.zeros(1, np.float32)]
    if hint is str:
        return [1, b"x", None, ["x"], True, 1.5]
    if hint is np.ndarray:
        return [[1.0, 2.0], 1.0, "x", None, b"\x00" * 8, {"a": 1}]
    if origin is list:
        return ["x", {"a": 1}, 1, None] + [[v] for v in wrong_values(args[0])[:3]]
    if origin is dict:
        bad = [[], "x", 1, None, [np.zeros(2, np.float32)], {b"k": example_value(args[1])}]
        return bad + [{"k": v} for v in wrong_values(args[1])[:4]]
    if origin in (typing.Union, types.UnionType):
        return []
    return [object]  # pragma: no cover


WRONG_FIELD_CASES = [
    pytest.param(name, f, value, id=f"{name}.{f}={type(value).__name__}:{i}")
    for name in BUILT_INS
    for f, hint in payload_fields(MESSAGE_TYPES[name]).items()
    for i, value in enumerate(wrong_values(hint))
]


@pytest.mark.parametrize("name, field_name, value", WRONG_FIELD_CASES)
def test_wrong_field_type(name, field_name, value):
    cls = MESSAGE_TYPES[name]
    payload = valid_payload(cls)
    from_wire(envelope_for(cls), encode(payload))  # the control
    payload[field_name] = value
    with pytest.raises(DecodeError):
        from_wire(envelope_for(cls), encode(payload))


def test_named_wrong_types():
    cls = ParameterUpdate
    for field_name, value in [
        ("num_samples", "12"),  # str for int
        ("num_samples", True),  # bool for int
        ("num_samples", 12.0),  # float for int
        ("parameters", [np.zeros(2, np.float32)]),  # list for tensors
        ("parameters", {"w": [0.0, 1.0]}),  # list for a tensor
        ("metrics", {"loss": "low"}),
        ("metrics", {"loss": False}),
    ]:
        payload = {**valid_payload(cls), field_name: value}
        with pytest.raises(DecodeError, match=field_name):
            from_wire(envelope_for(cls), encode(payload))


@pytest.mark.parametrize("name", BUILT_INS)
def test_unknown_and_missing_fields(name):
    cls = MESSAGE_TYPES[name]
    with pytest.raises(DecodeError, match="unknown field"):
        from_wire(envelope_for(cls), encode({**valid_payload(cls), "surprise": 1}))
    for envelope_field in ("round", "sender", "message_id"):  # envelope fields never come in the body
        with pytest.raises(DecodeError):
            from_wire(envelope_for(cls), encode({**valid_payload(cls), envelope_field: 1}))
    for missing in sorted(required(cls)):
        payload = valid_payload(cls)
        del payload[missing]
        with pytest.raises(DecodeError, match="missing field"):
            from_wire(envelope_for(cls), encode(payload))


def test_unknown_type():
    for type_name in ["no_such_message", "", "Join", "JOIN", "message"]:
        envelope = dataclasses.replace(envelope_for(Join), type=type_name)
        with pytest.raises(DecodeError, match="unknown message type"):
            from_wire(envelope, encode({"client_id": "c"}))


@pytest.mark.parametrize(
    "version", [SCHEMA_VERSION + 1, 0, -1, str(SCHEMA_VERSION), None, True, float(SCHEMA_VERSION), [SCHEMA_VERSION]]
)
def test_wrong_schema_version(version):
    with pytest.raises(DecodeError, match="schema version"):
        from_wire(envelope_for(Join, schema_version=version), encode({"client_id": "c"}))


@pytest.mark.parametrize(
    "change",
    [
        {"message_id": 5},
        {"message_id": None},
        {"sender": 7},
        {"timestamp": "now"},
        {"timestamp": None},
        {"timestamp": True},
        {"headers": {"run": 1}},
        {"headers": {"round": "1"}},
        {"headers": {"round": True}},
        {"headers": {"round": 1.0}},
        {"headers": {"model_version": "2"}},
    ],
    ids=str,
)
def test_wrong_envelope_types(change):
    envelope = envelope_for(Join)
    if "headers" in change:
        envelope = dataclasses.replace(envelope, headers={**envelope.headers, **change["headers"]})
    else:
        envelope = dataclasses.replace(envelope, **change)
    with pytest.raises(DecodeError):
        from_wire(envelope, encode({"client_id": "c"}))


@pytest.mark.parametrize(
    "body", [b"", b"garbage", encode({"client_id": "c"})[:-1], encode({"client_id": "c"}) + b"\x00"]
)
def test_bad_bodies(body):
    with pytest.raises(DecodeError):
        from_wire(envelope_for(Join), body)


@settings(max_examples=300, **FUZZ)
@given(
    st.sampled_from(BUILT_INS),
    st.dictionaries(
        st.sampled_from(["client_id", "num_samples", "parameters", "participants", "config", "x"])
        | st.text(max_size=5),
        json_like | arrays,
        max_size=4,
    ),
)
def test_arbitrary_payloads_give_a_message_or_a_decode_error(name, payload):
    cls = MESSAGE_TYPES[name]
    try:
        message = from_wire(envelope_for(cls), encode(payload))
    except DecodeError:
        return
    assert type(message) is cls
    assert set(payload) <= set(payload_fields(cls)) and required(cls) <= set(payload)


# ---------------------------------------------------------------- user-defined types


@pytest.fixture()
def registry():
    """Keep the test's own registrations out of the module-wide registry."""
    saved = dict(MESSAGE_TYPES)
    yield MESSAGE_TYPES
    MESSAGE_TYPES.clear()
    MESSAGE_TYPES.update(saved)


def test_subclass_registers_under_its_snake_case_name_and_round_trips(registry):
    @dataclass(kw_only=True)
    class CodecProbeResult(Message):
        values: Tensors
        label: str
        score: float | None = None
        tags: list[str] = field(default_factory=list)
        extra: dict[str, Any] = field(default_factory=dict)

    assert CodecProbeResult.TYPE == "codec_probe_result"
    assert registry["codec_probe_result"] is CodecProbeResult
    message = CodecProbeResult(
        values={"v": np.arange(5, dtype=np.float32)},
        label="x",
        tags=["a"],
        extra={"n": [1, None, "s"]},
        round=2,
        sender="c9",
    )
    back = assert_round_trip(message)
    assert back.score is None
    message.score = 0.25
    assert assert_round_trip(message).score == 0.25
    envelope, _ = to_wire(message)
    with pytest.raises(DecodeError):
        from_wire(envelope, encode({"values": {}, "label": "x", "score": "high"}))

    @dataclass(kw_only=True)
    class Named(Message):
        TYPE = "codec_probe_named"
        n: int = 0

    assert registry["codec_probe_named"] is Named and "named" not in registry
    assert from_wire(*to_wire(Named(n=3))).n == 3

    @dataclass(kw_only=True)
    class CodecProbeChild(CodecProbeResult):  # a subclass of a registered type gets its own name
        more: int = 0

    assert CodecProbeChild.TYPE == "codec_probe_child" and registry["codec_probe_result"] is CodecProbeResult
    child = CodecProbeChild(values={}, label="y", more=4)
    assert type(from_wire(*to_wire(child))) is CodecProbeChild


def test_two_classes_under_one_name_is_a_type_error(registry):
    @dataclass(kw_only=True)
    class CodecProbeDup(Message):
        n: int = 0

    with pytest.raises(TypeError, match="codec_probe_dup"):

        class Other(Message):
            TYPE = "codec_probe_dup"

    def elsewhere():
        class CodecProbeDup(Message):  # same name, another scope
            pass

    with pytest.raises(TypeError, match="codec_probe_dup"):
        elsewhere()
    with pytest.raises(TypeError, match="'join'"):

        class Imposter(Message):
            TYPE = "join"

    assert registry["codec_probe_dup"] is CodecProbeDup and registry["join"] is Join
    assert "other" not in registry and "imposter" not in registry


def define_in_module(module_name: str, source: str) -> dict:
    namespace = {"__name__": module_name}
    exec(compile(source, f"<{module_name}>", "exec"), namespace)
    return namespace


def test_same_qualname_in_another_module_is_a_type_error(registry):
    """A plugin's own ``class Join(Message)`` must not silently take over the built-in."""
    source = (
        "from dataclasses import dataclass\nfrom brokerfl.wire.message import "
        "Message\n\n@dataclass(kw_only=True)\nclass Join(Message):\n    x: int = 0\n"
    )
    with pytest.raises(TypeError, match="'join'"):
        define_in_module("some_plugin.messages", source)
    assert registry["join"] is Join


def test_redefining_the_same_class_in_the_same_module_is_allowed(registry):
    """What a module reload does: the newer class replaces the older one."""
    source = (
        "from dataclasses import dataclass\nfrom brokerfl.wire.message import "
        "Message\n\n@dataclass(kw_only=True)\nclass CodecProbeReloaded(Message):\n    x: int = 0\n"
    )
    first = define_in_module("some_plugin.reloaded", source)["CodecProbeReloaded"]
    second = define_in_module("some_plugin.reloaded", source)["CodecProbeReloaded"]
    assert first is not second and registry["codec_probe_reloaded"] is second
    assert type(from_wire(*to_wire(second(x=1)))) is second


def test_envelope_fields_are_the_message_base_fields():
    assert set(ENVELOPE_FIELDS) == {f.name for f in dataclasses.fields(Message)}
    assert message_module.SCHEMA_VERSION == SCHEMA_VERSION
    message = Join(client_id="c")
    assert (
        len(message.message_id) == 32 and math.isfinite(message.timestamp) and message.schema_version == SCHEMA_VERSION
    )


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"participants": ["a", "b,c"]}, r"participants\[1\]: 'b,c' is not a client id"),  # a separator inside one id
        ({"participants": ["a", ""]}, r"participants\[1\]: '' is not a client id"),
        ({"participants": ["a", "x" * 65]}, r"participants\[1\]: 'x+' is not a client id"),
        ({"participants": ["a", 7]}, r"participants\[1\]: expected str, got int"),
    ],
)
def test_participants_are_checked_in_one_pass_and_the_bad_one_is_named(payload, error):
    envelope = envelope_for(TrainTask)
    body = encode({"parameters": {}, **payload})
    with pytest.raises(DecodeError, match=error):
        from_wire(envelope, body)


def test_heartbeats_name_clients_by_the_client_id_rule():
    from brokerfl.wire.message import Heartbeats

    message = Heartbeats(clients={"0": 10, "site-b": 3})
    assert from_wire(*to_wire(message)).clients == {"0": 10, "site-b": 3}
    for bad, error in (
        ({"a.b": 1}, r"clients: 'a.b' is not a client id"),
        ({"a": -1}, r"clients\['a'\]: -1 samples is out of range"),
    ):
        with pytest.raises(DecodeError, match=error):
            from_wire(envelope_for(Heartbeats), encode({"clients": bad}))


def test_what_clients_say_of_their_training_is_checked():
    """Heartbeats' training seconds, Heartbeat's training_s and TrainFailed's error: client
    ids by the rule, durations finite and non-negative (NaN too), errors bounded."""
    from brokerfl.wire.message import MAX_ERROR_CHARS, Heartbeat, Heartbeats, TrainFailed

    message = Heartbeats(clients={"0": 10, "1": 4}, training={"1": 12.5})
    assert from_wire(*to_wire(message)).training == {"1": 12.5}
    assert from_wire(*to_wire(Heartbeat(client_id="0", training_s=3.0))).training_s == 3.0
    assert from_wire(*to_wire(Heartbeat(client_id="0"))).training_s is None
    bad_heartbeats = (
        ({"a.b": 1.0}, r"training: 'a.b' is not a client id"),
        ({"a": -1.0}, r"training\['a'\]: -1.0 seconds"),
        ({"a": float("nan")}, r"training\['a'\]: nan seconds"),
    )
    for bad, error in bad_heartbeats:
        with pytest.raises(DecodeError, match=error):
            from_wire(envelope_for(Heartbeats), encode({"clients": {}, "training": bad}))
    for bad in (-1.0, float("inf")):
        with pytest.raises(DecodeError, match="training_s"):
            from_wire(envelope_for(Heartbeat), encode({"client_id": "0", "training_s": bad}))
    failed = TrainFailed(client_id="2", task_id="t", error="ValueError: boom")
    assert from_wire(*to_wire(failed)).error == "ValueError: boom"
    with pytest.raises(DecodeError, match="error"):
        from_wire(
            envelope_for(TrainFailed), encode({"client_id": "2", "task_id": "t", "error": "x" * (MAX_ERROR_CHARS + 1)})
        )
