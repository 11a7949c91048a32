"""Delta (dx, dy, dw, dh) box coding of mmdet 2.x's DeltaXYWHBBoxCoder (no "+1" in widths).

For a reference box p (anchor / proposal) and a target g, both xyxy with centres (px, py), sizes (pw, ph):
    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = log(gw / pw),  dh = log(gh / ph)
and the stored deltas are (d - means) / stds. Equal to torchvision's BoxCoder with weights = 1 / stds
when means are 0 (pinned by tests/test_anchors_assigners.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class DeltaXYWHCoder:
    """Encode target boxes relative to reference boxes, and decode predicted deltas back to boxes."""

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_clip: float = math.log(1000.0 / 16.0),
    ) -> None:
        if len(means) != 4 or len(stds) != 4:
            raise ValueError(f"DeltaXYWHCoder: means and stds need 4 values each, got {means!r} and {stds!r}")
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.wh_clip = float(wh_clip)

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        means = torch.tensor(self.means, dtype=like.dtype, device=like.device)
        stds = torch.tensor(self.stds, dtype=like.dtype, device=like.device)
        return means, stds

    def encode(self, boxes: Tensor, gt: Tensor) -> Tensor:
        """Deltas [N, 4] that turn reference boxes [N, 4] into targets gt [N, 4] (both xyxy abs)."""
        boxes = boxes.to(gt.dtype)
        pw = boxes[:, 2] - boxes[:, 0]
        ph = boxes[:, 3] - boxes[:, 1]
        px = boxes[:, 0] + 0.5 * pw
        py = boxes[:, 1] + 0.5 * ph
        gw = gt[:, 2] - gt[:, 0]
        gh = gt[:, 3] - gt[:, 1]
        gx = gt[:, 0] + 0.5 * gw
        gy = gt[:, 1] + 0.5 * gh
        deltas = torch.stack(((gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)), dim=-1)
        means, stds = self._stats(deltas)
        return (deltas - means) / stds

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape_hw: tuple[int, int] | Tensor | None = None) -> Tensor:
        """Apply deltas [N, 4] to reference boxes [N, 4] xyxy abs -> boxes [N, 4] xyxy abs.

        dw and dh are clamped to [-wh_clip, wh_clip] (a box grows or shrinks at most 1000 / 16 times).
        With max_shape_hw = (h, w), x is clipped to [0, w] and y to [0, h].
        """
        means, stds = self._stats(deltas)
        deltas = deltas * stds + means
        boxes = boxes.to(deltas.dtype)
        pw = boxes[:, 2] - boxes[:, 0]
        ph = boxes[:, 3] - boxes[:, 1]
        px = boxes[:, 0] + 0.5 * pw
        py = boxes[:, 1] + 0.5 * ph
        dw = deltas[:, 2].clamp(min=-self.wh_clip, max=self.wh_clip)
        dh = deltas[:, 3].clamp(min=-self.wh_clip, max=self.wh_clip)
        cx = px + pw * deltas[:, 0]
        cy = py + ph * deltas[:, 1]
        half_w = 0.5 * pw * dw.exp()
        half_h = 0.5 * ph * dh.exp()
        x1, y1, x2, y2 = cx - half_w, cy - half_h, cx + half_w, cy + half_h
        if max_shape_hw is not None:
            height, width = (float(v) for v in max_shape_hw)
            x1, x2 = x1.clamp(min=0, max=width), x2.clamp(min=0, max=width)
            y1, y2 = y1.clamp(min=0, max=height), y2.clamp(min=0, max=height)
        return torch.stack((x1, y1, x2, y2), dim=-1)
