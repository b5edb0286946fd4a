"""The torch side of the app API: state_dict <-> named arrays, and the default loops.

Imported only when an app's ``model()`` returns a ``torch.nn.Module``: it registers the torch
:class:`~brokerfl.app.ModelKind` (brokerfl.app never imports it). Parameters are the
module's whole ``state_dict`` (buffers too), or the entries the app's ``exchanged`` names
(:class:`Exchange`), as numpy arrays in the tensors' dtypes, except
bfloat16 (numpy has none): it travels as float32, which holds every bfloat16 exactly, and
is cast back when loaded into the module. Every call runs with torch's
global RNG forked and seeded from its ``seed``, so dropout and friends are reproducible and
no caller's RNG is disturbed.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import xxhash
from torch import nn

from brokerfl.app import (
    AppContext,
    AppError,
    ModelKind,
    Parameters,
    TrainingCancelled,
    call,
    cancellation_requested,
    register_model_kind,
)
from brokerfl.config import TrainConfig
from brokerfl.wire.names import bounded

if TYPE_CHECKING:
    from brokerfl.app import App


def tied_parameters(module: nn.Module) -> dict[str, str]:
    """Tied weights: each state_dict name that is an earlier name's very Parameter (a
    language model's output layer and its input embedding), to that name."""
    first: dict[int, str] = {}
    tied = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            tied[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return tied


def untied_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict less tied names (each tied weight once, under its first name): what
    travels of a whole model."""
    state = module.state_dict()
    for alias in tied_parameters(module):
        state.pop(alias, None)
    return state


def _assign(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """``load_state_dict(tensors, assign=True)`` of the untied state, then every tied name
    made its weight's again: assigning makes a Parameter per name, which would untie them
    (two weights where model() made one, trained apart)."""
    tied = tied_parameters(module)
    module.load_state_dict(tensors, assign=True, strict=False)
    for alias, name in tied.items():
        owner, _, attribute = alias.rpartition(".")
        setattr(module.get_submodule(owner), attribute, module.get_parameter(name))


def to_named_arrays(module: nn.Module, names: Iterable[str] | None = None) -> Parameters:
    """The whole untied state_dict (or its entries ``names``) as fresh numpy arrays
    (bfloat16 as float32)."""
    out: Parameters = {}
    state = untied_state(module) if names is None else module.state_dict()
    for name in state if names is None else names:
        tensor = state[name].detach().cpu()
        out[name] = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy().copy()
    return out


def hand_over_named_arrays(module: nn.Module) -> Parameters:
    """The whole untied state_dict as numpy arrays that take the module's storage with them
    (no copy): the module gets new storage, untouched (so not resident) until the next load
    writes it. A trained model's arrays then cost no second model's worth of memory."""
    out: Parameters = {}
    state = untied_state(module)
    for name, tensor in state.items():
        tensor = tensor.detach()
        out[name] = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.cpu().numpy()
    if any(t.device.type != "cpu" for t in state.values()):
        return {name: np.array(a, copy=True) for name, a in out.items()}  # not the module's memory: copies
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = torch.empty_like(tensor.data)
    return out


def _check_names(state: Mapping[str, Any], parameters: Mapping[str, Any], app_name: str) -> None:
    if state.keys() != parameters.keys():
        missing, extra = sorted(state.keys() - parameters.keys()), sorted(parameters.keys() - state.keys())
        raise AppError(f"app {app_name!r}: parameters do not fit model(): missing {missing}, unexpected {extra}")


def load_named_arrays(
    module: nn.Module, parameters: Mapping[str, Any], app_name: str = "?", *, fresh: bool = False
) -> None:
    """Copy ``parameters`` into ``module`` (names and shapes must match its untied
    state_dict). ``fresh``: into new tensors, not the module's current ones (which may be
    borrowed arrays, see :func:`borrow_named_arrays`, that must not be written)."""
    state = untied_state(module)
    _check_names(state, parameters, app_name)
    if fresh:
        copies = {}
        for name, target in state.items():
            source = torch.from_numpy(np.array(parameters[name], copy=True))
            if tuple(source.shape) != tuple(target.shape):
                raise AppError(
                    f"app {app_name!r}: parameter {name} has shape {tuple(source.shape)}, model() has "
                    f"{tuple(target.shape)}"
                )
            copies[name] = source.to(target.dtype)
        _assign(module, copies)
        return
    _copy_into(state, parameters, app_name)


def load_named_subset(module: nn.Module, parameters: Mapping[str, Any], names: tuple[str, ...], app_name: str) -> None:
    """Copy ``parameters`` (exactly the entries ``names`` of the state_dict: what travels)
    into ``module``; the rest of it is left as it is."""
    if parameters.keys() != set(names):
        missing, extra = sorted(set(names) - parameters.keys()), sorted(parameters.keys() - set(names))
        raise AppError(
            f"app {app_name!r}: parameters do not fit what exchanged() names: missing {bounded(str(missing), 300)}, "
            f"unexpected {bounded(str(extra), 300)}"
        )
    state = module.state_dict()
    _copy_into({name: state[name] for name in names}, parameters, app_name)


def _copy_into(targets: Mapping[str, torch.Tensor], parameters: Mapping[str, Any], app_name: str) -> None:
    """Copy each of ``parameters`` into its tensor of ``targets`` (a module's state_dict
    entries: its own storage), shapes checked."""
    with torch.no_grad(), warnings.catch_warnings():
        # no copy of a read-only array (a model shared by a process's logical clients, decoded
        # over the received body): "non-writable", but copy_ only reads it
        warnings.simplefilter("ignore", UserWarning)
        for name, target in targets.items():
            source = torch.from_numpy(np.asarray(parameters[name]))
            if tuple(source.shape) != tuple(target.shape):
                raise AppError(
                    f"app {app_name!r}: parameter {name} has shape {tuple(source.shape)}, model() has "
                    f"{tuple(target.shape)}"
                )
            target.copy_(source)


class Exchange:
    """What of a model travels: ``names``, the state_dict entries an app's ``exchanged(model,
    options)`` names (a LoRA adapter's, the trainable ones), in the state_dict's order; None:
    the whole state_dict travels. Either way a tied weight (``tied``: a name that is
    another's very Parameter, such as a language model's output layer and its embedding)
    travels once, under its first name. ``base`` holds a digest of each entry that does not
    travel (the frozen base) as ``model()`` built it with the run's seed. Only the named
    entries are sent, folded, hashed, stored and replayed; the base never leaves a process,
    so every side must build the same one: ``fingerprint`` is what they compare ("" : no
    base)."""

    def __init__(self, app: App, module: nn.Module) -> None:
        self.tied = tied_parameters(module)
        self.names = travelling_names(app, module, self.tied)
        self.base = base_digests(module, self.unbased()) if self.names is not None else {}
        digest = xxhash.xxh3_128()
        for name, value in sorted(self.base.items()):
            digest.update(f"{name}={value};".encode())
        self.fingerprint = digest.hexdigest() if self.base else ""

    def unbased(self) -> set[str]:
        """Entries that are not the base's: what travels, and tied names (what travels, or
        the base, under another name)."""
        return {*(self.names or ()), *self.tied}

    def changed(self, module: nn.Module) -> list[str]:
        """The entries that do not travel whose values are no longer those of the base."""
        return [name for name, value in base_digests(module, self.unbased()).items() if self.base.get(name) != value]


def travelling_names(app: App, module: nn.Module, tied: Mapping[str, str]) -> tuple[str, ...] | None:
    """What travels of ``module`` (see :class:`Exchange`): the entries ``exchanged`` names,
    each tied name as its weight's first name, in the state_dict's order; None: the whole
    (untied) state_dict."""
    chosen = exchanged_names(app, module)
    if chosen is None:
        return None
    wanted = {tied.get(name, name) for name in chosen}
    return tuple(name for name in module.state_dict() if name in wanted)


def exchanged_names(app: App, module: nn.Module) -> tuple[str, ...] | None:
    """The state_dict entries the app's ``exchanged(model, options)`` names, checked, in the
    state_dict's order; None without the function or when it names them all."""
    hook = getattr(app.module, "exchanged", None)
    if hook is None:
        return None
    if not callable(hook):
        raise AppError(f"app {app.name!r}: exchanged must be a function exchanged(model, options) -> names")
    try:
        named = call(hook, module, options=app.options)
    except Exception as exc:
        raise AppError(f"app {app.name!r}: exchanged() failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(named, (str, bytes)) or not isinstance(named, Iterable):
        raise AppError(
            f"app {app.name!r}: exchanged() must return the names of model().state_dict() entries, got "
            f"{type(named).__name__}"
        )
    wanted = list(named)
    state = list(module.state_dict())
    known = set(state)
    unknown = [bounded(repr(n), 120) for n in wanted if not (isinstance(n, str) and n in known)]
    if unknown:
        raise AppError(
            f"app {app.name!r}: exchanged() named {len(unknown)} entr{'y' if len(unknown) == 1 else 'ies'} not in "
            f"model().state_dict(): {', '.join(unknown[:5])}; its entries are named like {', '.join(state[:3])}"
        )
    if not wanted:
        raise AppError(f"app {app.name!r}: exchanged() named no entry: nothing would travel")
    tied = tied_parameters(module)
    chosen = {tied.get(name, name) for name in wanted}
    return None if chosen >= set(untied_state(module)) else tuple(name for name in state if name in chosen)


def base_digests(module: nn.Module, skip: Collection[str]) -> dict[str, str]:
    """A digest (XXH3-128: the base may be gigabytes, hashed at several GB/s) of every
    state_dict entry not in ``skip``: its dtype, shape and bytes."""
    out = {}
    for name, tensor in module.state_dict().items():
        if name in skip:
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest = xxhash.xxh3_128(f"{flat.dtype}{tuple(tensor.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
        out[name] = digest.hexdigest()
    return out


def borrow_named_arrays(module: nn.Module, parameters: Mapping[str, Any], app_name: str = "?") -> None:
    """Make ``module``'s parameters (weights, not buffers) views of ``parameters``' arrays,
    without a copy: for evaluation only. A server evaluating each new global model then
    holds no second copy of it (and no copy is made per evaluation): the module shares the
    global model's memory. Buffers (e.g. BatchNorm's running statistics, which a module in
    train mode updates) are copied. The borrowed arrays must not be written: whoever next
    loads parameters for training passes ``fresh=True`` to :func:`load_named_arrays`."""
    state = untied_state(module)
    _check_names(state, parameters, app_name)
    weights = {name for name, _ in module.named_parameters()}
    assigned = {}
    for name, target in state.items():
        value = np.asarray(parameters[name])
        if tuple(value.shape) != tuple(target.shape):
            raise AppError(
                f"app {app_name!r}: parameter {name} has shape {tuple(value.shape)}, model() has {tuple(target.shape)}"
            )
        if name in weights and _torch_dtype(value.dtype) == target.dtype and value.flags.c_contiguous:
            with warnings.catch_warnings():  # a decoded array is read-only: nothing here writes it
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                assigned[name] = torch.from_numpy(value)
        else:
            assigned[name] = torch.from_numpy(np.array(value, copy=True)).to(target.dtype)
    _assign(module, assigned)


def _torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        return None


def batches(
    data: Any, batch_size: int, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` arrays: shuffled minibatches (in order without a generator); anything else
    is taken to be an iterable of ``(x, y)`` batches and used as it comes."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        x, y = (torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a for a in data)
        n = len(x)
        order = torch.randperm(n, generator=generator) if generator is not None else None
        for start in range(0, n, batch_size):
            if order is None:
                yield x[start : start + batch_size], y[start : start + batch_size]
            else:
                index = order[start : start + batch_size]
                yield x[index], y[index]
        return
    for x, y in data:
        yield torch.as_tensor(x), torch.as_tensor(y)


class NotClassification(ValueError):
    """The default loops met a model or data they cannot handle: they are for
    classification only."""


def check_classification(outputs: torch.Tensor, y: torch.Tensor, function: str) -> None:
    """The default loops' assumptions, said plainly when they do not hold: outputs of shape
    (batch, classes) and integer class labels of shape (batch,)."""
    problem = None
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        problem = f"the targets are {str(y.dtype).removeprefix('torch.')}, not integer class labels"
    elif outputs.ndim != 2:
        problem = f"model() outputs have shape {tuple(outputs.shape)}, not (batch, classes)"
    elif y.ndim != 1 or len(y) != len(outputs):
        problem = f"the targets have shape {tuple(y.shape)} for outputs of shape {tuple(outputs.shape)}, not (batch,)"
    elif len(y) and (int(y.min()) < 0 or int(y.max()) >= outputs.shape[1]):
        problem = f"a class label is outside 0..{outputs.shape[1] - 1} (the model has {outputs.shape[1]} outputs)"
    if problem is not None:
        raise NotClassification(
            f"the default {function} is for classification (cross-entropy of outputs of shape (batch, classes) against "
            "integer "
            f"class labels) and {problem}: for another task define train() and evaluate() in the app (see brokerfl.app)"
        )


def train_classifier(model: nn.Module, data: Any, settings: TrainConfig, seed: int) -> dict[str, float]:
    """The default local training, for classification: minibatch SGD on cross-entropy (plus
    FedProx's proximal term when ``proximal_mu`` > 0), ``epochs`` passes or ``max_batches``
    batches. A model or data it cannot handle (float targets, outputs not (batch, classes))
    is a :class:`NotClassification` saying so."""
    return {"loss": sgd(model, data, **settings.model_dump(), seed=seed)}


def sgd(
    model: nn.Module,
    data: Any,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    max_batches: int | None = None,
    seed: int = 0,
    borrowed: bool = False,
) -> float:
    """Train ``model`` in place with a fresh SGD optimizer; shuffles with a private
    generator seeded with ``seed``. Returns the sample-weighted mean cross-entropy of the
    batches trained on (without the proximal term, so it compares with evaluation).

    ``borrowed``: the model's weights are views of arrays that must not be written (a
    model shared by a process's logical clients) and the step is plain SGD (no momentum,
    weight decay or proximal term): the first step writes each weight's new value into
    its gradient's memory, which the weight then keeps. So no copy of the model is made
    before training, and the first step's gradients are the only model-sized buffer next
    to the shared one. Bitwise the optimizer's own step (``p + (-lr) * grad``)."""
    if borrowed and (momentum or weight_decay or proximal_mu):
        raise ValueError("a borrowed model is trained with plain SGD only (no momentum, weight_decay or proximal_mu)")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    model.train()
    total, seen, steps = 0.0, 0, 0
    for _ in range(epochs):
        for x, y in batches(data, batch_size, generator):
            if cancellation_requested():  # between batches: no longer wanted (brokerfl.app)
                raise TrainingCancelled(f"cancelled after {steps} batches")
            outputs = model(x)
            if steps == 0:
                check_classification(outputs, y, "train()")
            loss = F.cross_entropy(outputs, y)
            objective = loss
            if anchor:
                drift = sum((p - g).pow(2).sum() for p, g in zip(model.parameters(), anchor))
                objective = loss + 0.5 * proximal_mu * drift
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if borrowed:
                _step_into_gradients(model, lr)
                borrowed = False
            else:
                optimizer.step()
            total += loss.item() * len(y)
            seen += len(y)
            steps += 1
            if max_batches is not None and steps >= max_batches:
                return total / seen
    return total / max(seen, 1)


@torch.no_grad()
def _step_into_gradients(model: nn.Module, lr: float) -> None:
    """SGD's step for weights that must not be written: ``p + (-lr) * grad`` (the very
    kernel of ``p.add_(grad, alpha=-lr)``) into the gradient's memory, which becomes the
    weight's. A weight without a gradient gets a copy of its own (later steps write it)."""
    for parameter in model.parameters():
        grad = parameter.grad
        if grad is None:
            parameter.data = parameter.data.clone()
            continue
        parameter.grad = None
        torch.add(parameter, grad, alpha=-lr, out=grad)
        parameter.data = grad


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: Any, batch_size: int = 1024) -> dict[str, float]:
    """The default evaluation, for classification: mean cross-entropy, accuracy of the
    argmax, sample count (a :class:`NotClassification` for a model or data it cannot handle)."""
    model.eval()
    loss, correct, n = 0.0, 0, 0
    for x, y in batches(data, batch_size, None):
        logits = model(x)
        if n == 0:
            check_classification(logits, y, "evaluate()")
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == y).sum())
        n += len(y)
    if n == 0:
        raise ValueError("no samples to evaluate on")
    return {"loss": loss / n, "accuracy": correct / n, "num_samples": n}


_MODULE_MACHINERY = frozenset({"_parameters", "_buffers", "_modules", "training", "_non_persistent_buffers_set"})


def structure(module: nn.Module) -> list[tuple]:
    """What a task must find as ``model()`` made it, one tuple per item, in a fixed order:
    every tensor's name, dtype, device, shape and ``requires_grad``, every submodule's
    name and type, and every other attribute of theirs (plain values as they are, hooks
    by count, objects by identity). Not the tensors' values (each task loads its own) nor
    the train/eval mode (the loops set it)."""
    out: list[tuple] = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        out.append((name, str(tensor.dtype), str(tensor.device), tuple(tensor.shape), tensor.requires_grad))
    for name, sub in module.named_modules():
        out.append((name or "<model>", type(sub).__qualname__))
        for key, value in sorted(vars(sub).items()):
            if key in _MODULE_MACHINERY:
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                out.append((f"{name}.{key}", value))
            elif isinstance(value, dict) and key.endswith("hooks"):
                out.append((f"{name}.{key}", len(value)))
            elif isinstance(value, torch.Tensor):
                out.append((f"{name}.{key}", str(value.dtype), str(value.device), tuple(value.shape)))
            else:
                out.append((f"{name}.{key}", type(value).__qualname__, id(value)))
    return out


class TorchModel:
    """Drives an app whose ``model()`` returns a Module: one Module per process, loaded with
    each received model before the app's (or the default) ``train``/``evaluate`` runs."""

    def __init__(self, app: App, module: nn.Module) -> None:
        self.app, self.module = app, module
        self._structure = structure(module)  # what _restore compares with
        self._borrowed = False  # the module's weights are views of an evaluated model's arrays
        self._train = getattr(app.module, "train", None) or train_classifier
        self._evaluate = getattr(app.module, "evaluate", None) or evaluate_classifier
        self.exchange = Exchange(app, module)

    def initial_parameters(self, seed: int) -> Parameters:
        made = self.app.call_model(seed)
        if not isinstance(made, nn.Module):
            raise AppError(f"app {self.app.name!r}: model() returned {type(made).__name__}, expected a torch.nn.Module")
        names = self.exchange.names
        if names is not None and seed == self.app.seed:
            self._same_base(made)
        return to_named_arrays(made, names)

    def _same_base(self, made: nn.Module) -> None:
        """``made`` (another ``model()`` with the run's seed) holds this process's base: a
        model() that does not build the same one twice cannot agree with the other sides."""
        differs = self.exchange.changed(made)
        if differs:
            raise AppError(
                f"app {self.app.name!r}: model() built a different base twice with the same seed (entries "
                f"{bounded(', '.join(differs[:3]), 300)}): with exchanged(), what does not travel must be built "
                "identically on every side: initialise it from torch's RNG (seeded with the run's seed) or load "
                "it from a file every side has"
            )

    def train(
        self, parameters: Parameters, data: Any, settings: TrainConfig, seed: int, context: AppContext | None = None
    ) -> tuple[Parameters, dict[str, float]]:
        self._restore()
        names = self.exchange.names
        if names is None:
            load_named_arrays(self.module, parameters, self.app.name, fresh=self._borrowed)
        else:
            load_named_subset(self.module, parameters, names, self.app.name)
        self._borrowed = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            metrics = call(
                self._train,
                self.module,
                data,
                settings,
                seed,
                options=self.app.options,
                context=context or AppContext(),
            )
        for parameter in self.module.parameters():  # the last step's gradients: a model's worth of memory
            parameter.grad = None
        if names is None:
            return hand_over_named_arrays(self.module), dict(metrics or {})
        trained = to_named_arrays(self.module, names)  # copies: what travels is the small part
        self._keep_base("train()")
        return trained, dict(metrics or {})

    def evaluate(self, parameters: Parameters, data: Any, context: AppContext | None = None) -> dict[str, float]:
        self._restore()
        names = self.exchange.names
        if names is None:
            # in place: evaluation only reads the weights (see borrow_named_arrays)
            borrow_named_arrays(self.module, parameters, self.app.name)
            self._borrowed = True
        else:
            load_named_subset(self.module, parameters, names, self.app.name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            scores = call(self._evaluate, self.module, data, options=self.app.options, context=context or AppContext())
        if names is not None:
            self._keep_base("evaluate()")
        return scores

    def _keep_base(self, function: str) -> None:
        """After a task, under a partial exchange: the base as ``model()`` built it. A task
        that changed it (trained a frozen weight, a BatchNorm's statistics) would carry that
        into the next client's task and away from the other sides' base: warned of, and the
        module is built anew."""
        changed = self.exchange.changed(self.module)
        if changed:
            warnings.warn(
                f"app {self.app.name!r}: {function} changed entries that do not travel "
                f"({bounded(', '.join(changed[:3]), 300)}{', ...' if len(changed) > 3 else ''}); each task starts "
                "from model()'s: name them in exchanged() to share them",
                stacklevel=3,
            )
            self._rebuild()

    def _restore(self) -> None:
        """The module as ``model()`` made it, before each task: the logical clients of a
        process (and, in ``simulate``, the server) share it, so one whose ``train`` changed
        it (``model.double()``, a frozen layer, a replaced submodule, a new attribute) must
        not hand that change on. Checked by :func:`structure` (cheap: no tensor data is
        read); a changed module is made anew by ``model()``, loaded by the task."""
        now = structure(self.module)
        if now != self._structure:
            changed = next(
                (f"{a[0]}: {a[1:]} -> {b[1:]}" for a, b in zip(self._structure, now) if a != b), "its layout"
            )
            warnings.warn(
                f"app {self.app.name!r}: train() or evaluate() changed the model ({bounded(changed, 200)}); "
                "the next task gets a fresh model()",
                stacklevel=2,
            )
            self._rebuild()

    def _rebuild(self) -> None:
        """A fresh ``model()`` (with the run's seed: the same base) for the next task."""
        self.module = self.app.call_model(seed=self.app.seed)
        self._borrowed = False
        self._structure = structure(self.module)
        if self.exchange.names is not None:
            self._same_base(self.module)

    def trainable(self) -> frozenset[str]:
        """The state_dict names of the weights that travel (not buffers such as BatchNorm's
        statistics)."""
        weights = frozenset(name for name, _ in self.module.named_parameters())
        names = self.exchange.names
        return weights if names is None else weights & frozenset(names)

    def base_fingerprint(self) -> str:
        return self.exchange.fingerprint

    def travelling_bytes(self) -> int:
        """What travels, in bytes (bfloat16 travels as float32)."""
        names = self.exchange.names
        state = untied_state(self.module)
        if names is not None:
            state = {name: state[name] for name in names}
        return sum(t.numel() * (4 if t.dtype == torch.bfloat16 else t.element_size()) for t in state.values())

    def warm_up(self, data: Any) -> None:
        """One throwaway batch: torch's first call costs ~1 s, which would otherwise land in
        the first task. Only with the default loop (a custom one may ignore max_batches)."""
        if self._train is not train_classifier:
            return
        saved = to_named_arrays(self.module)
        if self._borrowed:  # training writes the weights: into the module's own memory
            load_named_arrays(self.module, saved, self.app.name, fresh=True)
            self._borrowed = False
        settings = TrainConfig(epochs=1, batch_size=2, lr=1e-9, momentum=0.0, max_batches=1)
        with torch.random.fork_rng(devices=[]):
            self._train(self.module, data, settings, 0)
        load_named_arrays(self.module, saved, self.app.name)


def _loaded(app: App, made: nn.Module, parameters: Parameters) -> nn.Module:
    """:func:`brokerfl.app.load_model` of a torch app: ``made`` holding ``parameters`` (what
    travels: the whole state_dict, or the entries ``exchanged`` names), in eval mode."""
    names = travelling_names(app, made, tied_parameters(made))  # the names only: no digest of the base
    if names is None:
        load_named_arrays(made, parameters, app.name)
    else:
        load_named_subset(made, parameters, names, app.name)
    return made.eval()


register_model_kind(ModelKind("torch", TorchModel, _loaded))
