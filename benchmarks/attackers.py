"""A client handler set for poisoning benchmarks (never a product handler set): the
clients listed in ``BROKERFL_ATTACKERS`` (default ``0,1``) train honestly, then send the
global model minus ``BROKERFL_ATTACK_SCALE`` (default 10) times their honest delta: a
sign-flipped update scaled by 10. Everyone else is the ordinary client.

    client_handlers: attackers     # with benchmarks/ on sys.path (benchmarks/poisoning.py does it)
"""

from __future__ import annotations

import os

import numpy as np

from brokerfl.message import ParameterUpdate
from handlers.workflows import client
from handlers.workflows.client import make_state  # noqa: F401 - a handler set has table and make_state

ATTACKERS = frozenset(os.environ.get("BROKERFL_ATTACKERS", "0,1").split(","))
SCALE = float(os.environ.get("BROKERFL_ATTACK_SCALE", "10"))

table = client.table.copy()


def sign_flipped(parameters: dict[str, np.ndarray], global_parameters: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """global - scale * (parameters - global)."""
    return {name: (g - scale * (np.asarray(parameters[name], np.float64) - g)).astype(g.dtype) for name, g in global_parameters.items()}


@table.on(client.Trained)
def answer_poisoned(message: client.Trained, ctx):
    training = ctx.state.training
    global_parameters = training.task.parameters if training is not None else {}
    sent = client.answer_task(message, ctx)
    if not sent or ctx.state.client_id not in ATTACKERS:
        return sent
    for outbound in sent:
        if isinstance(outbound.message, ParameterUpdate):
            outbound.message.parameters = sign_flipped(outbound.message.parameters, global_parameters, SCALE)
    return sent
