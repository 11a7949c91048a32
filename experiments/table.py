"""Paper-style tables of a grid: one row per point, mean +- std over seeds, delta against the baseline.

Metrics are COCO fractions in the store (0.423) and are shown in percent like the paper (42.30).
The spread is the sample standard deviation over seeds (ddof=1); with one seed none is shown.
Files written into the grid folder:
    results.csv   one row per point, machine-readable (metrics as fractions with separate _mean / _std
                  columns; `paper` as published, in percent; `paper_mem_mb` / `paper_gpu_h`, the paper's
                  training memory and GPU-hours, when the spec gives them)
    results.md    the rendered table (Markdown);  results.tex  the same as a LaTeX tabular
    plot_<metric>.png   each chosen metric against the parameter (error bars over seeds)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from codetr.engine.evaluate import METRIC_NAMES
from codetr.errors import ConfigError
from codetr.io import atomic_write_text
from experiments.grid import PAPER_COSTS, GridPoint
from experiments.store import DONE, FAILED, grid_runs

DEFAULT_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FORMATS = ("md", "latex", "csv")


@dataclass
class GridTable:
    """A grid's results: `points` has one row per point; `params` names its parameter columns."""

    points: pd.DataFrame
    params: list[str]
    metrics: list[str]
    title: str
    paper_metric: str
    baseline_label: str | None
    unfinished: list[str] = field(default_factory=list)  # runs that the last `ablate` started and did not finish


def check_metrics(names: list[str]) -> list[str]:
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise ConfigError(f"--metrics {','.join(names)}: unknown {', '.join(unknown) or '(none given)'}; "
                          f"valid: {', '.join(METRIC_NAMES)}")
    return names


def run_rows(grid_dir: Path) -> tuple[dict, pd.DataFrame]:
    """One row per run: its parameter values, seed, state, metrics, seconds per iteration, peak memory.

    COCOeval reports -1 for a size range without ground truth (e.g. no small objects); that is "no
    value", so it becomes NaN rather than being averaged.
    """
    manifest, runs = grid_runs(grid_dir)
    rows = []
    for run in runs:
        status = run.status()
        row = {"point": run.point.values, "seed": run.seed, "state": status["state"], "error": status.get("error"),
               "sec_per_iter": status.get("sec_per_iter"), "peak_mem_mb": status.get("peak_mem_mb")}
        if status["state"] == DONE:
            row.update((name, value if value >= 0 else math.nan) for name, value in (status.get("metrics") or {}).items())
        rows.append(row)
    return manifest, pd.DataFrame(rows)


def _mean(values: pd.Series) -> float:
    values = values.dropna().astype(float)
    return values.mean() if len(values) else math.nan


def summarize(manifest: dict, runs: pd.DataFrame, metrics: list[str]) -> GridTable:
    """Aggregate runs into one row per point (in the manifest's order) with mean/std over done seeds.

    The delta of the first metric is taken over the seeds that both the point and the baseline
    completed, so a failed seed on one side does not bias it.
    """
    params, primary = manifest["params"], metrics[0]
    baseline = manifest.get("baseline")
    point_runs = [runs[[p == item["values"] for p in runs["point"]]] if len(runs) else runs for item in manifest["points"]]
    done_runs = [mine[mine["state"] == DONE] if len(mine) else mine for mine in point_runs]
    base_index = next((i for i, item in enumerate(manifest["points"]) if item["values"] == baseline), None)
    rows = []
    for item, mine, done in zip(manifest["points"], point_runs, done_runs):
        row = {name: item["values"].get(name, "") for name in params}
        errors = sorted(set(mine["error"].dropna())) if len(mine) else []
        row.update(label=GridPoint(item["values"]).label(), paper=item.get("paper"), seeds_done=len(done),
                   seeds=len(mine), seeds_failed=int((mine["state"] == FAILED).sum()) if len(mine) else 0,
                   is_baseline=item["values"] == baseline, errors="; ".join(errors))
        for metric in metrics:
            values = done[metric].dropna().astype(float) if metric in done else pd.Series(dtype=float)
            row[f"{metric}_mean"] = values.mean() if len(values) else math.nan
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        for column in ("sec_per_iter", "peak_mem_mb"):
            row[column] = _mean(done[column]) if column in done else math.nan
        row.update((key, float(item[key]) if item.get(key) is not None else math.nan) for key in PAPER_COSTS)
        row[f"delta_{primary}"] = math.nan
        if base_index is not None and primary in done and primary in done_runs[base_index]:
            ours = done.set_index("seed")[primary]
            theirs = done_runs[base_index].set_index("seed")[primary]
            common = ours.index.intersection(theirs.index)
            if len(common):
                row[f"delta_{primary}"] = _mean(ours[common]) - _mean(theirs[common])
        rows.append(row)
    table = pd.DataFrame(rows)
    return GridTable(table, params, metrics, manifest.get("title") or manifest.get("name", ""),
                     manifest.get("paper_metric", "AP"), table["label"].iloc[base_index] if base_index is not None else None)


def load_table(grid_dir: Path, metrics: list[str] | None = None) -> GridTable:
    manifest, runs = run_rows(Path(grid_dir))
    return summarize(manifest, runs, check_metrics(list(metrics or DEFAULT_METRICS)))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _percent(mean: float, std: float, pm: str) -> str:
    if math.isnan(mean):
        return "-"
    text = f"{100 * mean:.2f}"
    return text if math.isnan(std) else f"{text} {pm} {100 * std:.2f}"


def _signed_percent(delta: float) -> str:
    if math.isnan(delta):
        return "-"
    return f"{round(100 * delta, 2) + 0.0:+.2f}"  # + 0.0 turns -0.0 into 0.0: no "-0.00"


