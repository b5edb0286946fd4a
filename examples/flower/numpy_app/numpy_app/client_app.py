"""numpy_app: the ClientApp."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from numpy_app.task import local_update

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Return the received model plus this node's noise for the round."""
    model = msg.content["arrays"].to_numpy_ndarrays()
    partition_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    updated = local_update(model, partition_id, server_round)
    # Every node counts as one example: FedAvg then takes the plain mean.
    metrics = MetricRecord({"update-norm": float(np.sqrt(sum(np.sum(u * u) for u in updated))), "num-examples": 1})
    return Message(RecordDict({"arrays": ArrayRecord(updated), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Report the mean of the received arrays (a deterministic stand-in for a loss)."""
    model = msg.content["arrays"].to_numpy_ndarrays()
    mean = float(np.mean(np.concatenate([m.ravel() for m in model])))
    metrics = MetricRecord({"mean": mean, "num-examples": 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
