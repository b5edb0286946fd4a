import numpy as np
from sklearn.datasets import load_iris
from torch import nn


def model(options):
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def load_partition(index, num_partitions, options, seed):
    x, y = load_iris(return_X_y=True)
    rows = np.random.default_rng(seed).permutation(len(y))[index::num_partitions]
    return (x[rows] / x.max(axis=0)).astype(np.float32), y[rows]
