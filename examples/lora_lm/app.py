"""A small GPT-2-style language model fine-tuned with LoRA by clients on different instruction domains.

Two stages, each a brokerfl run of this app (``docs/how-to/llm-fine-tuning.md``):

1. ``pretrain.yaml``: full-weight FedAvg (the whole ``state_dict`` travels) from random
   initialisation, every client holding a mix of all domains: the base learns the byte
   statistics, the instruction format and some of each task.
2. ``lora.yaml``: ``base:`` names the first run's ``final_model.npz``; the model is that
   base, frozen, with LoRA adapters (peft) on its attention and MLP projections. Only the
   adapters train and only they travel (:func:`exchanged`); every client holds one domain
   (non-IID) and scores the global adapter on its own held-out split.

The model is ``transformers.GPT2LMHeadModel`` built from a config with random
initialisation (nothing is downloaded), over the byte-level tokenizer and the synthetic
instruction data of :mod:`examples.lora_lm.data`. ``model()`` is deterministic given torch's
RNG, which the runtime seeds from the run's ``seed``: every side builds the same frozen base.

Options (``OPTIONS``, the defaults):

- ``lora``: None trains and exchanges every weight; a mapping (keys ``r``, ``alpha``,
  ``dropout``, ``target_modules``, missing ones from :data:`LORA_DEFAULTS`) trains and
  exchanges a LoRA adapter only.
- ``base``: None (random initialisation) or the path of a model file written by a brokerfl
  run of this app without ``lora`` and of the same size (``OUT/final_model.npz``): its
  weights become the base. Read with :func:`brokerfl.storage.model_file.read_model_file`
  (never unpickled).
- ``size``: a preset, ``"small"`` (:data:`SIZES`: 1.9M parameters) or ``"gpt2-small"``
  (GPT-2 small's shape: 12 layers, 12 heads, width 768, 1024 positions). ``gpt2-small``
  keeps GPT-2's vocabulary size (50257) so the model has GPT-2 small's 124.4M parameters
  (~498 MB in float32); the byte-level tokenizer uses ids 0-258 of it only. (With a
  259-entry vocabulary the same shape would have 86M.)
- ``n_embd``, ``n_layer``, ``n_head``, ``n_positions``, ``vocab_size``: None takes the
  preset's; a number overrides it.
- ``dropout``: the model's dropout (embeddings, attention, residual).
- ``domains``: ``"own"``: client ``index`` holds the domain ``DOMAINS[index % 6]``
  (non-IID); ``"mix"``: every client holds samples of every domain.
- ``samples``, ``test_samples``: a client's training and held-out test samples.

``train``: AdamW (``lr`` and ``weight_decay`` of the run's ``train`` section; a fresh
optimizer each round) on the cross-entropy of the answer tokens, ``epochs`` passes or
``max_batches`` batches, the gradient norm clipped to 1; it checks
:func:`brokerfl.app.cancellation_requested` between batches. ``evaluate``: ``loss`` (mean
per answer token), ``perplexity`` (its exponential; the run's ``TARGET_METRIC``), and
``perplexity_<domain>`` for each domain in the data, so federated evaluation logs every
client domain's perplexity in ``metrics.jsonl``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from brokerfl.app import Partition, TrainingCancelled, cancellation_requested
from brokerfl.config import TrainConfig

from . import data as lm_data

try:
    import peft
    import transformers
except ImportError as exc:
    raise ImportError(
        f"examples.lora_lm needs transformers and peft ({exc}): pip install 'brokerfl[llm]'", name=exc.name
    ) from exc

SIZES: dict[str, dict[str, int]] = {
    "small": {"n_embd": 192, "n_layer": 4, "n_head": 4, "n_positions": 128, "vocab_size": lm_data.VOCAB_SIZE},
    "gpt2-small": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "vocab_size": 50257},
}
SIZE_KNOBS = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size")
LORA_DEFAULTS: dict[str, Any] = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]}
OPTIONS: dict[str, Any] = {
    "lora": None,
    "base": None,
    "size": "small",
    **dict.fromkeys(SIZE_KNOBS),
    "dropout": 0.0,
    "domains": "own",
    "samples": 512,
    "test_samples": 128,
}
TARGET_METRIC = ("perplexity", "min")
EVAL_BATCH = 256


def check_options(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; the app takes {sorted(OPTIONS)}")
    if options["size"] not in SIZES:
        raise ValueError(f"size: {options['size']!r} is none of {sorted(SIZES)}")
    for knob in SIZE_KNOBS:
        if options[knob] is not None and not (isinstance(options[knob], int) and options[knob] > 0):
            raise ValueError(f"{knob}: a positive integer or null, got {options[knob]!r}")
    shape = gpt2_shape(options)
    if shape["n_embd"] % shape["n_head"]:
        raise ValueError(f"n_embd ({shape['n_embd']}) must be a multiple of n_head ({shape['n_head']})")
    if shape["vocab_size"] < lm_data.VOCAB_SIZE:
        raise ValueError(f"vocab_size: at least {lm_data.VOCAB_SIZE} (the byte-level tokenizer's ids)")
    lora = options["lora"]
    if lora is not None:
        if not isinstance(lora, Mapping):
            raise ValueError(f"lora: null or a mapping of {sorted(LORA_DEFAULTS)}, got {type(lora).__name__}")
        if set(lora) - set(LORA_DEFAULTS):
            raise ValueError(
                f"lora: unknown key(s) {sorted(set(lora) - set(LORA_DEFAULTS))}; it takes {sorted(LORA_DEFAULTS)}"
            )
    if options["domains"] not in ("own", "mix"):
        raise ValueError(f"domains: 'own' or 'mix', got {options['domains']!r}")
    for count in ("samples", "test_samples"):
        if not (isinstance(options[count], int) and options[count] > 0):
            raise ValueError(f"{count}: a positive integer, got {options[count]!r}")
    if options["base"] is not None and not isinstance(options["base"], (str, os.PathLike)):
        raise ValueError(f"base: null or a model file's path, got {type(options['base']).__name__}")


def gpt2_shape(options: Mapping[str, Any]) -> dict[str, int]:
    """The size preset with the options' overrides."""
    preset = SIZES[options["size"]]
    return {knob: preset[knob] if options[knob] is None else options[knob] for knob in SIZE_KNOBS}


