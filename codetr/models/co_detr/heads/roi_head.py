"""RoI head of Co-DETR's Faster-RCNN auxiliary head (mmdet 2.x StandardRoIHead + Shared2FCBBoxHead).

Per image: the RPN proposals plus the ground-truth boxes are assigned by MaxIoU (0.5 / 0.5, no
low-quality matches) and 512 of them are sampled at 0.25 positive fraction. Each sampled RoI is pooled
7x7 (RoIAlign, aligned=True, adaptive sampling) from ONE of the maps at strides 8..64, chosen by its
scale (mmdet's SingleRoIExtractor mapping, not torchvision's MultiScaleRoIAlign), then flattened through
two shared FC-1024 + ReLU layers into a softmax classifier (num_classes + 1, background last) and
class-specific deltas (DeltaXYWH, stds 0.1, 0.1, 0.2, 0.2). Losses: cross-entropy averaged over the
sampled RoIs, GIoU on the decoded boxes of the positives divided by the number of sampled RoIs.

The sampled RoIs (positives and negatives) are this head's candidates for Co-DETR's positive queries;
their content feature is the pooled 7x7 feature averaged over the grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from codetr.models.co_detr.roi_align import roi_align

from codetr.box_ops import elementwise_generalized_box_iou
from codetr.models.co_detr.assigners import MaxIoUAssigner, RandomSampler
from codetr.models.co_detr.box_coder import DeltaXYWHCoder
from codetr.models.co_detr.heads.detect import (
    RCNN_TEST, Detections, PostprocessConfig, empty_detections, multiclass_detections,
)
from codetr.models.co_detr.types import Candidates


def map_roi_levels(boxes_xyxy: Tensor, num_levels: int, finest_scale: float = 112.0) -> Tensor:
    """Level index [K] (int64, 0..num_levels-1) of each RoI [K, 4] xyxy abs, by its scale sqrt(w * h).

    level = floor(log2(scale / finest_scale + 1e-6)), clamped: with finest_scale s, level 0 takes scales
    below 2s, level 1 takes [2s, 4s), and so on (mmdet's SingleRoIExtractor.map_roi_levels).
    """
    wh = boxes_xyxy[:, 2:] - boxes_xyxy[:, :2]
    scale = (wh[:, 0] * wh[:, 1]).sqrt()
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(
    maps: list[Tensor], rois: Tensor, strides: list[int] | tuple[int, ...], output_size: int = 7,
    finest_scale: float = 112.0,
) -> Tensor:
    """Pool each RoI from the map of its level (`map_roi_levels`).

    maps: L x [B, C, H_l, W_l]; rois [K, 5] (batch index, x1, y1, x2, y2) in absolute pixels.
    Returns [K, C, output_size, output_size] in the RoIs' order. RoIAlign with aligned=True (the
    half-pixel shift of mmcv's RoIAlign(aligned=True)) and sampling_ratio=0 (adaptive).
    """
    levels = map_roi_levels(rois[:, 1:], len(maps), finest_scale)
    pooled, order = [], []
    for level, (x, stride) in enumerate(zip(maps, strides)):
        index = (levels == level).nonzero().squeeze(1)
        if len(index) == 0:
            continue
        level_rois = rois[index]
        if not torch.is_autocast_enabled(x.device.type):
            # torchvision's kernel wants one dtype; under autocast the RoIs stay float32 (both kernels
            # compute positions in float32 then), as bf16 would round 1000 px to a multiple of 8
            level_rois = level_rois.to(x.dtype)
        pooled.append(roi_align(x, level_rois, output_size, 1.0 / stride, sampling_ratio=0, aligned=True))
        order.append(index)
    if not pooled:
        return maps[0].new_zeros(0, maps[0].shape[1], output_size, output_size)
    pooled, order = torch.cat(pooled), torch.cat(order)
    # back to the RoIs' order: row i goes to order[i]; index_copy's backward is a gather, where
    # pooled[argsort(order)]'s would be an accumulating scatter (~3x slower on the CPU)
    return pooled.new_empty(pooled.shape).index_copy(0, order, pooled)


class Shared2FCBBoxHead(nn.Module):
    """Flatten [K, C, S, S] -> FC -> ReLU -> FC -> ReLU -> (class logits [K, num_classes + 1],
    class-specific deltas [K, 4 * num_classes]); background is the last logit."""

    def __init__(self, num_classes: int, in_channels: int = 256, roi_size: int = 7, fc_channels: int = 1024) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fc1 = nn.Linear(in_channels * roi_size * roi_size, fc_channels)
        self.fc2 = nn.Linear(fc_channels, fc_channels)
        self.cls = nn.Linear(fc_channels, num_classes + 1)
        self.reg = nn.Linear(fc_channels, 4 * num_classes)
        # mmdet init: Xavier-uniform shared FCs, normal(0.01) classifier, normal(0.001) regressor, zero biases
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.normal_(self.reg.weight, std=0.001)
        for fc in (self.fc1, self.fc2, self.cls, self.reg):
            nn.init.zeros_(fc.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        x = F.relu(self.fc1(roi_feats.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.cls(x), self.reg(x)


@dataclass
class RoISample:
    """One image's sampled RoIs: positives first, then negatives (mmdet's SamplingResult order)."""

    boxes: Tensor  # [K, 4] xyxy abs
    labels: Tensor  # [K] int64, num_classes for negatives
    target_boxes: Tensor  # [K, 4] assigned ground truth xyxy abs, zeros for negatives


@dataclass
class RoIHeadOutput:
    losses: dict[str, Tensor]  # {"loss_cls", "loss_bbox"}, unweighted
    candidates: list[Candidates]


def sample_rois(
    proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int, assigner: MaxIoUAssigner,
    sampler: RandomSampler,
) -> RoISample:
    """Assign one image's proposals [P, 4] (+ the GT boxes, if the sampler adds them) and sample them."""
    gt_boxes = gt_boxes.to(proposals.dtype)
    assign = assigner.assign(proposals, gt_boxes, gt_labels)
    sample = sampler.sample(assign, proposals, gt_boxes, gt_labels)
    num_pos, num_neg = len(sample.pos_boxes), len(sample.neg_boxes)
    boxes = torch.cat((sample.pos_boxes, sample.neg_boxes))
    labels = torch.full((num_pos + num_neg,), num_classes, dtype=torch.long, device=proposals.device)
    labels[:num_pos] = sample.pos_gt_labels
    target_boxes = proposals.new_zeros(num_pos + num_neg, 4)
    target_boxes[:num_pos] = sample.pos_gt_boxes
    return RoISample(boxes, labels, target_boxes)


