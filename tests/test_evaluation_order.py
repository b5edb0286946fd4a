"""Evaluation off the critical path: the next round's task is published before the server
evaluates the version it just stored, and the scores are those of the stored versions."""

from __future__ import annotations

import brokerfl.handlers.workflows.server as server_handlers
from brokerfl.assembly.simulate import simulate
from brokerfl.config import load_config
from brokerfl.storage.store import MemoryModelStore
from brokerfl.transports.local import LocalTransport


def test_next_task_goes_out_before_the_stored_version_is_evaluated(monkeypatch):
    events: list[tuple[str, int]] = []
    real_make_state, real_publish = server_handlers.make_state, LocalTransport.publish

    def make_state(config, store, metrics):
        state = real_make_state(config, store, metrics)
        evaluate = state.evaluate

        def watched(parameters):
            events.append(("evaluate", state.store.latest().version))
            return evaluate(parameters)

        state.evaluate = watched
        return state

    def publish(self, exchange, routing_key, envelope, body):
        if routing_key.endswith(".train_task"):
            events.append(("task", int(envelope.headers["round"])))
        return real_publish(self, exchange, routing_key, envelope, body)

    monkeypatch.setattr(server_handlers, "make_state", make_state)
    monkeypatch.setattr(LocalTransport, "publish", publish)
    config = load_config(None, {"rounds": 3, "clients": 3, "train.max_batches": 2})
    store = MemoryModelStore(keep=None)
    result = simulate(config, store=store)

    rounds = [r["round"] for r in result.records]
    assert rounds == [1, 2, 3]
    for version in (1, 2):  # version v is stored at the end of round v; round v+1's task goes out first
        assert events.index(("task", version + 1)) < events.index(("evaluate", version)), events
    # every version evaluated once, in order, and its score is that of the stored parameters
    assert [v for kind, v in events if kind == "evaluate"] == [1, 2, 3]
    fresh = real_make_state(config, MemoryModelStore(), None).evaluate
    for record in result.records:
        model = store.get(record["model_version"])
        scores = fresh(model.parameters)
        assert (record["accuracy"], record["loss"]) == (scores["accuracy"], scores["loss"])
        assert record["sha256"] == model.sha256
