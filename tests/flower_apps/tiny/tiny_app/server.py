"""The ServerApp: Flower's FedAvg for some rounds, the final arrays saved if asked."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    arrays = ArrayRecord([np.zeros((3, 4), dtype=np.float32), np.arange(5, dtype=np.float64)])
    strategy = FedAvg(fraction_evaluate=context.run_config["fraction-evaluate"])
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=context.run_config["num-server-rounds"])
    if context.run_config["final-model"]:
        np.savez(context.run_config["final-model"], *result.arrays.to_numpy_ndarrays())