def roi_losses(
    cls_logits: Tensor, deltas: Tensor, rois: Tensor, labels: Tensor, target_boxes: Tensor,
    coder: DeltaXYWHCoder,
) -> dict[str, Tensor]:
    """CE over all sampled RoIs and GIoU on the positives' decoded boxes (the deltas of their GT class).

    cls_logits [K, C + 1], deltas [K, 4 C], rois [K, 4] xyxy abs, labels [K] (C = background),
    target_boxes [K, 4] xyxy abs. Normalisers as mmdet's BBoxHead.loss: both terms are divided by the
    number of sampled RoIs of the batch (clamped >= 1 for the CE; the GIoU sum is 0 without positives).
    Decoded boxes are not clipped to the image (as in mmdet's loss).
    """
    num_rois = len(labels)
    num_classes = cls_logits.shape[1] - 1
    loss_cls = F.cross_entropy(cls_logits.float(), labels, reduction="sum") / max(num_rois, 1)
    positive = labels < num_classes
    pos_deltas = deltas.float().view(num_rois, num_classes, 4)[positive, labels[positive]]  # [P, 4]
    if len(pos_deltas) == 0:
        # keeps the regressor in the graph with a zero loss (nothing to regress)
        return {"loss_cls": loss_cls, "loss_bbox": pos_deltas.sum()}
    pred_boxes = coder.decode(rois[positive].float(), pos_deltas, None)
    giou = elementwise_generalized_box_iou(pred_boxes, target_boxes[positive].float())
    return {"loss_cls": loss_cls, "loss_bbox": (1.0 - giou).sum() / num_rois}


