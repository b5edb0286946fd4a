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


def record_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics line's app metrics (its ``metrics`` object; a line written before there
    was one: its accuracy and loss)."""
    metrics = record.get("metrics")
    if isinstance(metrics, dict):
        return {
            k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) or v is None
        }
    return {k: record[k] for k in ("accuracy", "loss") if record.get(k) is not None}


# What a round moved, in a line of its own (not an app metric): a panel when the config's
# ``metrics`` names it.
TRAFFIC = ("model_bytes", "update_bytes")


def curve_value(record: dict[str, Any], name: str) -> float | None:
    """The value a curve plots for ``name`` in a line: an app metric, or its traffic."""
    return record.get(name) if name in TRAFFIC else record_metrics(record).get(name)


def curve_panels(records: list[dict[str, Any]], wanted: list[str] | None = None, target: str = "accuracy") -> list[str]:
    """The curve's panels, one per metric: ``wanted`` (those present, in its order: the
    round's traffic, ``model_bytes`` and ``update_bytes``, too), or every metric of the run:
    the target first, then loss, the evaluation's others, and the clients' training metrics
    (``train_*``) last."""
    seen: list[str] = []
    for record in records:
        seen.extend(name for name, value in record_metrics(record).items() if value is not None and name not in seen)
    if wanted:
        seen.extend(name for name in TRAFFIC if any(r.get(name) is not None for r in records))
        return [name for name in wanted if name in seen]

    def order(name: str) -> tuple[int, int]:
        rank = 0 if name == target else 1 if name == "loss" else 3 if name.startswith("train_") else 2
        return rank, seen.index(name)

    return sorted(seen, key=order)


def plot_curve(
    records: list[dict[str, Any]],
    png: str | os.PathLike,
    title: str = "",
    *,
    metrics: list[str] | None = None,
    target: str = "accuracy",
    higher_is_better: bool = True,
) -> Path:
    """One panel per metric (:func:`curve_panels`) against the round: the server's own test
    data (solid) and federated evaluation (dashed), with each client's own evaluation
    (thin, when the lines hold it). The PNG's ``Description`` names the panels, for tools
    and tests that read it back."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(records, metrics, target) or ["accuracy", "loss"]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    # the server's own test data (and the clients' training), and federated evaluation
    server = [r for r in records if "evaluation" not in r]
    federated = [r for r in records if r.get("evaluation") == "federated"]
    for ax, name in zip(axes.flat, panels):
        plotted = 0
        for series, label, style in ((server, "server", "-"), (federated, "federated evaluation", "--")):
            points = [(r["round"], value) for r in series if (value := curve_value(r, name)) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", markersize=3, label=label)
                plotted += 1
        plotted += _plot_each_client(ax, federated, name)
        better = (" (higher is better)" if higher_is_better else " (lower is better)") if name == target else ""
        ax.set(xlabel="round", ylabel=name, title=name + better)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if plotted > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100, metadata={"Description": "panels: " + ", ".join(panels)})
    plt.close(fig)
    return png


def _plot_each_client(ax: Any, federated: list[dict[str, Any]], name: str) -> int:
    """Each client's own evaluation of ``name`` (a federated evaluation line's
    ``client_metrics``), a thin line per client, labelled by id up to 8 clients; 1 if any."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in federated:
        for client, scores in (record.get("client_metrics") or {}).items():
            value = scores.get(name) if isinstance(scores, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(str(client), []).append((record["round"], value))
    for index, (client, points) in enumerate(sorted(series.items())):
        label = f"client {client[:24]}" if len(series) <= 8 else ("each client" if index == 0 else None)
        ax.plot([p[0] for p in points], [p[1] for p in points], "-", linewidth=0.8, alpha=0.6, label=label)
    return 1 if series else 0


def curve_description(png: str | os.PathLike) -> str:
    """The ``Description`` a curve PNG was written with ("panels: ...")."""
    from PIL import Image

    with Image.open(png) as image:
        return image.text.get("Description", "")
