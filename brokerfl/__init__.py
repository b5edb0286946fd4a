"""brokerfl: federated learning whose processes talk only through a message broker."""

from brokerfl.codec import DecodeError, EncodeError, Limits
from brokerfl.handler_table import Context, DuplicateHandler, HandlerSet, HandlerTable, Outbound, Rejected, Started, compose, to_client, to_clients, to_server
from brokerfl.message import (
    Envelope,
    EvaluateResult,
    EvaluateTask,
    Exit,
    Gradients,
    Heartbeat,
    Join,
    Leave,
    Message,
    ParameterUpdate,
    TrainTask,
)

__all__ = [
    "Context", "DecodeError", "DuplicateHandler", "EncodeError", "Envelope", "EvaluateResult", "EvaluateTask", "Exit", "Gradients",
    "HandlerSet", "HandlerTable", "Heartbeat", "Join", "Leave", "Limits", "Message", "Outbound", "ParameterUpdate", "Rejected", "Started",
    "TrainTask", "compose", "to_client", "to_clients", "to_server",
]