def language_model(options: Mapping[str, Any]) -> transformers.GPT2LMHeadModel:
    """The GPT-2 model of the options' shape, randomly initialised from torch's RNG."""
    config = transformers.GPT2Config(
        **gpt2_shape(options),
        resid_pdrop=options["dropout"],
        embd_pdrop=options["dropout"],
        attn_pdrop=options["dropout"],
        bos_token_id=lm_data.BOS,
        eos_token_id=lm_data.EOS,
        pad_token_id=lm_data.PAD,
    )
    return transformers.GPT2LMHeadModel(config)


def model(options: Mapping[str, Any]) -> nn.Module:
    lm = language_model(options)
    if options["base"] is not None:
        load_base(lm, options["base"])
    if options["lora"] is None:
        return lm
    lora = {**LORA_DEFAULTS, **options["lora"]}
    config = peft.LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=list(lora["target_modules"]),
        fan_in_fan_out=True,  # GPT-2's projections are Conv1D: weight (in, out)
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(lm, config)  # the base frozen, the adapter trainable


def exchanged(model: nn.Module, options: Mapping[str, Any]) -> Iterable[str]:
    """What travels: the adapter with ``lora``, else the whole state_dict."""
    if options["lora"] is None:
        return list(model.state_dict())
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


@lru_cache(maxsize=2)
def _base_weights(path: str, modified_ns: int, size: int) -> dict[str, np.ndarray]:
    """A base model file's arrays (read once per file version: ``model()`` is called on
    every side and whenever a task needs a fresh module)."""
    from brokerfl.storage.model_file import read_model_file

    parameters, _ = read_model_file(path)
    return parameters


def load_base(lm: nn.Module, path: str | os.PathLike) -> None:
    """Load a full-weight run's model file into ``lm`` (names and shapes must match; a
    tied weight, GPT-2's output layer, is in the file once, under its embedding's name)."""
    from brokerfl.app.torch_adapter import untied_state

    stat = os.stat(path)
    weights = _base_weights(os.fspath(path), stat.st_mtime_ns, stat.st_size)
    state = untied_state(lm)
    missing, unexpected = sorted(state.keys() - weights.keys()), sorted(weights.keys() - state.keys())
    if missing or unexpected:
        hint = (
            " (it holds a LoRA adapter: base must be a run without lora)"
            if any("lora_" in n for n in weights)
            else " (a run of this app without lora, of the same size?)"
        )
        raise ValueError(
            f"base {os.fspath(path)!r} does not fit the model: missing {_few(missing)}, unexpected {_few(unexpected)}"
            + hint
        )
    with torch.no_grad():
        for name, tensor in state.items():
            value = torch.from_numpy(np.asarray(weights[name]))
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"base {os.fspath(path)!r}: {name} has shape {tuple(value.shape)}, the model {tuple(tensor.shape)} "
                    "(another size?)"
                )
            tensor.copy_(value)


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "") if names else "none"


