"""Cross-site evaluation results: the models x sites matrix, as JSON, a heatmap and a table.

Rows are models (``global`` and every site's final local model, ``site-<id>``), columns are
the sites whose data they were evaluated on. The handlers that fill it are in
``handlers/workflows/cross_site.py``; this module only reads and writes results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

MATRIX_FILE = "cross_site.json"
HEATMAP_FILE = "cross_site.png"


def build_matrix(results: dict[str, dict[str, dict[str, float]]], metric: str = "accuracy") -> dict[str, Any]:
    """``results``: site -> model -> scores. Returns the JSON document: models, sites, and
    ``matrix[metric][i][j]`` = model i on site j (NaN where a site did not answer)."""
    sites = sorted(results, key=_site_order)
    models = sorted({m for scores in results.values() for m in scores}, key=lambda m: (m != "global", _site_order(m)))
    matrices = {}
    for name in ("accuracy", "loss"):
        matrices[name] = [[float(results[s].get(m, {}).get(name, math.nan)) for s in sites] for m in models]
    samples = {s: int(next(iter(results[s].values()), {}).get("num_samples", 0)) for s in sites}
    return {
        "models": models,
        "sites": sites,
        "metric": metric,
        "matrix": matrices,
        "num_samples": samples,
        "summary": summarise(models, sites, matrices["accuracy"]),
    }


def _site_order(name: str) -> tuple[int, str]:
    tail = name.removeprefix("site-")
    return (int(tail), "") if tail.isdigit() else (1 << 30, tail)


def summarise(models: list[str], sites: list[str], accuracy: list[list[float]]) -> list[dict[str, Any]]:
    """Per local model: its accuracy on its own site, its mean off its site, and the global
    model's mean on those same sites (the comparison cross-site evaluation is for)."""
    if "global" not in models:
        return []
    global_row = accuracy[models.index("global")]
    rows = []
    for i, model in enumerate(models):
        own = model.removeprefix("site-")
        if model == "global" or f"site-{own}" not in sites:
            continue
        j_own = sites.index(f"site-{own}")
        off = [j for j in range(len(sites)) if j != j_own and not math.isnan(accuracy[i][j])]
        rows.append(
            {
                "model": model,
                "own_site": accuracy[i][j_own],
                "off_site_mean": _mean([accuracy[i][j] for j in off]),
                "global_off_site_mean": _mean([global_row[j] for j in off]),
            }
        )
    return rows


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def write_results(document: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``cross_site.json`` and the heatmap ``cross_site.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / MATRIX_FILE, out / HEATMAP_FILE
    json_path.write_text(json.dumps(document, indent=1, allow_nan=True))
    draw_heatmap(document, png_path)
    return json_path, png_path


def draw_heatmap(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = document["matrix"][document.get("metric", "accuracy")]
    models, sites = document["models"], document["sites"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(sites), 1.0 + 0.5 * len(models)))
    image = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(models)), models)
    ax.set_xlabel("data of site")
    ax.set_ylabel("model")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            ax.text(
                j,
                i,
                "-" if math.isnan(value) else f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if value < 0.6 else "black",
                fontsize=8,
            )
    fig.colorbar(image, ax=ax, label=document.get("metric", "accuracy"))
    ax.set_title("cross-site evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_results(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MATRIX_FILE
    return json.loads(path.read_text()) if path.exists() else None


def print_table(document: dict[str, Any], console: Any = None) -> None:
    """The matrix and the own-site / off-site summary as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    metric = document.get("metric", "accuracy")
    table = Table(title=f"cross-site evaluation ({metric}): model (row) on the data of site (column)")
    table.add_column("model")
    for site in document["sites"]:
        table.add_column(site, justify="right")
    for model, row in zip(document["models"], document["matrix"][metric]):
        table.add_row(model, *("-" if math.isnan(v) else f"{v:.3f}" for v in row))
    console.print(table)
    if document.get("summary"):
        summary = Table(title="local models off their own site, against the global model")
        for column in ("model", "own site", "off-site mean", "global, same sites"):
            summary.add_column(column, justify="right" if column != "model" else "left")
        for row in document["summary"]:
            summary.add_row(
                row["model"],
                f"{row['own_site']:.3f}",
                f"{row['off_site_mean']:.3f}",
                f"{row['global_off_site_mean']:.3f}",
            )
        console.print(summary)
