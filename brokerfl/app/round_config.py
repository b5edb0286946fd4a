"""What a round's TrainTask tells the clients besides the model: its train settings and
its per-round config.

Three sources, each overriding the one before, for round ``r``:

1. the config's ``train_schedule``: ``{setting: {round: value}}``, a value holding from its
   round on (``lr: {1: 0.1, 10: 0.01}``: 0.1 for rounds 1-9, 0.01 from round 10);
2. the strategy's ``configure_train(r)`` (:class:`brokerfl.handlers.strategies.base.Strategy`);
3. the app's ``configure_train(round, options)``, if it defines one (:mod:`brokerfl.app`).

Keys that name a train setting (``lr``, ``epochs``, ...) override the run's ``train``
section for that round: the default loop and ``settings`` see them. The whole merged dict
travels as ``TrainTask.round_config`` and reaches ``train`` as ``context.config``. Pure
functions: the server calls them when it starts a round, ``replay`` may too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from brokerfl.app import App, AppError, call
from brokerfl.config import RunConfig, TrainConfig

MAX_DEPTH = 8  # of a round config's nested lists and dicts


def scheduled(schedule: Mapping[str, Mapping[int, Any]], round_: int) -> dict[str, Any]:
    """Each setting's value in effect at ``round_``: that of the latest round <= ``round_``
    (none before its first round)."""
    out = {}
    for key, by_round in schedule.items():
        started = [r for r in by_round if r <= round_]
        if started:
            out[key] = by_round[max(started)]
    return out


def round_settings(
    config: RunConfig, round_: int, *, strategy: Any = None, app: App | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(train settings, round config)`` of round ``round_``: the TrainTask's ``config``
    and ``round_config``. An app's hook that fails or returns what cannot travel (or a
    setting out of range) is an :class:`AppError` naming it."""
    merged = scheduled(config.train_schedule, round_)
    hook = getattr(strategy, "configure_train", None)
    if callable(hook):
        merged.update(_checked(hook(round_), f"strategy {config.strategy.name!r}: configure_train({round_})"))
    app_hook = getattr(app.module, "configure_train", None) if app is not None else None
    if callable(app_hook):
        where = f"app {app.name!r}: configure_train({round_})"
        try:
            returned = call(app_hook, round_, options=app.options)
        except Exception as exc:
            raise AppError(f"{where} failed: {type(exc).__name__}: {exc}") from exc
        merged.update(_checked(returned, where))
    overrides = {k: v for k, v in merged.items() if k in TrainConfig.model_fields}
    try:
        settings = TrainConfig.model_validate({**config.train.model_dump(), **overrides})
    except ValidationError as exc:
        error = exc.errors()[0]
        raise AppError(f"round {round_}'s train settings: {'.'.join(map(str, error['loc']))}: {error['msg']}") from None
    return settings.model_dump(), merged


def _checked(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise AppError(f"{where} must return a dict with string keys, got {type(value).__name__}")
    _plain(value, where, 0)
    return dict(value)


def _plain(value: Any, where: str, depth: int) -> None:
    """Values a message carries: None, bool, int, float, str, lists and string-keyed dicts."""
    if depth > MAX_DEPTH:
        raise AppError(f"{where}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            _plain(item, where, depth + 1)
        return
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        for item in value.values():
            _plain(item, where, depth + 1)
        return
    raise AppError(
        f"{where}: {type(value).__name__} cannot travel in a TrainTask (use numbers, strings, lists and dicts)"
    )
