"""Per-round metrics: one JSON object a line in ``metrics.jsonl``, and a plot of them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

REQUIRED = ("round", "model_version", "accuracy", "loss", "num_updates", "duration_s")


class MetricsLog:
    """Appends one record per round; each line is flushed and fsynced, so a killed server
    loses no finished round's line."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, record: dict[str, Any]) -> None:
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise ValueError(f"metrics record lacks {missing}")
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())


def last_model_version(path: str | os.PathLike) -> int:
    """The model version of the last line of a metrics file (-1: none)."""
    path = Path(path)
    if not path.exists():
        return -1
    records = read_metrics(path)
    return records[-1]["model_version"] if records else -1


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curve(records: list[dict[str, Any]], png: str | os.PathLike, title: str = "") -> Path:
    """Accuracy and loss per round, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    # the server's own test data, and federated evaluation (clients' sample-weighted metrics)
    server = [r for r in records if "evaluation" not in r and r.get("accuracy") is not None]
    federated = [r for r in records if r.get("evaluation") == "federated"]
    for series, label, style in ((server, "server test data", "-"), (federated, "federated evaluation", "--")):
        if not series:
            continue
        rounds = [r["round"] for r in series]
        acc_ax.plot(rounds, [r["accuracy"] for r in series], style, marker="o", markersize=3, label=label)
        loss_ax.plot(rounds, [r["loss"] for r in series], style, marker="o", markersize=3, color="tab:red", label=label)
    if server and federated:
        acc_ax.legend()
    acc_ax.set(xlabel="round", ylabel="test accuracy", title="accuracy")
    acc_ax.grid(alpha=0.3)
    loss_ax.set(xlabel="round", ylabel="test loss", title="loss")
    loss_ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
