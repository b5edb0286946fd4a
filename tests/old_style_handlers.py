"""An ``extra_handlers`` module in the deprecated style: it registers on the client
module's ``table`` at import (tests/test_handler_sets.py checks it still works, with a
DeprecationWarning, and only for the runs that name it)."""

from __future__ import annotations

from brokerfl.handlers.workflows.client import table
from brokerfl.runtime.handler_table import Context, to_server
from brokerfl.wire.message import EvaluateResult, Gradients


@table.on(Gradients)
def answer_gradients_old_style(message: Gradients, ctx: Context):
    return [
        to_server(
            message.reply(
                EvaluateResult,
                client_id=ctx.state.client_id,
                task_id=message.message_id,
                loss=0.0,
                accuracy=1.0,
                num_samples=1,
            )
        )
    ]
