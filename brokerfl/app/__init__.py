"""Bring your own model and data: the brokerfl app API.

An *app* is a Python module named in the run's config; ``app_options`` is a free-form
mapping handed to it as is::

    app: examples.cnn_mnist.app
    app_options: {channels: [8, 16], max_train: 4000}

The module defines plain functions (every one receives ``options``, the ``app_options``
mapping):

``model(options)`` (required)
    The model: a ``torch.nn.Module``, or for an app without torch a ``dict`` of named numpy
    arrays (the initial parameters: fresh arrays each call, which the runtime takes over
    without copying them, except read-only ones). The server calls it with torch's RNG
    seeded from the run's ``seed``, so the initial model is reproducible; clients call it
    for the skeleton they load received parameters into. The parameters on the wire are the
    module's whole ``state_dict``: weights and buffers (BatchNorm running statistics and
    ``num_batches_tracked`` too), or the entries ``exchanged`` names.

``load_partition(index, num_partitions, options, seed)`` (required)
    Client data: partition ``index`` of ``num_partitions``. Return the training data, or a
    :class:`Partition` with a local ``test`` split as well. Data is a pair ``(x, y)`` of
    arrays (or tensors) with one sample a row, or any re-iterable of ``(x, y)`` batches
    (e.g. a ``torch.utils.data.DataLoader``); the default loops handle both.

``load_server_test(options, seed)`` (optional)
    The server's own test data (same forms), evaluated after every model version. Without
    it (or when it returns None) the server runs *federated evaluation*: every
    ``evaluate_every`` rounds it sends an EvaluateTask and logs the clients' sample-weighted
    metrics.

``train(model, data, settings, seed[, context])`` (optional for torch apps)
    Local training. ``settings`` is the run's ``train`` section (:class:`TrainConfig`:
    epochs, batch_size, lr, momentum, weight_decay, proximal_mu, max_batches); ``seed`` is
    this client's seed for this round. A torch app trains ``model`` (a Module holding the
    global model) in place and returns metrics; the default is a cross-entropy SGD loop,
    for classification only (it refuses float targets or outputs not shaped (batch,
    classes), saying so). A numpy app receives the parameters dict and returns
    ``(parameters, metrics)``. Metrics are numbers (:mod:`brokerfl.wire.app_metrics`); each is
    kept (``train_<name>`` in ``metrics.jsonl``); ``num_samples`` is the FedAvg weight
    (default: the partition's size, which the client declares when it joins; the server
    refuses an update claiming more, so a larger count fails the training here, with the
    reason). Parameters with a NaN or an infinity are refused by the client, which
    reports the failure.
    A client runs it beside its I/O loop (a thread), so it may take minutes; when its result
    is no longer wanted (the task's deadline passed, the client exits, a newer task came)
    :func:`cancellation_requested` turns True: a long loop may check it and raise
    :class:`TrainingCancelled` (the default torch loop does, between batches). A ``train``
    that raises anything else is reported to the server (TrainFailed), which stops waiting
    for this client's update.

``evaluate(model, data[, context])`` (optional for torch apps)
    Returns metrics (numbers: a one-element tensor is taken as its value), holding the
    app's target metric (``accuracy`` unless ``TARGET_METRIC`` says otherwise) and any
    others (``loss``, ``f1_macro``, ``r2``, ...): every one reaches ``metrics.jsonl``, the
    curve and ``brokerfl status``. The default (classification) is the mean cross-entropy
    and the accuracy of the argmax. A numpy app receives the parameters dict. On the
    server, an ``evaluate`` that raises is logged and recorded (the metrics line's
    ``evaluation_error``); training goes on.

``exchanged(model, options)`` (optional, torch apps)
    The names of the ``model.state_dict()`` entries that travel; the rest (a frozen base) is
    never sent. A LoRA adapter's, for instance::

        def exchanged(model, options):
            return [name for name, p in model.named_parameters() if p.requires_grad]

    Then ``model(options)`` is called with torch's RNG seeded from the run's ``seed`` on
    every side (server and clients), so it must build the same base everywhere: from
    torch's RNG, or from a file every side has (a checkpoint). Each task carries a
    fingerprint of the server's base; a client whose base differs says so and leaves.
    Aggregation, hashes, the stored versions, replay, accounting, compression, DP and
    secure aggregation act on the named entries only; ``final_model.npz`` holds them, and
    :func:`load_model` loads them into a fresh ``model()``. A ``train`` or ``evaluate`` that
    changes an entry that does not travel gets a warning, and the next task a fresh
    ``model()``. Without ``exchanged`` (or naming every entry) the whole state_dict travels.

``check_options(options)`` (optional)
    Raise ``ValueError`` naming the key for options the app cannot use; the runtime reports
    it as ``app_options.<...>`` of the app.

``configure_train(round, options)`` (optional, called on the server)
    A dict for round ``round``'s task: keys naming a train setting (``lr``, ``epochs``, ...)
    override the run's ``train`` section for that round; the whole dict reaches ``train``
    as ``context.config``. Numbers, strings, lists and dicts only (it travels in the
    TrainTask). The config's ``train_schedule`` does the common case without code:
    ``train_schedule: {lr: {1: 0.1, 10: 0.01}}`` trains rounds 1-9 with lr 0.1, then 0.01
    (a value holds from its round on); a strategy's ``configure_train(round)`` is merged
    between the two (:mod:`brokerfl.app.round_config`).

Module-level settings (all optional):

``OPTIONS = {"hidden": 32, ...}``
    Every option and its default (or a set of the names): the defaults are filled in, and
    a key not in it is warned of at start (unless ``check_options`` judges). An app with
    neither gets a warning, after its first training, for keys it never read.
``TARGET_METRIC = ("r2", "max")``
    The metric the run is judged by and whether higher (``"max"``) or lower (``"min"``)
    is better: the first curve panel, the simulate summary, replay's what-if. Default
    ``("accuracy", "max")``.
``METRIC_REDUCERS = {"max_grad": "max"}``
    How a metric combines across clients: ``mean`` (sample-weighted, the default),
    ``max``, ``min``, ``sum``, ``median``, or a function ``(values, weights) -> float``.

**The context.** A ``train`` or ``evaluate`` that declares a ``context`` parameter gets an
:class:`AppContext`: ``round``, ``client_id``, ``model_version``, ``config`` (the round's
config above; empty for evaluation) and ``state``, a dict of this client's own that the
next round's ``train``/``evaluate`` sees again (a learning-rate scheduler's position, a
control variate, counters). With ``client_state_dir: DIR`` in the config, ``state`` is
also written (JSON, after each training) to ``DIR/<run>/client-<id>-....json`` and read
back when the client starts, so it survives a restart of the process; it must then hold
JSON values only. On the server (its own test data), ``client_id`` is "" and ``state``
is empty. Example, a per-client step decay that survives restarts::

    def train(model, data, settings, seed, context):
        lr = context.config.get("lr", settings.lr) * 0.9 ** context.state.get("trained", 0)
        ...
        context.state["trained"] = context.state.get("trained", 0) + 1

**Isolation.** The logical clients of one process share one model object (and in
``simulate`` share it with the server's evaluation); each task finds it as ``model()``
made it: a ``train`` that changes the module (``model.double()``, frozen layers, a
replaced submodule, new attributes or hooks) gets a warning, and the next task a fresh
``model()``. A numpy app's ``train`` receives a dict of its own (the arrays in it are the
shared received ones, read-only: return new arrays). Its own update is that client's
business: one in float64 for a float32 model is refused by the server.

**The trained model.** ``brokerfl simulate`` and ``brokerfl server`` write the final
model to ``OUT/final_model.npz``; ``brokerfl export RUN_DIR [--version V] --out FILE``
writes any kept version (the server keeps them all in ``OUT/models``; ``simulate
--keep-versions`` does too). :func:`load_model` loads such a file into the app's model::

    from brokerfl.app import load_model
    model = load_model("configs/my_run.yaml", "runs/my-run/final_model.npz")  # a Module in eval mode

The file is numpy's ``.npz`` with JSON metadata, read without pickle (format in
:mod:`brokerfl.storage.model_file`).

A client whose app fails at its start (``load_partition``, ``model()``, the warm-up)
reports it to the server and stops; the process's other clients and the run go on without
it (or the run stops, naming it, when fewer than ``min_clients`` remain). A ``model()``
with no parameters stops the server and ``simulate`` at start (exit 2).

A classification app with a torch model therefore needs only ``model`` and
``load_partition`` (and ``load_server_test`` if the server has test data). Examples:
``handlers/apps/mlp.py`` (the built-in app), ``examples/cnn_mnist`` (a CNN with BatchNorm),
``examples/logreg_numpy`` (logistic regression in plain numpy: no torch is imported),
``examples/regression`` (MSE and R^2: its own loops, ``TARGET_METRIC``) and ``examples/wine``
(metrics beyond accuracy, ``METRIC_REDUCERS``). Metrics in depth: ``docs/how-to/app-metrics.md``.

The module is imported by name: from an installed package, or from the working directory
(the ``brokerfl`` command looks there too). Every error names the app and the function (:class:`AppError`). This module
does not import
torch: the torch adapter (``brokerfl/app/torch_adapter.py``, a :class:`ModelKind` it registers) is
imported only when an app's ``model`` returns a torch Module.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import numpy as np

import brokerfl.config.builtins as builtins
from brokerfl.config import ConfigError, RunConfig, TrainConfig
from brokerfl.wire.app_metrics import (
    RESERVED_TRAIN,
    MetricError,
    Reducer,
    Target,
    numbers,
    reducers_of,
    target_of,
)
from brokerfl.wire.names import bounded

BUILT_IN_APP = "mlp"  # the config's short name (brokerfl.config.builtins) of handlers/apps/mlp.py
TORCH_EXTRA = "pip install 'brokerfl[torch]'"
TORCH_MODULES = frozenset({"torch", "torchvision", "opacus"})  # what the torch extra installs

Parameters = dict[str, np.ndarray]


class AppError(RuntimeError):
    """An app broke the API; the message names the app and the function."""


class TrainingCancelled(Exception):
    """Raised by a training loop that saw :func:`cancellation_requested` (the default torch
    loop checks between batches): its result would be thrown away anyway."""


_training = threading.local()


def cancellation_requested() -> bool:
    """Is the training running on this thread no longer wanted (its task's deadline passed,
    the client is exiting, a newer task arrived)? A long custom ``train`` may poll this
    between steps and raise :class:`TrainingCancelled`; one that never does simply runs to
    the end, and its result is discarded. Python cannot stop a thread: cancelling is
    cooperative."""
    event = getattr(_training, "cancelled", None)
    return event is not None and event.is_set()


@contextmanager
def cancellable(event: threading.Event) -> Iterator[None]:
    """App calls on this thread inside the block see ``event`` as their cancellation."""
    outer = getattr(_training, "cancelled", None)
    _training.cancelled = event
    try:
        yield
    finally:
        _training.cancelled = outer


@dataclass
class AppContext:
    """What an app's ``train``/``evaluate`` knows besides model and data, when it declares
    a ``context`` parameter (see the module's docstring)."""

    round: int = 0
    client_id: str = ""  # "" on the server (its own test data)
    model_version: int = 0
    config: dict[str, Any] = field(
        default_factory=dict
    )  # this round's config from the server (brokerfl.app.round_config)
    state: dict[str, Any] = field(
        default_factory=dict
    )  # this client's, kept across rounds (client_state_dir: across restarts)


@dataclass
class Partition:
    """What ``load_partition`` returns when a client has a local test split too."""

    train: Any
    test: Any = None


class ModelAdapter(Protocol):
    """How the runtime drives one kind of model (torch Module or named numpy arrays)."""

    def initial_parameters(self, seed: int) -> Parameters: ...

    def train(
        self, parameters: Parameters, data: Any, settings: TrainConfig, seed: int, context: AppContext
    ) -> tuple[Parameters, dict[str, float]]: ...

    def evaluate(self, parameters: Parameters, data: Any, context: AppContext) -> dict[str, float]: ...

    def warm_up(self, data: Any) -> None: ...

    def trainable(self) -> frozenset[str] | None: ...

    def base_fingerprint(self) -> str: ...

    def travelling_bytes(self) -> int | None: ...


class NumpyModel:
    """An app whose ``model`` returns named numpy arrays: its own ``train``/``evaluate``
    take and return parameter dicts."""

    def __init__(self, app: App, initial: Mapping[str, Any]) -> None:
        self.app = app
        for name in ("train", "evaluate"):
            if not callable(getattr(app.module, name, None)):
                raise AppError(
                    f"app {app.name!r}: model() returned numpy arrays, so the app must define {name}(parameters, ...) "
                    "itself"
                )

    def initial_parameters(self, seed: int) -> Parameters:
        return self.app.call_model(seed)

    def train(
        self, parameters: Parameters, data: Any, settings: TrainConfig, seed: int, context: AppContext
    ) -> tuple[Parameters, dict[str, float]]:
        # a dict of its own: the received one is shared by the process's logical clients
        result = call(
            self.app.module.train, dict(parameters), data, settings, seed, options=self.app.options, context=context
        )
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], Mapping)):
            raise AppError(
                f"app {self.app.name!r}: train() must return (parameters, metrics), got {type(result).__name__}"
            )
        new, metrics = result
        return dict(new), dict(metrics or {})

    def evaluate(self, parameters: Parameters, data: Any, context: AppContext) -> dict[str, float]:
        return call(self.app.module.evaluate, dict(parameters), data, options=self.app.options, context=context)

    def trainable(self) -> frozenset[str] | None:
        return None  # named arrays: no buffers, every floating array is a weight

    def base_fingerprint(self) -> str:
        return ""  # model() returns just what travels: there is no rest

    def travelling_bytes(self) -> int | None:
        return None  # known only once model() is called with the run's seed

    def warm_up(self, data: Any) -> None:
        hook = getattr(self.app.module, "warm_up", None)
        if callable(hook):
            hook(self.app.options, data)


