"""A test app whose model is a frozen random base and a small trained adapter: only the
adapter travels (``exchanged``). Points in the plane, two classes; options pick what goes
wrong (``tamper_base``: train() also changes the base; ``base_width``: another base)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

OPTIONS = {"base_width": 32, "tamper_base": False, "samples": 60}


class AdaptedNet(nn.Module):
    """A frozen random feature map (the base) and a trained linear head with a low-rank
    correction (the adapter: head and correction travel)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.base = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.base.requires_grad_(False)
        self.head = nn.Linear(width, 2)
        self.lora_a = nn.Parameter(torch.zeros(width, 2))
        self.lora_b = nn.Parameter(torch.randn(2, 2) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.base(x)
        return self.head(features) + features @ self.lora_a @ self.lora_b


def model(options: dict[str, Any]) -> nn.Module:
    return AdaptedNet(options["base_width"])


def exchanged(model: nn.Module, options: dict[str, Any]) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def points(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, 2)).astype(np.float32)
    return x, ((x[:, 0] + 0.5 * x[:, 1]) > 0).astype(np.int64)


def load_partition(index: int, num_partitions: int, options: dict[str, Any], seed: int):
    return points(1000 + index, options["samples"])


def load_server_test(options: dict[str, Any], seed: int):
    return points(7, 200)


def train(model: nn.Module, data, settings, seed: int, options: dict[str, Any]) -> dict[str, float]:
    from brokerfl.app.torch_adapter import train_classifier

    metrics = train_classifier(model, data, settings, seed)
    if options["tamper_base"]:
        with torch.no_grad():
            model.base[0].bias.add_(1.0)
    return metrics
