"""A wine-like classifier whose own loops report more than accuracy: every metric is kept.

178 wines, 13 chemical measurements, 3 cultivars (generated from class-wise Gaussians: no
download), split across clients by cultivar skew (each client holds mostly one). The
model is an MLP with LayerNorm; ``train`` is AdamW with a cosine learning-rate schedule
and returns ``loss``, ``lr_end`` (the schedule's last rate) and ``max_grad`` (the largest
gradient norm seen); ``evaluate`` returns ``loss``, ``accuracy``, ``f1_macro``,
``roc_auc`` (one-vs-rest, macro) and ``brier`` (an auxiliary score). All of them reach
``metrics.jsonl``, the curve and ``brokerfl status``: combined across clients by the
sample-weighted mean, except ``max_grad``, which takes the largest
(``METRIC_REDUCERS``).

Options (``OPTIONS``, the defaults): ``hidden``, ``skew`` (the share of a client's wines
from its main cultivar), ``server_test`` (false: federated evaluation on the clients'
local test splits).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from brokerfl.app import Partition, TrainingCancelled, cancellation_requested
from brokerfl.config import TrainConfig

OPTIONS = {"hidden": 32, "skew": 0.7, "server_test": True}
METRIC_REDUCERS = {"max_grad": "max"}
CLASSES, FEATURES, SAMPLES = 3, 13, 178


def dataset() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(178)
    centres = rng.normal(scale=0.6, size=(CLASSES, FEATURES))
    y = rng.choice(CLASSES, size=SAMPLES, p=[0.33, 0.4, 0.27])
    x = centres[y] + rng.normal(size=(SAMPLES, FEATURES))
    return x.astype(np.float32), y.astype(np.int64)


def _split(seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(SAMPLES)
    return order[36:], order[:36]


def model(options: dict[str, Any]) -> nn.Module:
    hidden = options["hidden"]
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


def load_partition(index: int, num_partitions: int, options: dict[str, Any], seed: int) -> Partition:
    """Mostly one cultivar per client (``skew``), the rest drawn from the others; a fifth
    of it held out as the client's local test split."""
    x, y = dataset()
    rows, _ = _split(seed)
    rng = np.random.default_rng([seed, index])
    main = index % CLASSES
    share = len(rows) // num_partitions
    mine = rows[y[rows] == main]
    others = rows[y[rows] != main]
    picked = np.concatenate(
        [
            rng.choice(mine, min(len(mine), int(share * options["skew"])), replace=False),
            rng.choice(others, share - int(share * options["skew"]), replace=False),
        ]
    )
    rng.shuffle(picked)
    test = max(1, len(picked) // 5)
    return Partition((x[picked[test:]], y[picked[test:]]), (x[picked[:test]], y[picked[:test]]))


def load_server_test(options: dict[str, Any], seed: int):
    if not options["server_test"]:
        return None
    x, y = dataset()
    _, test = _split(seed)
    return x[test], y[test]


def train(model: nn.Module, data, settings: TrainConfig, seed: int) -> dict[str, float]:
    x, y = (torch.as_tensor(a) for a in data)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps = settings.epochs * -(-len(x) // settings.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=settings.lr / 10)
    model.train()
    total, seen, max_grad = 0.0, 0, 0.0
    for _ in range(settings.epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), settings.batch_size):
            if cancellation_requested():
                raise TrainingCancelled("training cancelled")
            rows = order[start : start + settings.batch_size]
            loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
            optimizer.zero_grad()
            loss.backward()
            max_grad = max(max_grad, float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))))
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
            seen += len(rows)
    return {"loss": total / max(seen, 1), "lr_end": schedule.get_last_lr()[0], "max_grad": max_grad}


@torch.no_grad()
def evaluate(model: nn.Module, data) -> dict[str, float]:
    x, y = (torch.as_tensor(a) for a in data)
    model.eval()
    logits = model(x)
    probabilities = torch.softmax(logits, dim=1).numpy()
    labels = y.numpy()
    predicted = probabilities.argmax(axis=1)
    return {
        "loss": float(nn.functional.cross_entropy(logits, y)),
        "accuracy": float((predicted == labels).mean()),
        "f1_macro": f1_macro(labels, predicted),
        "roc_auc": roc_auc_ovr(labels, probabilities),
        "brier": float(((probabilities - np.eye(CLASSES)[labels]) ** 2).sum(axis=1).mean()),
        "num_samples": len(labels),
    }


def f1_macro(labels: np.ndarray, predicted: np.ndarray) -> float:
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN) (a class absent from both: left out)."""
    scores = []
    for c in range(CLASSES):
        tp = int(((predicted == c) & (labels == c)).sum())
        wrong = int(((predicted == c) != (labels == c)).sum())
        if tp or wrong:
            scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores)) if scores else float("nan")


def roc_auc_ovr(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """One-vs-rest ROC AUC, macro: per class, the probability that a random positive scores
    above a random negative (ties count half), by the rank-sum (Mann-Whitney U) formula."""
    aucs = []
    for c in range(CLASSES):
        positive = labels == c
        n_pos, n_neg = int(positive.sum()), int((~positive).sum())
        if not n_pos or not n_neg:
            continue
        scores = probabilities[:, c]
        order = scores.argsort()
        ranks = np.empty(len(scores))
        ranks[order] = np.arange(1, len(scores) + 1)
        for value in np.unique(scores):  # ties: their mean rank
            tied = scores == value
            ranks[tied] = ranks[tied].mean()
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")
