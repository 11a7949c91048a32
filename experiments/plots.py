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


def product_series(table: "GridTable") -> list[tuple[str, list[int]]] | None:
    """For a full product of two parameters whose first is numeric: one (label, row indices) series per
    value of the second parameter, e.g. ("num_convs=1", [...]); None for anything else (one line)."""
    points = table.points
    if len(table.params) != 2:
        return None
    first, second = table.params
    firsts, seconds = points[first].astype(str), points[second].astype(str)
    if _numeric(list(firsts)) is None or len(points) != firsts.nunique() * seconds.nunique() or firsts.nunique() < 2:
        return None
    return [(f"{second}={value}", [i for i in range(len(points)) if seconds.iloc[i] == value])
            for value in dict.fromkeys(seconds)]


def plot_metric(table: "GridTable", metric: str, path: Path) -> Path:
    """One axis: `metric` (percent, mean +- std over seeds) per point. With a single numeric parameter
    the x axis is that parameter; with a full product of two (the first numeric), the x axis is the first
    and each value of the second is a line; otherwise one tick per point. The paper's numbers, when the
    spec has them for this metric, go on a second y axis (their scale differs: COCO vs the generated data)."""
    points = table.points
    mean, std = 100 * points[f"{metric}_mean"], 100 * points[f"{metric}_std"].fillna(0.0)
    series = product_series(table)
    x_param = table.params[0] if len(table.params) == 1 or series else None
    x = _numeric(list(points[x_param].astype(str))) if x_param else None
    ticks = list(points[x_param].astype(str)) if x is not None else list(points["label"])
    positions = x if x is not None else list(range(len(points)))
    series = series or [("ours", list(range(len(points))))]

    figure, axis = plt.subplots(figsize=(max(4.5, 0.9 * len(points) + 2) if x is None else 5.5, 3.4), dpi=120)
    for label, rows in series:
        rows = sorted(rows, key=lambda i: positions[i])
        axis.errorbar([positions[i] for i in rows], [mean.iloc[i] for i in rows], yerr=[std.iloc[i] for i in rows],
                      marker="o", capsize=3, label=label)
    for i, is_base in enumerate(points["is_baseline"]):
        if is_base:
            axis.scatter([positions[i]], [mean.iloc[i]], s=120, facecolors="none", edgecolors="black", zorder=3,
                         label="baseline")
    if x is not None and min(x) > 0 and max(x) / min(x) >= 8:
        axis.set_xscale("log", base=2)  # 0.25, 0.5, 1, 2: the usual geometric sweep of a loss weight
        axis.minorticks_off()
    tick_positions = dict(zip(positions, ticks))  # a product repeats each x: one tick per distinct value
    axis.set_xticks(list(tick_positions), list(tick_positions.values()), rotation=0 if x is not None else 30,
                    ha="center" if x is not None else "right")
    axis.set_xlabel(x_param if x is not None else "point")
    axis.set_ylabel(f"{metric} (%)")
    axis.grid(alpha=0.3)
    if metric == table.paper_metric and points["paper"].notna().any():
        paper_axis = axis.twinx()
        for label, rows in series:
            known = sorted((i for i in rows if not points["paper"].isna().iloc[i]), key=lambda i: positions[i])
            paper_axis.plot([positions[i] for i in known], [points["paper"].iloc[i] for i in known], "s--",
                            color="tab:gray", label=f"paper {metric} (COCO)" + ("" if label == "ours" else f", {label}"))
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
