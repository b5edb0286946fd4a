"""Secure aggregation, a client's side: composed after the client's set when the config
has ``secure_aggregation`` (the server's side and the stages: ``secure_server.py``).

A finished training answers with the client's public keys instead of its update: the
update is quantised, weighted and kept here, in a session
(:class:`brokerfl.handlers.secure.protocol.ClientSession`) with the round's secrets. They
stay in this process's memory, never on the broker: a client restarted mid-round has lost
them and drops out of that round (tolerated). Each later request of the server is answered
by the session's next stage; a request it refuses (out of order, or one that would reveal
both shares of a peer) is logged and not answered.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from brokerfl.handlers.secure import protocol, quantise
from brokerfl.handlers.secure.run_settings import settings_for
from brokerfl.handlers.strategies.base import prepare_update, secure_contribution
from brokerfl.handlers.workflows.client import ClientState, failure_text
from brokerfl.runtime.handler_table import Context, HandlerSet, to_server
from brokerfl.wire.message import (
    Message,
    SecureKeyList,
    SecureKeys,
    SecureMasked,
    SecureReveal,
    SecureShares,
    SecureSharesFor,
    SecureUnmask,
    TrainFailed,
    TrainTask,
)

SESSIONS_KEPT = 2  # a newer round's session replaces older ones (their rounds are over)


def keys_answer(
    state: ClientState, task: TrainTask, parameters: dict[str, np.ndarray], metrics: dict[str, float], seconds: float
) -> Message:
    """A finished training's answer: stage 1, the session's public keys. The update is
    kept, quantised and weighted, in the session. An update that cannot be quantised (NaN
    or infinite values, a weight too large for the modulus) is a failed training: the server
    hears it at once instead of waiting for keys until the round's deadline."""
    config = state.config
    parameters = prepare_update(config, state.client_id, task.round, task.parameters, parameters)  # local DP
    delta, weight = secure_contribution(config, task.parameters, parameters, int(metrics["num_samples"]))
    settings = settings_for(config)
    try:
        vector, _ = quantise.encode(delta, weight, settings.quantisation)
    except quantise.QuantiseError as exc:
        error = failure_text(ValueError(f"its update cannot be quantised for secure aggregation: {exc}"))
        return task.reply(TrainFailed, client_id=state.client_id, task_id=task.message_id, error=error)
    session = protocol.ClientSession(state.client_id, task.message_id, settings, vector)
    for old in list(state.secure)[: max(0, len(state.secure) - SESSIONS_KEPT + 1)]:
        del state.secure[old]
    state.secure[task.message_id] = session
    c_pk, s_pk, commitment = session.advertise()
    return task.reply(
        SecureKeys,
        client_id=state.client_id,
        session=task.message_id,
        c_pk=c_pk,
        s_pk=s_pk,
        seed_commitment=commitment,
        train_s=seconds,
    )


def _session(message: Any, ctx: Context[ClientState]) -> protocol.ClientSession | None:
    session = ctx.state.secure.get(message.session)
    if session is None:
        ctx.log.info(
            "secure aggregation request of a session this client does not hold; not answered",
            type=message.TYPE,
            round=message.round,
        )
    return session


def _refused(ctx: Context[ClientState], message: Message, exc: protocol.ProtocolError) -> None:
    ctx.log.error(
        "secure aggregation request refused; not answered", type=message.TYPE, round=message.round, reason=str(exc)
    )


def share_keys(message: SecureKeyList, ctx: Context[ClientState]):
    state = ctx.state
    if state.client_id not in message.keys or (session := _session(message, ctx)) is None:
        return None
    try:
        keys = {cid: _three(value) for cid, value in message.keys.items()}
        ciphertexts = session.share_keys(keys)
    except protocol.ProtocolError as exc:
        return _refused(ctx, message, exc)
    return [
        to_server(
            message.reply(SecureShares, client_id=state.client_id, session=message.session, ciphertexts=ciphertexts)
        )
    ]


def mask(message: SecureSharesFor, ctx: Context[ClientState]):
    state = ctx.state
    if message.client_id != state.client_id or (session := _session(message, ctx)) is None:
        return None
    try:
        vector = session.mask(message.ciphertexts)
    except protocol.ProtocolError as exc:
        return _refused(ctx, message, exc)
    return [to_server(message.reply(SecureMasked, client_id=state.client_id, session=message.session, vector=vector))]


def reveal(message: SecureUnmask, ctx: Context[ClientState]):
    state = ctx.state
    if state.client_id not in message.masked or (session := _session(message, ctx)) is None:
        return None  # it dropped out of the round: nothing of it is in the sum
    # the request names the whole round; this client answers for its neighbourhood
    near = {*session.neighbours, state.client_id}
    try:
        seed_shares, key_shares = session.reveal(
            [c for c in message.masked if c in near], [c for c in message.dropped if c in near]
        )
    except protocol.ProtocolError as exc:
        return _refused(ctx, message, exc)
    return [
        to_server(
            message.reply(
                SecureReveal,
                client_id=state.client_id,
                session=message.session,
                seed_shares=seed_shares,
                key_shares=key_shares,
            )
        )
    ]


def _three(value: list[bytes]) -> tuple[bytes, bytes, bytes]:
    if len(value) != 3 or not all(isinstance(v, bytes) for v in value):
        raise protocol.ProtocolError("a client's keys are not [c_pk, s_pk, seed commitment]")
    return value[0], value[1], value[2]


def _answer_with_keys(state: ClientState) -> None:
    state.make_answer = keys_answer


CLIENT = HandlerSet(
    "secure aggregation (client)",
    {SecureKeyList: share_keys, SecureSharesFor: mask, SecureUnmask: reveal},
    needs=(ClientState,),
    prepare=_answer_with_keys,
)