def paper_cost_columns(table: GridTable) -> list[str]:
    """The paper cost columns (PAPER_COSTS keys) that some point of the table has."""
    return [key for key in PAPER_COSTS if key in table.points and table.points[key].notna().any()]


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def _cost_cells(row: pd.Series, costs: list[str]) -> list[str]:
    """s/it, then the paper's GPU-hours; peak MB, then the paper's memory: each measure beside its counterpart."""
    cells = [_number(row["sec_per_iter"], ".2f")]
    if "paper_gpu_h" in costs:
        cells.append(_number(row["paper_gpu_h"], "g"))
    cells.append(_number(row["peak_mem_mb"], ".0f"))
    if "paper_mem_mb" in costs:
        cells.append(_number(row["paper_mem_mb"], ".0f"))
    return cells


def display_rows(table: GridTable, pm: str = "±") -> tuple[list[str], list[list[str]]]:
    """Header and cells as text: parameters, metrics (percent), delta, paper, s/iter (paper GPU-h), peak MB
    (paper MB), seeds; the paper's columns only when some point has a number for them."""
    primary = table.metrics[0]
    has_paper = table.points["paper"].notna().any()
    costs = paper_cost_columns(table)
    header = [*table.params, *table.metrics, f"Δ{primary}"]
    header += [f"paper {table.paper_metric}"] if has_paper else []
    header += ["s/it"] + ([PAPER_COSTS["paper_gpu_h"]] if "paper_gpu_h" in costs else [])
    header += ["peak MB"] + ([PAPER_COSTS["paper_mem_mb"]] if "paper_mem_mb" in costs else [])
    header += ["seeds"]
    rows = []
    for _, row in table.points.iterrows():
        cells = [str(row[name]) + (" *" if row["is_baseline"] and name == table.params[-1] else "") for name in table.params]
        cells += [_percent(row[f"{m}_mean"], row[f"{m}_std"], pm) for m in table.metrics]
        delta = row[f"delta_{primary}"]
        cells.append(("0" if row["seeds_done"] else "-") if row["is_baseline"] else _signed_percent(delta))
        if has_paper:
            cells.append("-" if pd.isna(row["paper"]) else f"{row['paper']:.1f}")
        cells += _cost_cells(row, costs)
        cells.append(f"{row['seeds_done']}/{row['seeds']}")
        rows.append(cells)
    return header, rows


def footnote(table: GridTable) -> str:
    note = "AP in percent; mean ± sample std over seeds."
    if table.baseline_label:
        note += f" * baseline ({table.baseline_label}); Δ is against it."
    if paper_cost_columns(table):
        note += " paper MB / GPU-h: the paper's training memory and GPU-hours in its own setting (s/it, peak MB: ours)."
    failed = table.points[table.points["errors"] != ""]
    for _, row in failed.iterrows():
        note += f"\n{'failed' if row['seeds_failed'] else 'interrupted'} at {row['label']}: {row['errors']}"
    return note


def to_markdown(table: GridTable) -> str:
    header, rows = display_rows(table)
    lines = [f"**{table.title}**", ""] if table.title else []
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines + ["", footnote(table)]) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#", "{": r"\{",
                  "}": r"\}", "$": r"\$", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}",
                  "Δ": r"$\Delta$", "±": r"$\pm$"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


def _latex_row(cells: list[str]) -> str:
    # "{}" first: a row starting with "[" (e.g. [atss,fcos]) would be read as the optional argument of
    # the preceding \\ or \midrule
    return "{}" + " & ".join(_latex_escape(c) for c in cells) + r" \\"


def to_latex(table: GridTable) -> str:
    header, rows = display_rows(table)
    lines = [r"\begin{tabular}{" + "l" * len(table.params) + "r" * (len(header) - len(table.params)) + "}", r"\toprule",
             _latex_row(header), r"\midrule"]
    lines += [_latex_row(cells) for cells in rows]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def to_csv(table: GridTable) -> str:
    columns = [*table.params, *(f"{m}_{s}" for m in table.metrics for s in ("mean", "std")),
               f"delta_{table.metrics[0]}", "paper", *paper_cost_columns(table), "sec_per_iter", "peak_mem_mb",
               "seeds_done", "seeds", "is_baseline", "errors"]
    return table.points[columns].to_csv(index=False)


def rich_table(table: GridTable):
    """The table for a terminal (compact, so 11 columns fit in 80); the footnote goes beneath it."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    header, rows = display_rows(table)
    out = Table(title=table.title or None, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, name in enumerate(header):
        is_param = i < len(table.params)
        out.add_column(name, justify="left" if is_param else "right", min_width=len(name) if is_param else None)
    for cells in rows:
        out.add_row(*(Text(cell) for cell in cells))  # Text: a value like [atss,fcos] is not markup
    return Group(out, Text(footnote(table), style="dim"))


def table_console():
    """A console for printing tables: the terminal's width, or wide when stdout is a file or pipe (so a
    logged table is not cut at 80 columns)."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def write_results(grid_dir: Path, table: GridTable) -> list[Path]:
    """Write results.csv / .md / .tex and one plot per metric into the grid folder; returns the paths."""
    from experiments.plots import plot_metric

    grid_dir = Path(grid_dir)
    paths = [grid_dir / "results.csv", grid_dir / "results.md", grid_dir / "results.tex"]
    for path, text in zip(paths, (to_csv(table), to_markdown(table), to_latex(table))):
        atomic_write_text(path, text)
    for metric in table.metrics:
        paths.append(plot_metric(table, metric, grid_dir / f"plot_{metric}.png"))
    return paths


def render(table: GridTable, fmt: str) -> str:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return {"md": to_markdown, "latex": to_latex, "csv": to_csv}[fmt](table)