@dataclass(frozen=True)
class ModelKind:
    """How the runtime drives a kind of model other than named numpy arrays. The module that
    implements a kind registers it (:func:`register_model_kind`; torch's is
    :mod:`brokerfl.app.torch_adapter`), so this module imports neither that module nor its framework."""

    name: str
    adapter: Callable[[App, Any], ModelAdapter]  # for an app whose model() returned one
    loaded: Callable[[App, Any, Parameters], Any]  # load_model: a fresh model() given a file's parameters


_MODEL_KINDS: dict[str, ModelKind] = {}
# The module that registers each kind, imported by name when a model() first returns one.
MODEL_KIND_MODULES = {"torch": "brokerfl.app.torch_adapter"}


def register_model_kind(kind: ModelKind) -> None:
    _MODEL_KINDS[kind.name] = kind


def model_kind(name: str) -> ModelKind:
    """The registered kind ``name``, its module imported first if it has not registered yet."""
    if name not in _MODEL_KINDS:
        importlib.import_module(MODEL_KIND_MODULES[name])
    return _MODEL_KINDS[name]


class App:
    """An app module, checked and bound to its options; the runtime's one way to use it."""

    def __init__(self, name: str, module: ModuleType, options: Mapping[str, Any], seed: int = 0) -> None:
        self.name, self.module = name, module
        self.seed = seed  # the run's: model() is built with it on every side (what does not travel must agree)
        for required in ("model", "load_partition"):
            if not callable(getattr(module, required, None)):
                raise AppError(f"app {name!r}: the module defines no {required}() function (see brokerfl.app)")
        self.options, self.unknown_options = _bound_options(name, module, options)
        check = getattr(module, "check_options", None)
        if callable(check):
            try:
                check(self.options)
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"app_options of app {name!r}: {exc}") from None
        try:
            self.target: Target = target_of(module, name)
            self.reducers: dict[str, Reducer] = reducers_of(module, name)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
        self._adapter: ModelAdapter | None = None

    # ------------------------------------------------------------ the model

    def call_model(self, seed: int | None = None) -> Any:
        """The app's ``model(options)``; with torch's global RNG seeded (and restored) when
        ``seed`` is given and torch is loaded."""
        torch = sys.modules.get("torch")
        try:
            if seed is not None and torch is not None:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    return call(self.module.model, self.options, seed=seed or 0)
            return call(self.module.model, self.options, seed=seed or 0)
        except AppError:
            raise
        except Exception as exc:
            raise AppError(f"app {self.name!r}: model() failed: {type(exc).__name__}: {exc}") from exc

    @property
    def adapter(self) -> ModelAdapter:
        if self._adapter is None:
            made = self.call_model(seed=self.seed)
            torch = sys.modules.get("torch")
            if torch is not None and isinstance(made, torch.nn.Module):
                self._adapter = model_kind("torch").adapter(self, made)
            elif (
                isinstance(made, Mapping) and made and all(isinstance(k, str) and _is_array(v) for k, v in made.items())
            ):
                self._adapter = NumpyModel(self, made)
            else:
                raise AppError(
                    f"app {self.name!r}: model() returned {type(made).__name__}, expected a torch.nn.Module "
                    "or a non-empty dict of named numpy arrays"
                )
            if torch is not None and isinstance(made, torch.nn.Module) and not made.state_dict():
                self._adapter = None
                raise AppError(
                    f"app {self.name!r}: model() returned a {type(made).__name__} with no parameters or buffers: there "
                    "is nothing to train or send"
                )
        return self._adapter

    def check_model(self) -> None:
        """Build the model once (an :class:`AppError` for one the runtime cannot use, e.g.
        one with no parameters), so a mistake in ``model()`` stops a process at its start."""
        self.adapter  # noqa: B018 - built for its checks

    def initial_parameters(self, seed: int) -> Parameters:
        parameters = self.adapter.initial_parameters(seed)
        if isinstance(self.adapter, NumpyModel):
            if not (isinstance(parameters, Mapping) and parameters):
                raise AppError(f"app {self.name!r}: model() returned no parameters")
            parameters = {name: _taken_over(value) for name, value in parameters.items()}
        return parameters

    # ------------------------------------------------------------ data

    def load_partition(self, index: int, num_partitions: int, seed: int, *, client_id: str) -> Partition:
        where = f"client {client_id} (partition {index} of {num_partitions})"
        try:
            loaded = self.module.load_partition(index, num_partitions, self.options, seed)
        except Exception as exc:
            raise AppError(
                f"app {self.name!r}: load_partition() failed for {where}: {type(exc).__name__}: {exc}"
            ) from exc
        part = loaded if isinstance(loaded, Partition) else Partition(loaded)
        try:
            empty = part.train is None or count_samples(part.train) == 0
        except TypeError as exc:
            raise AppError(f"app {self.name!r}: load_partition() for {where}: {exc}") from None
        if empty:
            raise AppError(f"app {self.name!r}: load_partition() returned an empty partition for {where}")
        return part

    def load_server_test(self, seed: int) -> Any:
        """The server's test data, or None: then the server relies on federated evaluation."""
        loader = getattr(self.module, "load_server_test", None)
        if not callable(loader):
            return None
        try:
            data = loader(self.options, seed)
        except Exception as exc:
            raise AppError(f"app {self.name!r}: load_server_test() failed: {type(exc).__name__}: {exc}") from exc
        if data is not None and count_samples(data) == 0:
            raise AppError(f"app {self.name!r}: load_server_test() returned no samples")
        return data

    # ------------------------------------------------------------ training and evaluation

    def train(
        self, parameters: Parameters, data: Any, settings: TrainConfig, seed: int, context: AppContext | None = None
    ) -> tuple[Parameters, dict[str, float]]:
        """The app's training: new parameters (every value finite) and its metrics (numbers,
        see :mod:`brokerfl.wire.app_metrics`; ``num_samples`` filled in); an :class:`AppError`
        naming the app and ``train()`` for anything else."""
        try:
            with APP_CALLS:
                new, metrics = self.adapter.train(parameters, data, settings, seed, context or AppContext())
        except (AppError, TrainingCancelled):
            raise
        except Exception as exc:
            raise AppError(f"app {self.name!r}: train() failed: {type(exc).__name__}: {exc}") from exc
        try:
            metrics = numbers(metrics, "train()")
        except MetricError as exc:
            raise AppError(f"app {self.name!r}: {exc}") from None
        if RESERVED_TRAIN & metrics.keys():
            raise AppError(
                f"app {self.name!r}: train() returned {sorted(RESERVED_TRAIN & metrics.keys())}: reserved (train_s is "
                "the runtime's measure of the training)"
            )
        not_finite = non_finite(new)
        if not_finite:
            raise AppError(
                f"app {self.name!r}: train() returned parameters with NaN or infinite values in {not_finite}: such an "
                "update is never folded"
            )
        declared = count_samples(data)  # what the client's Join and Heartbeats declare
        metrics.setdefault("num_samples", declared)
        if metrics["num_samples"] > declared:
            raise AppError(
                f"app {self.name!r}: train() reported num_samples {metrics['num_samples']}, more than the {declared} "
                "samples of its partition "
                "(the client declared those when it joined; the server refuses an update claiming more)"
            )
        self._warn_unread_options()
        return new, metrics

    def evaluate(self, parameters: Parameters, data: Any, context: AppContext | None = None) -> dict[str, float]:
        """The app's evaluation: numbers (see :mod:`brokerfl.wire.app_metrics`) holding the
        app's target metric, ``num_samples`` filled in; an :class:`AppError` naming the app
        and ``evaluate()`` for anything else."""
        try:
            with APP_CALLS:
                returned = self.adapter.evaluate(parameters, data, context or AppContext())
        except AppError:
            raise
        except Exception as exc:
            raise AppError(f"app {self.name!r}: evaluate() failed: {type(exc).__name__}: {exc}") from exc
        try:
            scores = numbers(returned, "evaluate()")
        except MetricError as exc:
            raise AppError(f"app {self.name!r}: {exc}") from None
        if self.target.name not in scores:
            raise AppError(
                f"app {self.name!r}: evaluate() returned no {self.target.name!r}, the app's target metric (it returned "
                f"{sorted(scores)}); "
                "an app whose task has another one names it: TARGET_METRIC = (name, 'max' or 'min')"
            )
        scores.setdefault("num_samples", count_samples(data))
        return scores

    def _warn_unread_options(self) -> None:
        """Once, after the first training: app_options keys the app never read (an app that
        declares neither ``OPTIONS`` nor ``check_options``), likely misspelt."""
        options = self.options
        if not isinstance(options, _ReadTracked) or options.reported:
            return
        options.reported = True
        unread = sorted(set(dict.keys(options)) - options.read)  # dict.keys: not a read of them all
        if unread:
            _warn_unknown_options(self.name, unread, "the app never read them")

    def trainable(self) -> frozenset[str] | None:
        """The names of the model's trained weights (a torch model's buffers are not among
        them), or None: every floating tensor is one."""
        return self.adapter.trainable()

    def base_fingerprint(self) -> str:
        """A digest of what does not travel (the frozen base of a model that exchanges only
        some entries, see ``exchanged``), as ``model()`` built it with the run's seed; "" when
        everything travels. Every side must hold the same: a client whose digest differs from
        the server's cannot take part."""
        return self.adapter.base_fingerprint()

    def travelling_bytes(self) -> int | None:
        """The bytes of the model as it travels (what a task carries), if known without
        building it again (a torch model's); None otherwise."""
        return self.adapter.travelling_bytes()

    def warm_up(self, data: Any) -> None:
        try:
            with APP_CALLS:
                self.adapter.warm_up(data)
        except AppError:
            raise
        except Exception as exc:
            raise AppError(
                f"app {self.name!r}: train() failed on its warm-up batch: {type(exc).__name__}: {exc}"
            ) from exc

    def evaluator(self, data: Any) -> Callable[[Parameters], dict[str, float]] | None:
        """``parameters -> scores`` on ``data``, or None without data."""
        if data is None:
            return None
        return lambda parameters: self.evaluate(parameters, data)


