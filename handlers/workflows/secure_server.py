"""Secure aggregation, the server's side: a synchronous round in four stages, composed
after the rounds' set (``handlers/workflows/server.py``) when the config has
``secure_aggregation`` (the arithmetic is :mod:`brokerfl.handlers.secure`).

The TrainTask is stage 1's request. A client that trained answers with its public keys
(:class:`SecureKeys`) instead of its update, which never leaves it in the clear. Then:

1. keys -> :class:`SecureKeyList` to every client: each computes the neighbour graph;
2. :class:`SecureShares` (one ciphertext per neighbour) -> :class:`SecureSharesFor`, to
   each client the ciphertexts addressed to it;
3. :class:`SecureMasked` (the update, quantised and masked) -> :class:`SecureUnmask`: who
   sent a vector, who dropped out after sharing;
4. :class:`SecureReveal` (shares that remove the masks of the sum) -> the server rebuilds
   the masks, takes them off the sum of the vectors, and the strategy folds that sum
   (:meth:`~brokerfl.handlers.strategies.base.Strategy.fold_sum`); the version is stored as
   any round's.

Each stage ends when every client still in the round has answered, or at its deadline
(stage 1: the round's; the others: ``stage_timeout_s``) with those that did. A client
that drops out is tolerated while every secret the sum needs keeps ``threshold`` holders;
else the round is dropped with the reason (then retried or the run stops, as a round with
too few answers). A masked vector is the round's update: it is held unacked until the
round's end, and the version lists it, or an UpdateDropped record says why not. The other
stage messages are acked as they are taken: they are in the journal, and held, a round's
stages would hold four messages per client against the server's prefetch. The
:class:`SecureRound` record says who dropped out at which stage.

Decision: a restarted server does not resume a secure round half way (its stage state is
in memory and the clients' secrets are theirs): the round starts again, and the messages
of the old one are dropped as another session's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from brokerfl.handlers.secure import protocol, quantise
from brokerfl.handlers.secure.crypto import CryptoError, check_public_key
from brokerfl.handlers.secure.run_settings import settings_for
from brokerfl.handlers.workflows.server_state import (
    RoundComplete,
    RoundDeadline,
    ServerState,
    close_round,
    close_when_every_participant_answered,
    outside_federation,
    record_drop,
    refresh_client,
    too_few_answers,
)
from brokerfl.runtime.handler_table import Context, HandlerSet, Outbound, Rejected, to_client, to_clients
from brokerfl.runtime.timing import timings
from brokerfl.transports.topology import AUDIT
from brokerfl.wire.message import (
    Message,
    ParameterUpdate,
    SecureKeyList,
    SecureKeys,
    SecureMasked,
    SecureReveal,
    SecureRound,
    SecureShares,
    SecureSharesFor,
    SecureUnmask,
)

STAGE = "secure"  # the stage deadline's timer
STAGE_NAMES = {1: "stage 1 (keys)", 2: "stage 2 (shares)", 3: "stage 3 (masked vector)", 4: "stage 4 (unmasking)"}


@dataclass(kw_only=True)
class SecureStageEnd(Message):
    """A stage's end: every client still in the round answered, or its deadline passed."""

    LOCAL = True

    session: str
    stage: int


@dataclass
class SecureRoundState:
    """The open secure round's stages: who answered each, and what they sent."""

    session: str
    settings: protocol.Settings
    stage: int = 1
    keys: dict[str, tuple[bytes, bytes, bytes]] = field(default_factory=dict)  # U1
    graph: dict[str, tuple[str, ...]] = field(default_factory=dict)
    shares: dict[str, dict[str, bytes]] = field(default_factory=dict)  # U2: sender -> receiver -> ciphertext
    masked_ids: dict[str, str] = field(default_factory=dict)  # U3: client -> its SecureMasked's id
    total: np.ndarray | None = None  # the sum of U3's masked vectors (uint64), not each one
    revealed: dict[str, tuple[dict[str, bytes], dict[str, bytes]]] = field(default_factory=dict)  # U4
    dropouts: dict[str, str] = field(default_factory=dict)  # client -> "stage N: why"

    def status(self) -> dict:
        """For ``brokerfl status``: the stage, who it still waits for, who dropped out."""
        return {
            "stage": STAGE_NAMES[self.stage],
            "waiting": self.missing() if self.stage > 1 else [],
            "dropouts": sorted(self.dropouts),
        }

    def answers(self, stage: int) -> dict:
        """The answers to ``stage`` taken so far, by client."""
        return {1: self.keys, 2: self.shares, 3: self.masked_ids, 4: self.revealed}[stage]

    def in_stage(self) -> list[str]:
        """Who this stage waits for: the clients that answered the one before (stage 1's
        are the round's participants, which the rounds' state holds)."""
        return sorted(self.answers(self.stage - 1)) if self.stage > 1 else []

    def missing(self) -> list[str]:
        """Who this stage still waits for."""
        answered = self.answers(self.stage)
        return [c for c in self.in_stage() if c not in answered]


