"""The same deterministic update for both modes; the mods are Flower's own."""

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod


def _update(arrays, partition: int, server_round: int):
    rng = np.random.default_rng([partition, server_round])
    return [(a + rng.normal(size=a.shape)).astype(a.dtype) for a in arrays]


class SecAggClient(NumPyClient):
    def __init__(self, partition: int) -> None:
        self.partition = partition

    def fit(self, parameters, config):
        return _update(parameters, self.partition, int(config.get("server_round", 0))), self.partition + 1, {}


def client_fn(context: Context):
    return SecAggClient(context.node_config["partition-id"]).to_client()


dp = ClientApp(mods=[fixedclipping_mod])
secagg = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
plain = ClientApp(client_fn=client_fn)


@dp.train()
def train(msg: Message, context: Context) -> Message:
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    updated = _update(arrays, context.node_config["partition-id"], msg.content["config"]["server-round"])
    metrics = MetricRecord({"num-examples": context.node_config["partition-id"] + 1})
    return Message(RecordDict({"arrays": ArrayRecord(updated), "metrics": metrics}), reply_to=msg)


class ByMode(ClientApp):
    """The run config's mode says which ClientApp handles the message."""

    def __call__(self, message: Message, context: Context) -> Message:
        return {"dp": dp, "secagg": secagg, "plain": plain}[context.run_config["mode"]](message, context)


app = ByMode()
