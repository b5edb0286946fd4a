"""brokerfl: federated learning whose processes talk only through a message broker.

The package's folders are its layers, bottom to top: ``wire`` (what travels), ``transports``
(the broker), ``config`` (the run's config), ``runtime`` (one process), ``storage`` (models and
audit), ``app`` (the app API), ``handlers`` (workflows and strategies), ``assembly`` (a process
built from a config), ``ops`` (operator tools), ``cli`` (the command). docs/concepts/layers.md
has the map; the import contract in pyproject.toml enforces it.
"""

from brokerfl import _moved
from brokerfl.runtime.handler_table import (
    Context,
    DuplicateHandler,
    HandlerSet,
    HandlerTable,
    Outbound,
    Rejected,
    Started,
    compose,
    to_client,
    to_clients,
    to_server,
)
from brokerfl.wire.codec import DecodeError, EncodeError, Limits
from brokerfl.wire.message import (
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

_moved.install()  # old module paths (brokerfl.message, ...) keep working, with a DeprecationWarning

__all__ = [
    "Context",
    "DecodeError",
    "DuplicateHandler",
    "EncodeError",
    "Envelope",
    "EvaluateResult",
    "EvaluateTask",
    "Exit",
    "Gradients",
    "HandlerSet",
    "HandlerTable",
    "Heartbeat",
    "Join",
    "Leave",
    "Limits",
    "Message",
    "Outbound",
    "ParameterUpdate",
    "Rejected",
    "Started",
    "TrainTask",
    "compose",
    "to_client",
    "to_clients",
    "to_server",
]
