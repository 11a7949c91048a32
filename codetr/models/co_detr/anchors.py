"""Anchor boxes on feature-map grids, with mmdet 2.x conventions (the released Co-DETR's).

Conventions (pinned by tests/test_anchors_assigners.py):
  - an anchor of grid cell (x, y) at stride s is centred on (x * s, y * s): centre offset 0, so the
    first anchor sits on the image's top-left corner (not at s / 2);
  - base anchors are not rounded (torchvision's AnchorGenerator rounds them to integers);
  - order: row-major over locations (y outer, x inner), the A anchors of a location consecutive,
    and within a location ratios outer, scales inner;
  - ratio = height / width: h = size * sqrt(ratio), w = size / sqrt(ratio).
All boxes are xyxy in absolute pixels of the network input.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def base_anchors(base_size: float, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The A = len(ratios) * len(scales) anchors of one location, centred on 0 -> [A, 4] xyxy float32.

    Anchor (r, s) (index r * len(scales) + s) has width base_size * scales[s] / sqrt(ratios[r]) and
    height base_size * scales[s] * sqrt(ratios[r]).
    """
    if len(scales) == 0 or len(ratios) == 0:
        raise ValueError(f"base_anchors: need at least one scale and one ratio, got {scales!r} and {ratios!r}")
    scales_t = torch.as_tensor(scales, dtype=torch.float32)
    h_ratios = torch.as_tensor(ratios, dtype=torch.float32).sqrt()
    w_ratios = 1.0 / h_ratios
    widths = (base_size * w_ratios[:, None] * scales_t[None, :]).reshape(-1)  # ratios outer, scales inner
    heights = (base_size * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack((-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights), dim=-1)


def grid_anchors(base: Tensor, feature_size: tuple[int, int], stride: int) -> Tensor:
    """Tile base anchors [A, 4] over a feature map of size (H, W) -> [H * W * A, 4] xyxy abs.

    Row (y * W + x) * A + a is base anchor a shifted to (x * stride, y * stride).
    """
    height, width = feature_size
    shifts_x = torch.arange(width, device=base.device, dtype=base.dtype) * stride
    shifts_y = torch.arange(height, device=base.device, dtype=base.dtype) * stride
    grid_y, grid_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
    shifts = torch.stack((grid_x, grid_y, grid_x, grid_y), dim=-1).reshape(-1, 1, 4)  # [H*W, 1, 4]
    return (shifts + base[None]).reshape(-1, 4)


def anchor_centre_valid(anchors: Tensor, image_size_hw: tuple[int, int] | Tensor) -> Tensor:
    """[M] bool: True where the anchor's centre lies inside the valid (unpadded) image [0, w) x [0, h).

    anchors [M, 4] xyxy abs. For grid anchors this equals mmdet's valid flags: a location (x, y) at
    stride s is valid iff x < ceil(w / s) and y < ceil(h / s).
    """
    height, width = (float(v) for v in image_size_hw)
    cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
    cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
    return (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)


def octave_scales(octave_base_scale: float, scales_per_octave: int) -> list[float]:
    """mmdet's anchor scales: octave_base_scale * 2 ** (i / scales_per_octave), i = 0..scales_per_octave-1."""
    return [octave_base_scale * 2.0 ** (i / scales_per_octave) for i in range(scales_per_octave)]


def multilevel_anchors(
    feature_sizes: list[tuple[int, int]],
    strides: list[int],
    base_size_per_level: list[float],
    scales: Sequence[float],
    ratios: Sequence[float],
    device: torch.device | str | None = None,
) -> list[Tensor]:
    """Anchors of every level: list over levels of [H_l * W_l * A, 4] xyxy abs (float32, on `device`).

    Level l uses base size base_size_per_level[l] (mmdet: the stride) times each scale.
    """
    if not len(feature_sizes) == len(strides) == len(base_size_per_level):
        raise ValueError(
            f"multilevel_anchors: {len(feature_sizes)} feature sizes, {len(strides)} strides and "
            f"{len(base_size_per_level)} base sizes must be as many"
        )
    anchors = []
    for size, stride, base_size in zip(feature_sizes, strides, base_size_per_level):
        base = base_anchors(base_size, scales, ratios).to(device)
        anchors.append(grid_anchors(base, (int(size[0]), int(size[1])), stride))
    return anchors


__all__ = [
    "anchor_centre_valid",
    "base_anchors",
    "grid_anchors",
    "multilevel_anchors",
    "octave_scales",
]