def _round_of(ctx: Context[ServerState]) -> SecureRoundState | None:
    """The open round's secure state, made at its first stage message."""
    state = ctx.state
    if not state.round_open or not state.session:
        return None
    if state.secure is None or state.secure.session != state.session:
        state.secure = SecureRoundState(session=state.session, settings=settings_for(state.config))
    return state.secure


def _why_not_take(message: Message, ctx: Context[ServerState], stage: int) -> str | None:
    """Why a stage message is not this round's (None: it is, and its sender is awaited)."""
    state = ctx.state
    client_id: str = message.client_id  # type: ignore[attr-defined]
    if (outsider := outside_federation(state, client_id)) is not None:
        return outsider
    if state.done:
        return "late: the run is finished"
    secure = _round_of(ctx)
    session: str = message.session  # type: ignore[attr-defined]
    if secure is None or session != secure.session:
        return f"another session: {message.TYPE} of round {message.round}'s task {session[:12]!r}, not the open round's"
    if secure.stage != stage:
        return f"late: {STAGE_NAMES[stage]} of round {state.round} is over"
    if stage == 1:
        if client_id not in state.participants:
            return f"client {client_id} was not sampled for round {state.round}"
        if client_id in state.answered or client_id in state.failed:
            return f"client {client_id} already answered round {state.round}"
        return None
    if client_id not in secure.in_stage():
        return f"client {client_id} is not in {STAGE_NAMES[stage]} of round {state.round}"
    if client_id in secure.answers(stage):
        return f"client {client_id} already answered {STAGE_NAMES[stage]}"
    return None


def _not_taken(ctx: Context[ServerState], message: Message, why: str) -> list[Outbound]:
    """Ack a stage message that is not this round's. A masked vector is an update: its drop
    is recorded. The others carry no update."""
    if isinstance(message, SecureMasked):
        return record_drop(
            ctx, message.message_id, message.client_id, why, round_=message.round, model_version=message.model_version
        )
    ctx.log.info("secure aggregation message not taken", type=message.TYPE, client=message.client_id, reason=why)  # type: ignore[attr-defined]
    return []


def _end_stage_when_all_answered(ctx: Context[ServerState], secure: SecureRoundState) -> None:
    if not secure.missing():
        ctx.set_timer(STAGE, 0.0, SecureStageEnd(session=secure.session, stage=secure.stage, round=ctx.state.round))


def refuse_plain_update(update: ParameterUpdate, ctx: Context[ServerState]):
    """Under secure aggregation an update in the clear is not taken (whoever sent it)."""
    return record_drop(
        ctx,
        update.message_id,
        update.client_id,
        "secure aggregation: the run takes masked updates only, not parameters in the clear",
        round_=update.round,
        model_version=update.model_version,
    )


def take_keys(message: SecureKeys, ctx: Context[ServerState]):
    state = ctx.state
    refresh_client(state, message.client_id)
    if (why := _why_not_take(message, ctx, 1)) is not None:
        return _not_taken(ctx, message, why)
    try:
        check_public_key(message.c_pk)
        check_public_key(message.s_pk)
    except CryptoError as exc:
        raise Rejected(f"secure keys of client {message.client_id}: {exc}") from None
    if len(message.seed_commitment) != 32:
        raise Rejected(f"secure keys of client {message.client_id}: the seed commitment is not 32 bytes")
    secure = state.secure
    secure.keys[message.client_id] = (message.c_pk, message.s_pk, message.seed_commitment)
    state.answered.add(message.client_id)
    if math.isfinite(message.train_s) and message.train_s >= 0:  # no secret: the server sees when the keys come
        state.client_seconds.append(message.train_s)
    close_when_every_participant_answered(ctx)  # then RoundComplete ends stage 1
    return None


def end_training(message: RoundComplete | RoundDeadline, ctx: Context[ServerState]):
    """Stage 1 ends with the round's training: every participant answered, or the round's
    deadline passed."""
    state = ctx.state
    if not state.round_open or message.round != state.round:
        return None
    secure = _round_of(ctx)
    if secure is None or secure.stage != 1:
        return None  # later stages have their own deadline
    ctx.cancel_timer("round")
    for client_id in state.participants:
        if client_id not in secure.keys:
            why = "its training failed" if client_id in state.failed else "no keys by the round's deadline"
            secure.dropouts[client_id] = f"{STAGE_NAMES[1]}: {why}"
    ids = sorted(secure.keys)
    if (short := _too_few(state, secure, len(ids))) is not None:
        return _drop_round(ctx, secure, f"{STAGE_NAMES[1]}: {short}")
    secure.graph = protocol.graph(ids, secure.session, secure.settings.neighbours)
    keys = {cid: list(three) for cid, three in secure.keys.items()}
    return _next_stage(ctx, secure, [to_clients(_reply(state, SecureKeyList, session=secure.session, keys=keys))])


