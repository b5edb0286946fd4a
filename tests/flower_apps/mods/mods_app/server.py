"""dp: FedAvg wrapped in Flower's DifferentialPrivacyClientSideFixedClipping. secagg:
Flower's legacy FedAvg driven by DefaultWorkflow with a SecAggPlusWorkflow fit stage;
plain: the same without it (what secagg's sum is compared with)."""

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = context.run_config["num-server-rounds"]
    initial = [np.zeros((2, 3), dtype=np.float32), np.zeros(4, dtype=np.float32)]
    if context.run_config["mode"] == "dp":
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

        nodes = len(list(grid.get_node_ids()))
        strategy = DifferentialPrivacyClientSideFixedClipping(
            FedAvg(fraction_evaluate=0.0), noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=nodes
        )
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds)
        return
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    nodes = len(list(grid.get_node_ids()))
    final = context.run_config["final-model"]
    strategy = LegacyFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters(initial),
    )
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
    secure = context.run_config["mode"] == "secagg"
    fit = SecAggPlusWorkflow(num_shares=nodes, reconstruction_threshold=2) if secure else None
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
    if final:
        from flwr.server.workflow.constant import MAIN_PARAMS_RECORD

        np.savez(final, *legacy.state.array_records[MAIN_PARAMS_RECORD].to_numpy_ndarrays())
