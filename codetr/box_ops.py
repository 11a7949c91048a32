"""Box format conversions, IoU / generalized IoU, and small box helpers.

Formats used across codetr (the format is part of every variable name that carries boxes):
  - ``cxcywh``: (center_x, center_y, width, height)
  - ``xyxy``:   (x1, y1, x2, y2), top-left and bottom-right corners
  - ``_norm``:  coordinates divided by the image width / height, in [0, 1]
  - ``_abs``:   coordinates in pixels

Degenerate boxes (zero or negative width / height) are tolerated everywhere: widths are clamped at
0 and every denominator at ``eps``, so IoU and GIoU stay finite (and so do their gradients) instead
of raising, because predicted boxes early in training are often degenerate.
"""

import torch
from torch import Tensor

# Smallest denominator for union / enclosing areas. Only reached by degenerate boxes: for any box
# with a positive area the results equal the textbook definitions.
_AREA_EPS = 1e-7


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """Convert boxes [..., 4] from (cx, cy, w, h) to (x1, y1, x2, y2); any leading dims."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w, 0.5 * h
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """Convert boxes [..., 4] from (x1, y1, x2, y2) to (cx, cy, w, h); any leading dims."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack((0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1), dim=-1)


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """Area of boxes [..., 4] in xyxy format -> [...]; inverted sides count as 0 (not negative)."""
    wh = (boxes_xyxy[..., 2:] - boxes_xyxy[..., :2]).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _iou_and_union(boxes1: Tensor, boxes2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """IoU and union of xyxy boxes [..., 4] whose leading dims broadcast against each other."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter_wh = (bottom_right - top_left).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union.clamp(min=eps), union


def _giou(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """GIoU of xyxy boxes [..., 4] whose leading dims broadcast against each other."""
    iou, union = _iou_and_union(boxes1, boxes2, eps)
    # Smallest box enclosing both; its area is >= union for valid boxes.
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    enclosing_wh = (bottom_right - top_left).clamp(min=0)
    enclosing = (enclosing_wh[..., 0] * enclosing_wh[..., 1]).clamp(min=eps)
    return iou - (enclosing - union) / enclosing


def box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = _AREA_EPS) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of boxes1 [N, 4] and boxes2 [M, 4], both xyxy.

    Returns (iou [N, M], union [N, M]); the union is the raw (unclamped) area.
    """
    return _iou_and_union(boxes1[:, None, :], boxes2[None, :, :], eps)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = _AREA_EPS) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al. 2019) of boxes1 [N, 4] and boxes2 [M, 4], xyxy.

    Returns [N, M] with values in [-1, 1].
    """
    return _giou(boxes1[:, None, :], boxes2[None, :, :], eps)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = _AREA_EPS) -> Tensor:
    """IoU of matched pairs: boxes1 [N, 4] with boxes2 [N, 4], xyxy -> [N] (the quality focal loss's target)."""
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"elementwise_box_iou: shapes must match, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
    return _iou_and_union(boxes1, boxes2, eps)[0]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = _AREA_EPS) -> Tensor:
    """Generalized IoU of matched pairs: boxes1 [N, 4] with boxes2 [N, 4], xyxy -> [N].

    Equal to the diagonal of ``generalized_box_iou`` but O(N) instead of O(N^2); losses use this.
    """
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"elementwise_generalized_box_iou: shapes must match, got {tuple(boxes1.shape)} "
            f"and {tuple(boxes2.shape)}"
        )
    return _giou(boxes1, boxes2, eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of x (any shape), with x clamped into [eps, 1 - eps] so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def scale_boxes(boxes_cxcywh_norm: Tensor, sizes_hw: Tensor) -> Tensor:
    """Turn normalised cxcywh boxes [B, Q, 4] into absolute xyxy boxes [B, Q, 4] (post-processing).

    sizes_hw [B, 2] holds each image's (height, width) in pixels, the size the boxes refer to
    (usually the original image size, so that results match the annotation file).
    """
    boxes_xyxy_norm = box_cxcywh_to_xyxy(boxes_cxcywh_norm)
    height, width = sizes_hw.to(boxes_xyxy_norm.dtype).unbind(-1)
    scale = torch.stack((width, height, width, height), dim=-1)  # [B, 4]
    return boxes_xyxy_norm * scale[:, None, :]


def clip_boxes(boxes_xyxy_abs: Tensor, sizes_hw: Tensor) -> Tensor:
    """Clamp absolute xyxy boxes [B, Q, 4] to their image: x to [0, width], y to [0, height].

    sizes_hw [B, 2] holds each image's (height, width) in pixels.
    """
    height, width = sizes_hw.to(boxes_xyxy_abs.dtype).unbind(-1)
    upper = torch.stack((width, height, width, height), dim=-1)[:, None, :]  # [B, 1, 4]
    return torch.minimum(boxes_xyxy_abs.clamp(min=0), upper)
