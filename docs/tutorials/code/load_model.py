"""Load the model `brokerfl simulate` trained and score it on the digits' test split."""

import numpy as np

from brokerfl.app import load_model
from brokerfl.config import load_config
from brokerfl.handlers.datasets import load_dataset

config = load_config(None)  # the embedded default run (or a config file's path)
weights = load_model(config, "runs/default/final_model.npz")
for name, array in weights.items():
    print(name, array.shape)

digits = load_dataset("digits", seed=config.seed)  # the run's split: same seed
hidden = digits.x_test
for layer in ("0", "2"):  # Linear + ReLU, twice
    hidden = np.maximum(hidden @ weights[f"{layer}.weight"].T + weights[f"{layer}.bias"], 0)
logits = hidden @ weights["4.weight"].T + weights["4.bias"]
print(f"test accuracy {np.mean(logits.argmax(axis=1) == digits.y_test):.4f}")
