"""The model, the data and the training loop of pytorch_app."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from brokerfl.handlers.datasets import load_dataset, partition


def make_model(num_features: int, num_classes: int) -> nn.Module:
    """784-128-10 on MNIST: about 100k parameters."""
    return nn.Sequential(nn.Linear(num_features, 128), nn.ReLU(), nn.Linear(128, num_classes))


def dataset_shape(name: str) -> tuple[int, int]:
    """(features, classes) of a dataset, to build the model."""
    data = load_dataset(name)
    return data.num_features, data.num_classes


def node_data(name: str, partition_id: int, num_partitions: int, seed: int) -> tuple[TensorDataset, TensorDataset]:
    """This node's IID share of the training split and of the test split."""
    data = load_dataset(name, seed=seed)
    train_rows = partition(data.y_train, num_partitions, "iid", seed=seed)[partition_id]
    test_rows = partition(data.y_test, num_partitions, "iid", seed=seed)[partition_id]
    return (
        TensorDataset(torch.tensor(data.x_train[train_rows]), torch.tensor(data.y_train[train_rows])),
        TensorDataset(torch.tensor(data.x_test[test_rows]), torch.tensor(data.y_test[test_rows])),
    )


def test_data(name: str, seed: int) -> TensorDataset:
    """The whole test split, for the server's central evaluation."""
    data = load_dataset(name, seed=seed)
    # a copy: the cached arrays are read-only, which torch does not support
    return TensorDataset(torch.tensor(data.x_test), torch.tensor(data.y_test))


def train(model: nn.Module, data: TensorDataset, epochs: int, batch_size: int, lr: float, seed: int) -> float:
    """SGD on `data`; the batch order comes from `seed` alone. Returns the mean batch loss."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    total, batches = 0.0, 0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
    return total / max(batches, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset) -> tuple[float, float]:
    """(mean loss, accuracy) on `data`."""
    model.eval()
    x, y = data.tensors
    logits = model(x)
    return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()
