"""A GPT-2-small-sized causal language model for benchmarks/large_model.py: 124.4M
parameters (``transformers.GPT2Config()``, random init: nothing is downloaded), trained
with plain SGD on synthetic token sequences.

The data: every sequence repeats a short random motif of byte tokens (0-255), so a model
can lower its loss by copying; each client's motifs come from its own seed. The model's
vocabulary stays GPT-2's 50,257 (its size is what is benchmarked), the data uses 256 of it.

Options (``OPTIONS``): ``size`` (``124M``: GPT-2 small; ``tiny``: 2 layers of 64, for
tests), ``seq_len``, ``samples`` (sequences per client), ``test_samples`` (the server's),
``motif`` (the repeated motif's length). The run's ``train`` section gives the steps
(``max_batches``), ``batch_size`` and ``lr``. Plain SGD (no momentum): an optimizer with
state (AdamW) would add two models' worth of memory to each client process.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from brokerfl.app import TrainingCancelled, cancellation_requested
from brokerfl.config import TrainConfig

OPTIONS = {"size": "124M", "seq_len": 64, "samples": 16, "test_samples": 2, "motif": 8}
TARGET_METRIC = ("perplexity", "min")
SIZES = {
    "124M": {},  # GPT2Config's defaults are GPT-2 small
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128},
}
BYTE_TOKENS = 256


def check_options(options: dict[str, Any]) -> None:
    if options["size"] not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, not {options['size']!r}")


def model(options: dict[str, Any]) -> nn.Module:
    return GPT2LMHeadModel(GPT2Config(**SIZES[options["size"]]))


def sequences(count: int, options: dict[str, Any], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` sequences of a motif repeated, as (inputs, next tokens)."""
    rng = np.random.default_rng(seed)
    length = options["seq_len"] + 1
    motifs = rng.integers(0, BYTE_TOKENS, size=(count, options["motif"]))
    tokens = np.tile(motifs, (1, -(-length // options["motif"])))[:, :length].astype(np.int64)
    return tokens[:, :-1], tokens[:, 1:]


def load_partition(index: int, num_partitions: int, options: dict[str, Any], seed: int):
    return sequences(options["samples"], options, seed * 1000 + index + 1)


def load_server_test(options: dict[str, Any], seed: int):
    return sequences(options["test_samples"], options, seed * 1000)


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(model: nn.Module, data, settings: TrainConfig, seed: int) -> dict[str, float]:
    """``max_batches`` steps (default: one pass) of plain SGD on the next-token loss."""
    x, y = (torch.as_tensor(a) for a in data)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    steps = settings.max_batches or -(-len(x) // settings.batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr)
    model.train()
    losses = []
    for step in range(steps):
        if cancellation_requested():
            raise TrainingCancelled(f"cancelled after {step} steps")
        rows = order[(step * settings.batch_size) % len(x) :][: settings.batch_size]
        loss = next_token_loss(model, x[rows], y[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"loss": float(np.mean(losses)), "steps": steps}


@torch.no_grad()
def evaluate(model: nn.Module, data) -> dict[str, float]:
    """Mean next-token cross-entropy and its perplexity."""
    x, y = (torch.as_tensor(a) for a in data)
    model.eval()
    loss = float(next_token_loss(model, x, y))
    return {"loss": loss, "perplexity": float(np.exp(loss)), "num_samples": len(x)}
