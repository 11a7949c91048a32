"""A grid's metric against its parameter, as a PNG (error bars over seeds, the paper's numbers beside)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: works headless and in CI
import matplotlib.pyplot as plt  # noqa: E402

from codetr.io import atomic_write_bytes  # noqa: E402

if TYPE_CHECKING:
    from experiments.table import GridTable


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot_metric(table: "GridTable", metric: str, path: Path) -> Path:
    """One axis: `metric` (percent, mean +- std over seeds) per point. With a single numeric parameter
    the x axis is that parameter; otherwise one tick per point. The paper's numbers, when the spec has
    them for this metric, go on a second y axis (their scale differs: COCO vs the generated data)."""
    points = table.points
    mean, std = 100 * points[f"{metric}_mean"], 100 * points[f"{metric}_std"].fillna(0.0)
    x = _numeric(list(points[table.params[0]].astype(str))) if len(table.params) == 1 else None
    ticks = list(points[table.params[0]].astype(str)) if len(table.params) == 1 else list(points["label"])
    positions = x if x is not None else list(range(len(points)))
    order = sorted(range(len(positions)), key=lambda i: positions[i])

    figure, axis = plt.subplots(figsize=(max(4.5, 0.9 * len(points) + 2), 3.4), dpi=120)
    axis.errorbar([positions[i] for i in order], [mean.iloc[i] for i in order], yerr=[std.iloc[i] for i in order],
                  marker="o", capsize=3, label="ours")
    for i, is_base in enumerate(points["is_baseline"]):
        if is_base:
            axis.scatter([positions[i]], [mean.iloc[i]], s=120, facecolors="none", edgecolors="black", zorder=3,
                         label="baseline")
    if x is not None and min(x) > 0 and max(x) / min(x) >= 8:
        axis.set_xscale("log", base=2)  # 0.25, 0.5, 1, 2: the usual geometric sweep of a loss weight
        axis.minorticks_off()
    axis.set_xticks(positions, ticks, rotation=0 if x is not None else 30, ha="center" if x is not None else "right")
    axis.set_xlabel(table.params[0] if len(table.params) == 1 else "point")
    axis.set_ylabel(f"{metric} (%)")
    axis.grid(alpha=0.3)
    if metric == table.paper_metric and points["paper"].notna().any():
        paper_axis = axis.twinx()
        known = [i for i in order if not points["paper"].isna().iloc[i]]
        paper_axis.plot([positions[i] for i in known], [points["paper"].iloc[i] for i in known], "s--", color="tab:gray",
                        label=f"paper {metric} (COCO)")
        paper_axis.set_ylabel(f"paper {metric} (%)", color="tab:gray")
        handles, labels = axis.get_legend_handles_labels()
        paper_handles, paper_labels = paper_axis.get_legend_handles_labels()
        axis.legend(handles + paper_handles, labels + paper_labels, fontsize=8, loc="best")
    else:
        axis.legend(fontsize=8)
    axis.set_title(table.title or metric, fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
