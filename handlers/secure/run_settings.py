"""A run's secure-aggregation settings, as the server and every client compute them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from brokerfl.handlers.secure.protocol import Settings
from brokerfl.handlers.secure.quantise import Quantisation

if TYPE_CHECKING:  # read, never built here: this package stays below the strategies the config checks
    from brokerfl.config import RunConfig


def settings_for(config: RunConfig) -> Settings:
    """k and t resolved for the run's round size (``SecureAggregationConfig.resolved``)."""
    secure = config.secure_aggregation
    if secure is None:
        raise ValueError("the run has no secure_aggregation section")
    k, t = secure.resolved(config.clients_per_round())
    return Settings(
        neighbours=k,
        threshold=t,
        quantisation=Quantisation(secure.clip_range, secure.bits, secure.modulus_bits),
    )