def take_shares(message: SecureShares, ctx: Context[ServerState]):
    refresh_client(ctx.state, message.client_id)
    if (why := _why_not_take(message, ctx, 2)) is not None:
        return _not_taken(ctx, message, why)
    secure = ctx.state.secure
    neighbours = set(secure.graph[message.client_id])
    if set(message.ciphertexts) != neighbours:
        raise Rejected(
            f"secure shares of client {message.client_id}: addressed to {sorted(message.ciphertexts)[:10]}, not to "
            f"its {len(neighbours)} neighbours"
        )
    secure.shares[message.client_id] = dict(message.ciphertexts)
    _end_stage_when_all_answered(ctx, secure)
    return None


def take_masked(message: SecureMasked, ctx: Context[ServerState]):
    refresh_client(ctx.state, message.client_id)
    if (why := _why_not_take(message, ctx, 3)) is not None:
        return _not_taken(ctx, message, why)
    state = ctx.state
    secure = state.secure
    expected = quantise.vector_length(state.model.parameters)
    vector = message.vector
    if vector.dtype != np.uint64 or vector.ndim != 1 or vector.size != expected:
        # answered, with nothing usable: it is a dropout of this stage
        secure.dropouts[message.client_id] = f"{STAGE_NAMES[3]}: its vector was refused"
        raise Rejected(
            f"masked vector of client {message.client_id}: {vector.dtype}{list(vector.shape)}, "
            f"expected uint64[{expected}]"
        )
    secure.total = protocol.add_masked(secure.total, vector)
    secure.masked_ids[message.client_id] = message.message_id
    state.update_bytes += vector.nbytes  # the round's update, as it travelled: masked
    # held as a folded update is: an abort records its drop, status counts it
    state.folded[message.message_id] = message.client_id
    ctx.hold()
    _end_stage_when_all_answered(ctx, secure)
    return None


def take_reveal(message: SecureReveal, ctx: Context[ServerState]):
    refresh_client(ctx.state, message.client_id)
    if (why := _why_not_take(message, ctx, 4)) is not None:
        return _not_taken(ctx, message, why)
    secure = ctx.state.secure
    holds = set(secure.graph[message.client_id]) | {message.client_id}
    wrong = (set(message.seed_shares) - (holds & set(secure.masked_ids))) | (
        set(message.key_shares) - (holds & (set(secure.shares) - set(secure.masked_ids)))
    )
    if wrong:
        raise Rejected(
            f"secure reveal of client {message.client_id}: shares it was not asked for: {sorted(wrong)[:10]}"
        )
    secure.revealed[message.client_id] = (dict(message.seed_shares), dict(message.key_shares))
    _end_stage_when_all_answered(ctx, secure)
    return None


def end_stage(message: SecureStageEnd, ctx: Context[ServerState]):
    state = ctx.state
    secure = state.secure
    if not state.round_open or secure is None or message.session != secure.session or message.stage != secure.stage:
        return None
    missing = secure.missing()
    for client_id in missing:
        secure.dropouts.setdefault(client_id, f"{STAGE_NAMES[secure.stage]}: no answer within stage_timeout_s")
    if missing:
        ctx.log.warning(
            "secure round: a stage ended without every answer", stage=STAGE_NAMES[secure.stage], missing=missing
        )
    if secure.stage == 2:
        if (short := _too_few(state, secure, len(secure.shares))) is not None:
            return _drop_round(ctx, secure, f"{STAGE_NAMES[2]}: {short}")
        out = []
        for receiver in sorted(secure.shares):
            ciphertexts = {
                sender: shares[receiver] for sender, shares in sorted(secure.shares.items()) if receiver in shares
            }
            out.append(
                to_client(
                    receiver,
                    _reply(state, SecureSharesFor, client_id=receiver, session=secure.session, ciphertexts=ciphertexts),
                )
            )
        return _next_stage(ctx, secure, out)
    if secure.stage == 3:
        if (short := _too_few(state, secure, len(secure.masked_ids))) is not None:
            return _drop_round(ctx, secure, f"{STAGE_NAMES[3]}: {short}")
        dropped = sorted(set(secure.shares) - set(secure.masked_ids))
        request = _reply(state, SecureUnmask, session=secure.session, masked=sorted(secure.masked_ids), dropped=dropped)
        return _next_stage(ctx, secure, [to_clients(request)])
    return _unmask(ctx, secure)