# One app call at a time per process: the server evaluates on a thread aside
# (handlers/workflows/server.py), and an app's code need not be thread-safe (an adapter may
# keep one torch module per process, loaded in place): in `simulate` the clients' training
# shares the process with that thread.
APP_CALLS = threading.RLock()


def call(function: Callable[..., Any], *args: Any, **optional: Any) -> Any:
    """``function(*args)``, plus those ``optional`` keywords its signature names (an app's
    ``model`` may take ``seed``; its ``train``/``evaluate`` may take ``options``)."""
    accepted = _parameter_names(function)
    return function(*args, **{k: v for k, v in optional.items() if k in accepted})


_signatures: dict[Any, frozenset[str]] = {}


def _parameter_names(function: Callable[..., Any]) -> frozenset[str]:
    names = _signatures.get(function)
    if names is None:
        try:
            names = frozenset(inspect.signature(function).parameters)
        except (TypeError, ValueError):
            names = frozenset()
        _signatures[function] = names
    return names


FINITE_CHECK_ELEMENTS = 1 << 20  # checked a block at a time: no model-sized temporary


def non_finite(parameters: Mapping[str, Any]) -> list[str]:
    """The names of floating arrays holding a NaN or an infinity (the first few)."""
    bad = []
    for name, value in parameters.items():
        flat = np.asarray(value).reshape(-1)
        if flat.dtype.kind in "fc" and not all(
            np.isfinite(flat[i : i + FINITE_CHECK_ELEMENTS]).all() for i in range(0, flat.size, FINITE_CHECK_ELEMENTS)
        ):
            bad.append(name)
            if len(bad) >= 5:
                break
    return bad


