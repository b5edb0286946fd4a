"""brokerfl: federated learning whose processes talk only through a message broker."""

from brokerfl.codec import DecodeError, EncodeError, Limits
from brokerfl.handler_table import Context, HandlerTable, Outbound, Rejected, Started, to_client, to_clients, to_server
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
    "Context", "DecodeError", "EncodeError", "Envelope", "EvaluateResult", "EvaluateTask", "Exit", "Gradients",
    "HandlerTable", "Heartbeat", "Join", "Leave", "Limits", "Message", "Outbound", "ParameterUpdate", "Rejected", "Started",
    "TrainTask", "to_client", "to_clients", "to_server",
]
