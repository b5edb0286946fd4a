"""A numpy app for the dashboard's tests (``app: tests.dashboard_app``): each round takes
``train_s`` seconds (idle, as a GPU wait would be), and its accuracy rises and its loss falls
with the rounds, so the page has a curve to draw."""

from __future__ import annotations

import math
import time

import numpy as np


def model(options):
    return {"w": np.zeros(4, np.float32)}


def load_partition(index, num_partitions, options, seed):
    return np.full((10, 4), float(index), np.float32), np.zeros(10, np.float32)


def load_server_test(options, seed):
    return np.zeros((10, 4), np.float32), np.zeros(10, np.float32)


def train(parameters, data, settings, seed, options):
    time.sleep(float(options.get("train_s", 0.0)))
    return {k: v + 0.1 for k, v in parameters.items()}, {"loss": _loss(parameters)}


def evaluate(parameters, data, options):
    loss = _loss(parameters)
    return {"loss": loss, "accuracy": 1.0 - loss}


def _loss(parameters) -> float:
    return math.exp(-3.0 * float(np.mean(parameters["w"])))
