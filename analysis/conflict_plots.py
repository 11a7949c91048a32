"""Figures of the head conflict analysis: annotated S_ij heatmaps and per-image CAM overlays.

Figures are built with matplotlib's object API (`Figure`, no pyplot state, no display backend needed);
analysis.figures.save_figure writes them atomically as PNG.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

if TYPE_CHECKING:
    from analysis.conflicts import CamExample, ConflictResult


def plot_conflict_matrices(results: list[ConflictResult], fmt: str = ".3g") -> Figure:
    """One annotated heatmap of S_ij per result, side by side, on a shared colour scale.

    Rows are i (KL from), columns j (KL to); each row label carries the head's average distance S_i.
    """
    if not results:
        raise ValueError("plot_conflict_matrices needs at least one result")
    size = max(len(r.heads) for r in results)
    panel = 1.3 + 0.9 * size
    figure = Figure(figsize=(panel * len(results) + 1.0, panel), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    vmax = max(float(r.matrix.max()) for r in results) or 1.0
    for index, (ax, result) in enumerate(zip(axes, results)):
        rows = [f"{name}\nS_i={avg:{fmt}}" for name, avg in zip(result.heads, result.average.tolist())]
        sns.heatmap(
            result.matrix.numpy(), ax=ax, annot=True, fmt=fmt, cmap="viridis", vmin=0.0, vmax=vmax, square=True,
            xticklabels=result.heads, yticklabels=rows, cbar=index == len(results) - 1,
            cbar_kws={"label": "mean KL(C_i || C_j)"},
        )
        ax.set_xlabel("j (KL to)")
        ax.set_ylabel("i (KL from)")
        ax.tick_params(axis="x", labelrotation=30)
        ax.tick_params(axis="y", labelrotation=0)
        ax.set_title(f"{result.label or result.checkpoint}\n({len(result.image_ids)} images)")
    return figure


def plot_cam_overlay(example: CamExample, heads: list[str]) -> Figure:
    """The input image with its GT boxes, then each head's CAM distribution over it (own colour scale)."""
    image = example.image.numpy()
    height, width = image.shape[:2]
    grid_h, grid_w = example.distributions[heads[0]].shape
    # the grid covers grid * stride input pixels (>= the image, the backbone rounds sizes up)
    extent = (0, grid_w * example.grid_stride, grid_h * example.grid_stride, 0)
    figure = Figure(figsize=(2.6 * (len(heads) + 1), 2.8 * height / width + 0.5), layout="constrained")
    axes = figure.subplots(1, len(heads) + 1, squeeze=False)[0]
    for ax, title in zip(axes, ["image", *heads]):
        ax.imshow(image, extent=(0, width, height, 0))
        if title != "image":
            ax.imshow(example.distributions[title].numpy(), cmap="jet", alpha=0.5, extent=extent,
                      interpolation="bilinear")
        for x1, y1, x2, y2 in example.gt_boxes.tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", linewidth=1.0))
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    figure.suptitle(f"image {example.image_id}: Grad-CAM on the encoder output", fontsize=10)
    return figure

