"""pytorch_app: the ClientApp."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from pytorch_app import task

app = ClientApp()


def _model_and_data(msg: Message, context: Context):
    name = str(context.run_config["dataset"])
    model = task.make_model(*task.dataset_shape(name))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    train_data, test_data = task.node_data(
        name,
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        int(context.run_config["data-seed"]),
    )
    return model, train_data, test_data


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's share for `local-epochs`."""
    # Several nodes share the machine: one thread each avoids oversubscribing its cores.
    torch.set_num_threads(1)
    model, train_data, _ = _model_and_data(msg, context)
    # The seed depends on the node and the round only, so a rerun trains identically.
    seed = 1000 * int(msg.content["config"]["server-round"]) + int(context.node_config["partition-id"])
    torch.manual_seed(seed)
    loss = task.train(
        model,
        train_data,
        int(context.run_config["local-epochs"]),
        int(context.run_config["batch-size"]),
        float(msg.content["config"]["lr"]),
        seed,
    )
    metrics = MetricRecord({"train-loss": loss, "num-examples": len(train_data)})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the received model on this node's share of the test split."""
    torch.set_num_threads(1)
    model, _, test_data = _model_and_data(msg, context)
    loss, accuracy = task.evaluate(model, test_data)
    metrics = MetricRecord({"eval-loss": loss, "eval-accuracy": accuracy, "num-examples": len(test_data)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