# ---------------------------------------------------------------- data


def partition_pairs(
    index: int, options: Mapping[str, Any], seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Client ``index``'s (train, test) instruction pairs: its own domain, or every domain
    (``domains: mix``). Test instructions never appear in its training ones."""
    rng = np.random.default_rng([seed, index])
    if options["domains"] == "own":
        domains = [lm_data.DOMAINS[index % len(lm_data.DOMAINS)]]
    else:
        domains = list(lm_data.DOMAINS)
    train, test = [], []
    for i, domain in enumerate(domains):
        share = len(domains)
        n_test = options["test_samples"] // share + (i < options["test_samples"] % share)
        n_train = options["samples"] // share + (i < options["samples"] % share)
        held_out = lm_data.samples(domain, n_test, rng)
        test += held_out
        train += lm_data.samples(domain, n_train, rng, exclude={prompt for prompt, _ in held_out})
    order = rng.permutation(len(train))
    return [train[i] for i in order], test


def load_partition(index: int, num_partitions: int, options: Mapping[str, Any], seed: int) -> Partition:
    train, test = partition_pairs(index, options, seed)
    positions = gpt2_shape(options)["n_positions"]
    return Partition(lm_data.tokenize(train, positions), lm_data.tokenize(test, positions))


# ---------------------------------------------------------------- training and evaluation


def token_losses(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (0 where the label is ignored), shape (batch, length)."""
    # right padding: the mask changes no position that counts, and keeps transformers from warning
    logits = model(input_ids=ids, attention_mask=(ids != lm_data.PAD).long()).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=lm_data.IGNORE, reduction="none"
    ).view(labels.shape)


def train(model: nn.Module, data: Any, settings: TrainConfig, seed: int) -> dict[str, float]:
    """AdamW on the mean cross-entropy of the answer tokens (see the module's docstring)."""
    ids, labels = (torch.as_tensor(np.asarray(a)) for a in data)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total, tokens, steps = 0.0, 0, 0
    for _ in range(settings.epochs):
        order = torch.randperm(len(ids), generator=generator)
        for start in range(0, len(ids), settings.batch_size):
            if cancellation_requested():
                raise TrainingCancelled(f"cancelled after {steps} batches")
            rows = order[start : start + settings.batch_size]
            batch_labels = labels[rows]
            counted = int((batch_labels != lm_data.IGNORE).sum())
            loss = token_losses(model, ids[rows], batch_labels).sum() / counted
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            total += loss.item() * counted
            tokens += counted
            steps += 1
            if settings.max_batches is not None and steps >= settings.max_batches:
                return {"loss": total / tokens}
    return {"loss": total / max(tokens, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, data: Any) -> dict[str, float]:
    """``loss`` per answer token, ``perplexity``, and ``perplexity_<domain>`` per domain present."""
    ids, labels = (torch.as_tensor(np.asarray(a)) for a in data)
    model.eval()
    by_domain: dict[str, list[float]] = {}  # domain -> [summed loss, tokens]
    domains = [lm_data.domain_of(row.tolist()) or "other" for row in ids]
    for start in range(0, len(ids), EVAL_BATCH):
        losses = token_losses(model, ids[start : start + EVAL_BATCH], labels[start : start + EVAL_BATCH])
        counted = (labels[start : start + EVAL_BATCH] != lm_data.IGNORE).sum(dim=1)
        for domain, loss, count in zip(domains[start : start + EVAL_BATCH], losses.sum(dim=1), counted):
            entry = by_domain.setdefault(domain, [0.0, 0])
            entry[0] += float(loss)
            entry[1] += int(count)
    total = sum(loss for loss, _ in by_domain.values())
    tokens = sum(count for _, count in by_domain.values())
    mean = total / tokens
    metrics = {"loss": mean, "perplexity": math.exp(mean), "num_samples": len(ids)}
    for domain, (loss, count) in sorted(by_domain.items()):
        metrics[f"perplexity_{domain}"] = math.exp(loss / count)
    return metrics
