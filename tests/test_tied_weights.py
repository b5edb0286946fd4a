"""Tied weights (a language model's output layer is its input embedding) stay tied when the
torch adapter loads parameters by assignment: evaluation's borrowed weights and training's
fresh load after it (brokerfl/app/torch_adapter.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from brokerfl.app.torch_adapter import (  # noqa: E402
    borrow_named_arrays,
    load_named_arrays,
    structure,
    to_named_arrays,
)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embedding.weight  # as GPT-2 ties lm_head to wte


def received(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's parameters as a decoded message holds them: read-only arrays, the tied
    weight once under each of its names."""
    arrays = {name: a + 1 for name, a in to_named_arrays(module).items()}
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


@pytest.mark.parametrize(
    "load",
    [borrow_named_arrays, lambda m, p: load_named_arrays(m, p, fresh=True)],
    ids=["borrowed", "fresh"],
)
def test_a_load_by_assignment_keeps_tied_weights_tied(load) -> None:
    module = TiedLM()
    before = structure(module)
    parameters = received(module)
    load(module, parameters)
    assert module.head.weight is module.embedding.weight
    assert structure(module) == before  # else every task after it would get a fresh model()
    np.testing.assert_array_equal(module.head.weight.detach().numpy(), parameters["embedding.weight"])
