"""Flower apps on brokerfl, through Flower's own interfaces.

A Flower ``ServerApp`` drives a :class:`~brokerfl.flower.grid.BrokerGrid` (Flower's ``Grid``
over brokerfl's worker and transport), and each node calls the ``ClientApp`` with a Flower
``Message`` and the node's ``Context`` (:mod:`brokerfl.flower.node`). What they exchange
travels as :class:`~brokerfl.wire.message.FlowerRequest` and
:class:`~brokerfl.wire.message.FlowerReply` (records as :mod:`brokerfl.flower.records` lays
them out), through the run's queues and journal like every brokerfl message. The handler
sets are ``handlers/workflows/flower_server.py`` and ``flower_client.py``.

``flwr`` is an optional dependency (the ``flower`` extra); nothing here imports it at
module level.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from typing import Any

# Decision: the Flower releases whose interfaces this integration was built and
# contract-tested against (tests/test_flower_contract.py); others are refused, with this
# range, before a run starts, rather than failing somewhere inside the app.
SUPPORTED_FLWR = ((1, 40), (1, 43))  # from 1.40 (inclusive) to 1.43 (exclusive)


class FlowerUnavailable(ValueError):
    """flwr is not installed, or not a supported version."""


def supported_range() -> str:
    (lo_major, lo_minor), (hi_major, hi_minor) = SUPPORTED_FLWR
    return f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def check_flwr() -> str:
    """The installed flwr's version; :class:`FlowerUnavailable` if it is missing or outside
    :data:`SUPPORTED_FLWR`."""
    try:
        version = metadata.version("flwr")
    except metadata.PackageNotFoundError:
        raise FlowerUnavailable(f"a Flower app needs flwr{supported_range()}: pip install 'brokerfl[flower]'") from None
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = (0, 0)
    low, high = SUPPORTED_FLWR
    if not low <= major_minor < high:
        raise FlowerUnavailable(f"flwr {version} is installed; brokerfl runs Flower apps with flwr{supported_range()}")
    return version


def flower_message(metadata: Any, *, content: Any = None, error: Any = None) -> Any:
    """A Flower ``Message`` made from its metadata, as Flower's own grids and SuperNode make
    the messages they deliver (``Message(metadata=...)``, outside its typed overloads; pinned
    by the contract tests)."""
    from flwr.app import Message

    return Message(metadata=metadata, content=content, error=error)  # type: ignore[call-overload]


def _number(*words: str) -> int:
    """A stable positive 63-bit number from words (Flower's ids are uint64; a signed one
    must hold them too)."""
    digest = hashlib.sha256("\0".join(words).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1) or 1


def run_id_of(run: str) -> int:
    """The Flower run id of brokerfl run ``run``."""
    return _number("run", run)


def node_id_of(run: str, client_id: str) -> int:
    """The Flower node id of a client: the same for a client id on every start."""
    return _number("node", run, client_id)