class RoIHead(nn.Module):
    """Assign + sample proposals, pool RoI features, classify and regress; returns losses and candidates."""

    def __init__(
        self, num_classes: int, in_channels: int = 256, strides: tuple[int, ...] = (8, 16, 32, 64),
        roi_size: int = 7, finest_scale: float = 112.0, fc_channels: int = 1024,
        pos_iou_thr: float = 0.5, neg_iou_thr: float = 0.5, min_pos_iou: float = 0.5,
        num_samples: int = 512, pos_fraction: float = 0.25, add_gt_as_proposals: bool = True,
        target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2),
    ) -> None:
        super().__init__()
        if not math.isfinite(finest_scale) or finest_scale <= 0:
            raise ValueError(f"RoIHead: finest_scale must be a positive number, got {finest_scale}")
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.roi_size = roi_size
        self.finest_scale = finest_scale
        self.bbox_head = Shared2FCBBoxHead(num_classes, in_channels, roi_size, fc_channels)
        self.coder = DeltaXYWHCoder((0.0, 0.0, 0.0, 0.0), target_stds)
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=False,
                                       gt_max_assign_all=True)
        self.sampler = RandomSampler(num_samples, pos_fraction, neg_pos_ub=-1,
                                     add_gt_as_proposals=add_gt_as_proposals)

    @torch.no_grad()
    def detect(self, maps: list[Tensor], proposals: list[Tensor], image_sizes: Tensor,
               cfg: PostprocessConfig = RCNN_TEST) -> list[Detections]:
        """Test-time detections (mmdet's StandardRoIHead.predict; Co-DETR's released test_cfg.rcnn by default).

        maps: L x [B, C, H_l, W_l] at `self.strides`; proposals: per image [P_i, 4] xyxy abs; image_sizes
        [B, 2] (h, w). Each proposal gives every class its softmax probability and its class-specific box,
        clipped to the image; pairs above score_thr go through per-class NMS and the best max_per_img stay.
        """
        counts = [len(p) for p in proposals]
        if sum(counts) == 0:
            return [empty_detections(maps[0].device) for _ in proposals]
        boxes = torch.cat(proposals).float()
        image_index = torch.cat([torch.full((n,), i, dtype=boxes.dtype, device=boxes.device) for i, n in enumerate(counts)])
        rois = torch.cat((image_index[:, None], boxes), 1)  # [P, 5]
        roi_feats = multilevel_roi_align(maps, rois, self.strides, self.roi_size, self.finest_scale)
        cls_logits, deltas = self.bbox_head(roi_feats)
        results = []
        k = self.num_classes
        for image_boxes, logits, image_deltas, size_hw in zip(boxes.split(counts), cls_logits.float().split(counts),
                                                               deltas.float().split(counts), image_sizes.tolist()):
            scores = logits.softmax(-1)[:, :k]  # [P_i, K], background dropped
            decoded = self.coder.decode(image_boxes.repeat_interleave(k, 0), image_deltas.reshape(-1, 4), size_hw)
            results.append(multiclass_detections(decoded.view(-1, k, 4), scores, cfg))
        return results

    def forward(
        self, maps: list[Tensor], proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor],
    ) -> RoIHeadOutput:
        """maps: L x [B, C, H_l, W_l] at `self.strides`; proposals: per image [P_i, 4] xyxy abs (no grad);
        gt_boxes / gt_labels: per image [N_i, 4] xyxy abs / [N_i] int64."""
        if len(maps) != len(self.strides):
            raise ValueError(
                f"RoIHead: expected {len(self.strides)} maps (strides {self.strides}), got {len(maps)}"
            )
        samples = [
            sample_rois(boxes.float(), gt, gt_cls, self.num_classes, self.assigner, self.sampler)
            for boxes, gt, gt_cls in zip(proposals, gt_boxes, gt_labels)
        ]
        boxes = torch.cat([s.boxes for s in samples])
        image_index = torch.cat([torch.full_like(s.labels, i) for i, s in enumerate(samples)])
        rois = torch.cat((image_index[:, None].to(boxes.dtype), boxes), 1)  # [K, 5]
        roi_feats = multilevel_roi_align(maps, rois, self.strides, self.roi_size, self.finest_scale)
        cls_logits, deltas = self.bbox_head(roi_feats)
        labels = torch.cat([s.labels for s in samples])
        target_boxes = torch.cat([s.target_boxes for s in samples])
        losses = roi_losses(cls_logits, deltas, boxes, labels, target_boxes, self.coder)

        features = roi_feats.mean(dim=(2, 3)).split([len(s.labels) for s in samples])  # [K_i, C] per image
        candidates = [
            Candidates(s.boxes, s.labels, s.target_boxes, f, num_gt=len(b), num_classes=self.num_classes)
            for s, f, b in zip(samples, features, gt_boxes)
        ]
        return RoIHeadOutput(losses, candidates)
