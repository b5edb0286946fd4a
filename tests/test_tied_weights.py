"""Tied weights (a language model's output layer is its input embedding) in the torch adapter
(brokerfl/app/torch_adapter.py): they stay tied when parameters are loaded by assignment
(evaluation's borrowed weights, training's fresh load after it), and the tied weight
travels once, under its first name, compressed as any weight."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from brokerfl.app.torch_adapter import (  # noqa: E402
    TorchModel,
    borrow_named_arrays,
    load_named_arrays,
    structure,
    to_named_arrays,
)
from brokerfl.wire.compression import compressible  # noqa: E402


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 11, bias=False)
        self.head.weight = self.embedding.weight  # as GPT-2 ties lm_head to wte


def received(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's parameters as a decoded message holds them: read-only arrays, the tied
    weight once."""
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


def test_a_tied_weight_travels_once_and_is_compressed() -> None:
    module = TiedLM()
    app = SimpleNamespace(name="tied", module=SimpleNamespace(), options={}, seed=0)
    trainable = TorchModel(app, module).trainable()
    assert list(to_named_arrays(module)) == ["embedding.weight"]  # head.weight is the same tensor
    assert trainable == {"embedding.weight"}
    assert compressible(to_named_arrays(module), trainable) == {"embedding.weight"}
