"""pytorch_app: the ServerApp."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from pytorch_app import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg with central evaluation on the whole test split; save the final arrays."""
    config = context.run_config
    name = str(config["dataset"])
    shape = task.dataset_shape(name)
    test_data = task.test_data(name, int(config["data-seed"]))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model = task.make_model(*shape)
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.evaluate(model, test_data)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    min_nodes = int(config["min-nodes"])
    strategy = FedAvg(min_available_nodes=min_nodes, min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(task.make_model(*shape).state_dict()),
        num_rounds=int(config["num-server-rounds"]),
        train_config=ConfigRecord({"lr": float(config["learning-rate"])}),
        evaluate_fn=central_evaluate,
    )
    np.savez(str(config["final-model"]), *result.arrays.to_numpy_ndarrays())
