"""Clients that leave a secure round at a chosen stage, for tests (an ``extra_handlers``
module). ``BROKERFL_TEST_GONE_BEFORE_MASKED`` names clients (comma-separated) that leave
once they have sent their shares, before their masked vector; ``..._AFTER_MASKED`` those
that leave once they have sent it, before revealing anything. An entry ``7@2`` leaves in
round 2 only. They leave by going silent, or with ``BROKERFL_TEST_GONE_BY_KILL=1`` by a
kill -9 of their own process at that point (over RabbitMQ, one process per client)."""

from __future__ import annotations

import os
import signal

from brokerfl.handlers.workflows import secure_client
from brokerfl.runtime.handler_table import HandlerSet
from brokerfl.wire.message import SecureSharesFor, SecureUnmask

BEFORE_MASKED = "BROKERFL_TEST_GONE_BEFORE_MASKED"
AFTER_MASKED = "BROKERFL_TEST_GONE_AFTER_MASKED"
BY_KILL = "BROKERFL_TEST_GONE_BY_KILL"


def _gone_at(handler, variable: str):
    def stage(message, ctx):
        named = os.environ.get(variable, "").split(",")
        if ctx.state.client_id in named or f"{ctx.state.client_id}@{message.round}" in named:
            if os.environ.get(BY_KILL) == "1":
                os.kill(os.getpid(), signal.SIGKILL)
            return None
        return handler(message, ctx)

    return stage


CLIENT_HANDLERS = HandlerSet(
    "clients that leave a secure round",
    overrides={
        SecureSharesFor: _gone_at(secure_client.mask, BEFORE_MASKED),
        SecureUnmask: _gone_at(secure_client.reveal, AFTER_MASKED),
    },
)