class _ReadTracked(dict):
    """app_options of an app that declares neither ``OPTIONS`` nor ``check_options``: which
    keys it reads. Reading them all at once (iterating, ``dict(options)``, ``**options``)
    counts as reading every one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()
        self.reported = False

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().setdefault(key, default)

    def pop(self, key: Any, *default: Any) -> Any:
        self.read.add(key)
        return super().pop(key, *default)

    def __iter__(self) -> Iterator[Any]:
        self.read.update(self.keys())
        return super().__iter__()

    def items(self):  # type: ignore[override]
        self.read.update(self.keys())
        return super().items()

    def values(self):  # type: ignore[override]
        self.read.update(self.keys())
        return super().values()

    def copy(self) -> dict[str, Any]:
        self.read.update(self.keys())
        return dict(super().items())


def _bound_options(name: str, module: ModuleType, given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The options the app receives and the keys it does not know. ``OPTIONS`` names every
    key the app takes: a mapping of each to its default (filled in), or a set of names.
    Without ``check_options`` (which judges for itself) other keys are warned of at once;
    with neither, keys the app never reads are warned of after its first training
    (:class:`_ReadTracked`)."""
    declared = getattr(module, "OPTIONS", None)
    judged = callable(getattr(module, "check_options", None))
    defaults = dict(declared) if isinstance(declared, Mapping) else {}
    if isinstance(declared, Mapping) or (
        isinstance(declared, (set, frozenset, list, tuple)) and all(isinstance(k, str) for k in declared)
    ):
        known = set(declared)
    elif declared is None or judged:
        known = None
    else:
        raise ConfigError(
            f"app {name!r}: OPTIONS must name the options the app takes: a dict of them to their defaults, or a set of "
            f"names; got {type(declared).__name__}"
        )
    options = {**defaults, **given}
    if judged:
        return options, []
    if known is not None:
        unknown = sorted(set(given) - known)
        if unknown:
            _warn_unknown_options(name, unknown, f"the app's OPTIONS are {sorted(known)}")
        return options, unknown
    return _ReadTracked(options), []