def _unmask(ctx: Context[ServerState], secure: SecureRoundState):
    state = ctx.state
    try:
        assert secure.total is not None  # stage 4 begins with at least one vector
        with timings.phase("unmask"):
            total = protocol.unmask_sum(
                session=secure.session,
                settings=secure.settings,
                keys=secure.keys,
                shared=set(secure.shares),
                masked=set(secure.masked_ids),
                total=secure.total,
                revealed=secure.revealed,
            )
        delta_sum, weight, clipped = quantise.decode_sum(total, state.model.parameters, secure.settings.quantisation)
    except (protocol.ProtocolError, quantise.QuantiseError) as exc:
        return _drop_round(ctx, secure, f"{STAGE_NAMES[4]}: {exc}")
    if (claimed := _declared_samples(state, secure)) is not None and weight > claimed:
        # no update's weight can be checked, but their total can: a client inflating its own
        # weight (its sample count) to outweigh the others shows here
        return _drop_round(
            ctx,
            secure,
            f"{STAGE_NAMES[4]}: the weights sum to {weight}, more than the {claimed} samples the round's clients "
            "declared",
        )
    if clipped:
        ctx.log.warning(
            "secure aggregation: clients clipped coordinates of their deltas to the quantisation range; raise "
            "secure_aggregation.clip_range if this recurs",
            clipped=clipped,
            clip_range=secure.settings.quantisation.clip_range,
        )
    state.strategy.fold_sum(delta_sum, float(weight), len(secure.masked_ids))
    state.folded = {secure.masked_ids[cid]: cid for cid in sorted(secure.masked_ids)}
    # journaled before the version's record (which closing may send at once, the last
    # round's): replay finds the round's participants before the version that needs them
    ctx.send(*_record(state, secure, version=state.model.version + 1, clipped=clipped))
    ctx.cancel_timer(STAGE)
    state.secure = None
    return close_round(ctx)


def _declared_samples(state: ServerState, secure: SecureRoundState) -> int | None:
    """What the masked vectors' clients declared they hold (Join, heartbeats), in all; None if
    one did not say."""
    declared = [state.clients[c].num_samples if c in state.clients else None for c in secure.masked_ids]
    return None if None in declared else sum(max(1, n) for n in declared)  # a weight is at least 1


def _too_few(state: ServerState, secure: SecureRoundState, answered: int) -> str | None:
    need = max(state.config.strategy.min_clients, secure.settings.threshold, 3)
    if answered >= need:
        return None
    return (
        f"{answered} clients answered, fewer than the {need} a secure round needs (min_clients "
        f"{state.config.strategy.min_clients}, threshold {secure.settings.threshold}, and 3)"
    )


def _next_stage(ctx: Context[ServerState], secure: SecureRoundState, out: list[Outbound]) -> list[Outbound]:
    secure.stage += 1
    timeout = ctx.state.config.secure_aggregation.stage_timeout_s
    ctx.set_timer(STAGE, timeout, SecureStageEnd(session=secure.session, stage=secure.stage, round=ctx.state.round))
    ctx.log.debug("secure round: next stage", stage=STAGE_NAMES[secure.stage], clients=len(secure.in_stage()))
    return out


def _drop_round(ctx: Context[ServerState], secure: SecureRoundState, reason: str):
    """The sum cannot be had: each masked vector's drop is recorded, then the round ends as
    one with too few answers (retried, or the run stops)."""
    state = ctx.state
    out = [
        record
        for cid, uid in sorted(secure.masked_ids.items())
        for record in record_drop(
            ctx, uid, cid, f"secure round dropped: {reason}", round_=state.round, model_version=state.model.version
        )
    ]
    out += _record(state, secure, dropped=reason)
    ctx.cancel_timer(STAGE)
    state.folded = {}
    state.secure = None
    return out + (too_few_answers(ctx, f"secure aggregation, {reason}") or [])


def _record(state: ServerState, secure: SecureRoundState, **outcome) -> list[Outbound]:
    """The round's SecureRound record, for the journal (none without one: nothing takes it)."""
    if not state.config.journal:
        return []
    return [
        Outbound(
            AUDIT,
            _reply(
                state,
                SecureRound,
                session=secure.session,
                keys=sorted(secure.keys),
                shared=sorted(secure.shares),
                masked=dict(sorted(secure.masked_ids.items())),
                revealed=sorted(secure.revealed),
                dropouts=dict(sorted(secure.dropouts.items())),
                **outcome,
            ),
        )
    ]


def _reply(state: ServerState, cls, **fields):
    return cls(round=state.round, model_version=state.model.version, **fields)


SERVER = HandlerSet(
    "secure aggregation (server)",
    {
        SecureKeys: take_keys,
        SecureShares: take_shares,
        SecureMasked: take_masked,
        SecureReveal: take_reveal,
        SecureStageEnd: end_stage,
    },
    overrides={ParameterUpdate: refuse_plain_update, RoundComplete: end_training, RoundDeadline: end_training},
    needs=(ServerState,),
)
