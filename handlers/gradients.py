"""Worked example: a new message type handled by clients, in one handler.

The server (or an operator's script) sends ``Gradients`` to clients; each client applies
them to the global model it last trained on (one SGD step, ``w - learning_rate * g``),
evaluates the result on its own data and answers with an ``EvaluateResult``. Listing this
built-in in a config's ``extra_handlers`` (``extra_handlers: [gradients]``) is all it takes to switch
it on: the module exports its handler set as ``CLIENT_HANDLERS``, and :mod:`brokerfl.assembly.roles` adds it
to the clients' table of that run only.
"""

from __future__ import annotations

from brokerfl.handlers.strategies.aggregate import BadUpdate, check_update
from brokerfl.handlers.workflows.client import ClientState
from brokerfl.runtime.handler_table import Context, HandlerSet, Rejected, to_server
from brokerfl.wire.message import EvaluateResult, Gradients


def keep_last_global(state: ClientState) -> None:
    """The client keeps the global model it last trained on, which Gradients apply to."""
    state.keep_last_global = True


def apply_gradients(message: Gradients, ctx: Context[ClientState]):
    state = ctx.state
    if state.last_global is None:
        raise Rejected("no global model received yet to apply gradients to")
    try:
        check_update(message.gradients, state.last_global)
    except BadUpdate as exc:
        raise Rejected(f"gradients do not fit the model: {exc}") from None
    stepped = {
        name: value - message.learning_rate * message.gradients[name] for name, value in state.last_global.items()
    }
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


CLIENT_HANDLERS = HandlerSet("gradients", {Gradients: apply_gradients}, needs=(ClientState,), prepare=keep_last_global)
