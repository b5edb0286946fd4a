"""The ClientApp: a deterministic "training" step per (partition, round); it counts the
requests it handled in its context.state."""

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _count(context: Context) -> int:
    seen = context.state.get("seen", MetricRecord({"count": 0}))
    count = int(seen["count"]) + 1
    context.state["seen"] = MetricRecord({"count": count})
    return count


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition = context.node_config["partition-id"]
    server_round = msg.content["config"]["server-round"]
    if context.run_config["fail-on"] == f"{partition}:{server_round}":
        raise RuntimeError(f"partition {partition} fails in round {server_round}")
    time.sleep(context.run_config["slow-s"])
    rng = np.random.default_rng([partition, server_round])
    arrays = [a + rng.normal(size=a.shape).astype(a.dtype) for a in msg.content["arrays"].to_numpy_ndarrays()]
    metrics = MetricRecord({"num-examples": partition + 1, "train_loss": float(rng.random()), "seen": _count(context)})
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    partition = context.node_config["partition-id"]
    total = sum(float(a.sum()) for a in msg.content["arrays"].to_numpy_ndarrays())
    metrics = MetricRecord({"num-examples": partition + 1, "eval_total": total, "seen": _count(context)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