def _warn_unknown_options(name: str, keys: list[str], why: str) -> None:
    import structlog

    shown = [bounded(k, 64) for k in keys[:20]]
    structlog.get_logger("brokerfl").warning(
        f"app_options of app {name!r}: unknown key(s) {shown} ({why}): misspelt?", app=name, keys=shown
    )


def _taken_over(value: Any) -> np.ndarray:
    """A writable array of ``value``: a writable ndarray as it is (model() made it for this
    call: copying it would hold the initial model twice at the server's start-up, one more
    model of peak memory), anything else copied."""
    if isinstance(value, np.ndarray) and value.flags.writeable:
        return value
    return np.array(value)


def _is_array(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def count_samples(data: Any) -> int:
    """Samples in ``data``: ``len(x)`` of an ``(x, y)`` pair, else the sum over its batches
    (``len(dataset)`` of a DataLoader)."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "__len__") and not isinstance(data[0], tuple):
        x, y = data
        if hasattr(x, "shape") and hasattr(y, "shape") and len(x) == len(y):
            return len(x)
    dataset = getattr(data, "dataset", None)  # a DataLoader
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    if isinstance(data, Iterable):
        return sum(len(batch[0]) for batch in data)
    raise TypeError(
        f"cannot count the samples of a {type(data).__name__}: give (x, y) arrays or an iterable of (x, y) batches"
    )


def app_options(config: RunConfig) -> dict[str, Any]:
    """The options the config's app receives. The ``data`` and ``model`` sections are the
    built-in MLP app's settings (its historical spelling); ``app_options`` override them."""
    if config.app == BUILT_IN_APP:
        legacy = {**config.data.model_dump(), "hidden": list(config.model.hidden)}
        return {**legacy, **config.app_options}
    return dict(config.app_options)


_cache: dict[tuple[str, str], App] = {}


def _importable_from_cwd() -> None:
    """An app module in the working directory imports as with ``python -m``, also from the
    ``brokerfl`` command (whose sys.path lacks it); appended, so it shadows nothing."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def load_app(config: RunConfig) -> App:
    """The config's app (``app`` key), imported and checked; one instance per app and
    options in a process."""
    options = app_options(config)
    key = (config.app, repr(sorted(options.items(), key=lambda kv: kv[0])), config.seed)
    app = _cache.get(key)
    if app is None:
        _importable_from_cwd()
        try:
            module = importlib.import_module(builtins.resolve("app", config.app))
        except ImportError as exc:
            missing = (exc.name or "").partition(".")[0]
            if missing in TORCH_MODULES and missing != config.app.partition(".")[0]:
                raise ConfigError(
                    f"app: app {config.app!r} needs {missing}, which is not installed: {TORCH_EXTRA}"
                ) from None
            raise ConfigError(
                f"app: cannot import app module {config.app!r}: {exc}{builtins.unknown_hint('app', config.app)}"
            ) from None
        except Exception as exc:  # the module itself raised while importing
            raise ConfigError(f"app: importing app module {config.app!r} failed: {type(exc).__name__}: {exc}") from exc
        app = _cache[key] = App(config.app, module, options, seed=config.seed)
    return app


def curve_settings(config: RunConfig) -> dict[str, Any]:
    """:func:`brokerfl.storage.metrics_log.plot_curve`'s keywords for a run: the config's ``metrics``
    and the app's target metric (a Flower app's is its nodes' ``accuracy``, if they report one)."""
    if config.flower_app is not None:
        return {"metrics": list(config.metrics) or None, "target": "accuracy", "higher_is_better": True}
    target = load_app(config).target
    return {"metrics": list(config.metrics) or None, "target": target.name, "higher_is_better": target.higher_is_better}


def base_of(config: RunConfig) -> str:
    """The fingerprint of the config's app's base (:meth:`App.base_fingerprint`): "" when
    the whole model travels."""
    return load_app(config).base_fingerprint() if config.flower_app is None else ""


def load_model(app_or_config: App | RunConfig | str | os.PathLike, path: str | os.PathLike) -> Any:
    """A trained model, loaded from a model file (``final_model.npz``, ``brokerfl export``;
    format in :mod:`brokerfl.storage.model_file`) into the app's own model: a fresh ``model()``
    Module with the file's state_dict (in eval mode), or for a numpy app the dict of named
    arrays. ``app_or_config``: an :class:`App`, a run config, or a config file's path. The
    file is never unpickled; names and shapes must match ``model()``."""
    from brokerfl.storage.model_file import read_model_file

    if isinstance(app_or_config, App):
        app = app_or_config
    else:
        from brokerfl.config import load_config

        config = app_or_config if isinstance(app_or_config, RunConfig) else load_config(str(app_or_config))
        app = load_app(config)
    parameters, meta = read_model_file(path)
    trained_on = meta.get("base_fingerprint", "")
    if trained_on and trained_on != app.base_fingerprint():
        raise AppError(
            f"app {app.name!r}: {path} holds what travels of a model whose base (what does not travel) is not the one "
            f"model() builds here (fingerprint {bounded(str(trained_on), 40)} in the file, "
            f"{app.base_fingerprint() or 'none'} here): load it with the run's config (its seed and app_options)"
        )
    made = app.call_model(seed=app.seed)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(made, torch.nn.Module):
        return model_kind("torch").loaded(app, made, parameters)
    expected = {name: np.shape(value) for name, value in dict(made).items()}
    got = {name: value.shape for name, value in parameters.items()}
    if expected != got:
        raise AppError(
            f"app {app.name!r}: {path} does not fit model(): it has {sorted(got.items())}, model() has "
            f"{sorted(expected.items())}"
        )
    return parameters
