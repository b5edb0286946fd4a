"""numpy_app: the ServerApp."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from numpy_app.task import initial_model

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run FedAvg for `num-server-rounds` and save the final arrays."""
    config = context.run_config
    min_nodes = int(config["min-nodes"])
    strategy = FedAvg(min_available_nodes=min_nodes, min_train_nodes=min_nodes, min_evaluate_nodes=min_nodes)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(initial_model()), num_rounds=int(config["num-server-rounds"])
    )
    np.savez(str(config["final-model"]), *result.arrays.to_numpy_ndarrays())
