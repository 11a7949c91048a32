"""The IoF-IoB figure: one panel per variant (encoder features, decoder attention), one curve per checkpoint.

Built with matplotlib's object API (`Figure`: no pyplot state, no backend switch, so a notebook shows it
inline); analysis.figures.save_figure writes it as PNG.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from matplotlib.figure import Figure

if TYPE_CHECKING:
    from analysis.iof_iob import IoFIoBResult

_TITLES = {"encoder": "encoder feature discriminability", "decoder": "last decoder layer's attention"}


def plot_iof_iob(results: list[IoFIoBResult], aggregate: str) -> Figure:
    """IoF against IoB of `aggregate` ("pooled" / "per_image"), one panel per variant.

    The legend gives each checkpoint's AUC; the dotted diagonal is chance (a map unrelated to the boxes).
    Each curve is closed by (0, 0) and (1, 1) as its AUC is (see analysis.iof_iob.curve_auc).
    """
    if not results:
        raise ValueError("plot_iof_iob needs at least one result")
    variants = list(dict.fromkeys(r.variant for r in results))
    figure = Figure(figsize=(5 * len(variants), 4.6), layout="tight")
    axes = figure.subplots(1, len(variants), squeeze=False)[0]
    for axis, variant in zip(axes, variants):
        for r in (r for r in results if r.variant == variant):
            curve = r.curves[aggregate]
            # Closed by (0, 0) and (1, 1) as the AUC is: pixels tied at D = 0 (or 1) join in one straight step.
            points = sorted(zip([0.0, *curve.iob, 1.0], [0.0, *curve.iof, 1.0]))
            axis.plot([x for x, _ in points], [y for _, y in points], label=f"{r.checkpoint} (AUC {curve.auc:.3f})")
        axis.plot([0, 1], [0, 1], ":", color="grey", linewidth=1)
        axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="IoB (background above S)", ylabel="IoF (foreground above S)",
                 title=f"{_TITLES.get(variant, variant)}\n"
                       f"({aggregate.replace('_', '-')}, {results[0].num_images} images)")
        axis.set_aspect("equal")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right", fontsize=8)
    return figure
