"""Building blocks shared by the one-stage auxiliary heads (ATSS, RetinaNet, FCOS, GFL).

Layout conventions: a level's prediction map [B, A * K, H, W] is flattened to [B, H * W * A, K] in the
anchor order of codetr.models.co_detr.anchors (row-major locations, the A anchors of a location
consecutive), so channel a * K + k is anchor a's k-th output.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from codetr.box_ops import elementwise_generalized_box_iou
from codetr.models.co_detr.anchors import anchor_centre_valid

GN_GROUPS = 32


def conv_tower(in_channels: int, feat_channels: int, num_convs: int) -> nn.Sequential:
    """num_convs x (3x3 conv, no bias + GroupNorm(32) + ReLU); an empty Sequential (identity) for 0.

    The first conv maps in_channels -> feat_channels, the rest keep feat_channels. Convs get
    normal(0, 0.01) weights, as mmdet's heads.
    """
    if num_convs < 0:
        raise ValueError(f"conv_tower: num_convs must be >= 0, got {num_convs}")
    layers: list[nn.Module] = []
    for i in range(num_convs):
        conv = nn.Conv2d(in_channels if i == 0 else feat_channels, feat_channels, 3, padding=1, bias=False)
        init_head_conv(conv)
        layers += [conv, nn.GroupNorm(GN_GROUPS, feat_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def tower_out_channels(in_channels: int, feat_channels: int, num_convs: int) -> int:
    """Channels that come out of conv_tower (the input's when the tower is empty)."""
    return feat_channels if num_convs > 0 else in_channels


def prior_bias(prior_prob: float = 0.01) -> float:
    """Bias that makes sigmoid start at prior_prob: -log((1 - p) / p)."""
    return -math.log((1.0 - prior_prob) / prior_prob)


def init_head_conv(conv: nn.Conv2d, std: float = 0.01, bias: float = 0.0) -> nn.Conv2d:
    """Weights ~ normal(0, std), bias = `bias` (if the conv has one); returns the conv."""
    nn.init.normal_(conv.weight, mean=0.0, std=std)
    if conv.bias is not None:
        nn.init.constant_(conv.bias, bias)
    return conv


class Scale(nn.Module):
    """A learned scalar that multiplies its input (one per level on the regression branch)."""

    def __init__(self, init: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def flatten_level_predictions(preds: list[Tensor], channels_per_anchor: int) -> Tensor:
    """Per-level maps [B, A * K, H_l, W_l] -> [B, sum_l H_l * W_l * A, K] (K = channels_per_anchor)."""
    batch = preds[0].shape[0]
    return torch.cat([p.permute(0, 2, 3, 1).reshape(batch, -1, channels_per_anchor) for p in preds], dim=1)


def flatten_level_features(maps: list[Tensor], anchors_per_location: int = 1) -> Tensor:
    """Per-level maps [B, C, H_l, W_l] -> [B, sum_l H_l * W_l * A, C]: each location's feature
    repeated for its A anchors (same order as flatten_level_predictions). Keeps the graph."""
    flat = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # [B, S, C]
    if anchors_per_location > 1:
        flat = flat.repeat_interleave(anchors_per_location, dim=1)
    return flat


def feature_sizes(maps: list[Tensor]) -> list[tuple[int, int]]:
    """(H_l, W_l) of each map [B, C, H_l, W_l]."""
    return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]


def valid_anchor_masks(anchors: Tensor, image_sizes: Tensor) -> Tensor:
    """[B, M] bool: anchors [M, 4] xyxy abs whose centre lies inside each image's valid (h, w) [B, 2]."""
    return torch.stack([anchor_centre_valid(anchors, size) for size in image_sizes.tolist()], dim=0)


def reduce_mean(tensor: Tensor) -> Tensor:
    """Mean of a tensor over distributed ranks (itself when not distributed). Does not modify its input."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return tensor


def avg_factor(count: Tensor | float | int, device: torch.device) -> float:
    """mmdet's loss normaliser: a count (e.g. of positives) averaged over ranks, clamped >= 1."""
    value = torch.as_tensor(count, dtype=torch.float32, device=device)
    return max(float(reduce_mean(value)), 1.0)


def giou_loss(pred_boxes: Tensor, target_boxes: Tensor, weights: Tensor | None = None) -> Tensor:
    """Sum over pairs of weight * (1 - GIoU(pred, target)); pred/target [P, 4] xyxy abs, weights [P].

    Returns a scalar (0 with grad when P == 0). The caller divides by its normaliser.
    """
    loss = 1.0 - elementwise_generalized_box_iou(pred_boxes.float(), target_boxes.float())
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    return loss.sum()


def assignment_targets(gt_inds: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-candidate targets of an assignment (gt_inds [M]: 0 negative, -1 ignored, k >= 1 -> GT k - 1).

    Returns labels [M] int64 (num_classes = background, also for ignored rows) and target boxes [M, 4]
    (the assigned GT box xyxy abs, zeros elsewhere).
    """
    pos = gt_inds > 0
    labels = torch.full_like(gt_inds, num_classes)
    targets = gt_boxes.new_zeros((gt_inds.shape[0], 4))
    matched = gt_inds[pos] - 1
    labels[pos] = gt_labels[matched].long()
    targets[pos] = gt_boxes[matched].to(targets.dtype)
    return labels, targets


def one_hot_labels(labels: Tensor, num_classes: int) -> Tensor:
    """labels [P] in 0..num_classes (num_classes = background) -> [P, num_classes] float targets."""
    return torch.nn.functional.one_hot(labels, num_classes + 1)[:, :num_classes].float()


def level_counts(mask: Tensor, num_level_items: list[int]) -> list[int]:
    """How many True entries of mask [M] (levels concatenated, num_level_items[l] each) each level holds."""
    return [int(part.sum()) for part in mask.split(num_level_items)]
