"""Worked example: a new message type handled by clients, in one handler.

The server (or an operator's script) sends ``Gradients`` to clients; each client applies
them to the global model it last trained on (one SGD step, ``w - learning_rate * g``),
evaluates the result on its own data and answers with an ``EvaluateResult``. Listing this
built-in in a config's ``extra_handlers`` (``extra_handlers: [gradients]``) is all it takes to switch it on.
"""

from __future__ import annotations

from brokerfl.handler_table import Context, Rejected, to_server
from brokerfl.message import EvaluateResult, Gradients
from handlers.strategies.aggregate import BadUpdate, check_update
from handlers.workflows.client import ClientState, table


@table.on(Gradients)
def apply_gradients(message: Gradients, ctx: Context):
    state: ClientState = ctx.state
    if state.last_global is None:
        raise Rejected("no global model received yet to apply gradients to")
    try:
        check_update(message.gradients, state.last_global)
    except BadUpdate as exc:
        raise Rejected(f"gradients do not fit the model: {exc}") from None
    stepped = {name: value - message.learning_rate * message.gradients[name] for name, value in state.last_global.items()}
    scores = state.app.evaluate(stepped, state.data.train)
    result = message.reply(
        EvaluateResult,
        client_id=state.client_id,
        task_id=message.message_id,
        loss=scores["loss"],
        accuracy=scores["accuracy"],
        num_samples=int(scores["num_samples"]),
    )
    return [to_server(result)]
