"""GFL auxiliary head: Generalized Focal Loss (Li et al. 2020), as mmdet 2.x's GFLHead trains it.

One square anchor of side 8 * stride per location (centred on (x * stride, y * stride), mmdet's offset 0),
ATSS assignment (topk 9), and two ideas:
  - the classification score IS the localisation quality: a positive's target on its class channel is the
    IoU of its (detached) decoded box with its GT, every other channel 0 -> quality focal loss (QFL);
  - each side's distance from the anchor centre, in stride units, is a discrete distribution over the bins
    0, 1, ..., reg_max; the prediction is its mean (the "integral"), trained with GIoU on the decoded box
    and the distribution focal loss (DFL) that pushes mass onto the two bins around the target.
The box and DFL terms of a positive are weighted by its highest (detached) class score, and divided by
the sum of those weights.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.box_ops import box_area
from codetr.config import AuxConfig
from codetr.models.co_detr.anchors import multilevel_anchors, octave_scales
from codetr.models.co_detr.assigners import ATSSAssigner
from codetr.models.co_detr.heads.common import (
    Scale,
    assignment_targets,
    avg_factor,
    conv_tower,
    feature_sizes,
    flatten_level_features,
    flatten_level_predictions,
    giou_loss,
    init_head_conv,
    level_counts,
    prior_bias,
    tower_out_channels,
    valid_anchor_masks,
)
from codetr.models.co_detr.heads.detect import GFL_TEST, Detections, PostprocessConfig, clip_to_image, dense_detections
from codetr.models.co_detr.heads.fcos import check_labels, distances_to_boxes
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates

# mmdet's bbox2distance keeps targets this far below reg_max, so the upper bin of DFL stays <= reg_max.
DISTANCE_EPS = 0.1


def integral_distances(distribution_logits: Tensor, reg_max: int) -> Tensor:
    """Expected distance of each side: [..., 4 * (reg_max + 1)] logits -> [..., 4] = sum_i softmax(p)_i * i.

    Bins are 0, 1, ..., reg_max (stride units); channels are side-major (l, t, r, b), reg_max + 1 each.
    """
    probs = distribution_logits.reshape(*distribution_logits.shape[:-1], 4, reg_max + 1).softmax(-1)
    bins = torch.arange(reg_max + 1, dtype=probs.dtype, device=probs.device)
    return probs @ bins


def boxes_to_distances(centres: Tensor, boxes: Tensor, max_distance: float) -> Tensor:
    """(l, t, r, b) [N, 4] from centres [N, 2] to boxes [N, 4] xyxy, clamped into [0, max_distance - 0.1]."""
    distances = torch.cat((centres - boxes[:, :2], boxes[:, 2:] - centres), dim=-1)
    return distances.clamp(min=0.0, max=max_distance - DISTANCE_EPS)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of matched pairs boxes1 [N, 4] / boxes2 [N, 4], xyxy -> [N] (0 for degenerate pairs)."""
    inter_wh = (torch.minimum(boxes1[:, 2:], boxes2[:, 2:]) - torch.maximum(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    return inter / (box_area(boxes1) + box_area(boxes2) - inter).clamp(min=eps)


def quality_focal_loss(logits: Tensor, quality_targets: Tensor, beta: float = 2.0) -> Tensor:
    """QFL, elementwise: BCE(sigmoid(x), y) * |y - sigmoid(x)| ** beta; logits / targets [..., K], y in [0, 1].

    For hard targets y in {0, 1} this is the sigmoid focal loss with gamma = beta and no alpha weighting.
    """
    ce = F.binary_cross_entropy_with_logits(logits, quality_targets, reduction="none")
    return ce * (quality_targets - logits.sigmoid()).abs().pow(beta)


def distribution_focal_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """DFL: logits [N, n + 1] over bins 0..n, targets [N] in [0, n) -> [N].

    Cross-entropy towards the two bins around y, weighted by their linear-interpolation weights:
    (floor(y) + 1 - y) * CE(floor(y)) + (y - floor(y)) * CE(floor(y) + 1).
    """
    left = targets.floor().long()
    weight_left = (left + 1).to(targets.dtype) - targets
    weight_right = targets - left.to(targets.dtype)
    return (F.cross_entropy(logits, left, reduction="none") * weight_left
            + F.cross_entropy(logits, left + 1, reduction="none") * weight_right)


@dataclass
class PositiveSet:
    """The positives' predictions and targets, P rows each (one image, or a batch after `cat`)."""

    logits: Tensor  # [P, K] class-quality logits
    distributions: Tensor  # [P, 4 * (reg_max + 1)] distribution logits
    anchors: Tensor  # [P, 4] xyxy abs
    strides: Tensor  # [P]
    target_boxes: Tensor  # [P, 4] xyxy abs, the assigned GT
    labels: Tensor  # [P] int64

    @staticmethod
    def cat(parts: list[PositiveSet]) -> PositiveSet:
        return PositiveSet(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(PositiveSet)))


class GFLHead(nn.Module):
    """GFL head on the auxiliary feature maps: forward(AuxInputs) -> raw losses + candidates.

    Separate cls / reg towers of num_convs (3x3 conv + GN + ReLU), shared over levels; predictors (3x3 convs)
    for num_classes joint class-quality logits and 4 * (reg_max + 1) distance-distribution logits (times a
    learned per-level Scale). Raw losses (the caller applies `loss_weights`):
      loss_cls: QFL (beta 2) over all valid anchors / num_pos;
      loss_bbox: GIoU of the decoded positive boxes, weighted by their max class score / sum of weights;
      loss_dfl: DFL of the 4 sides of each positive, same weights, / (4 * sum of weights).
    num_pos follows the released code: sum over images of max(positives, 1), averaged over ranks, >= 1;
    the weight sum is averaged over ranks and clamped >= 1.
    """

    kind = "gfl"

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> "GFLHead":
        """The head as Co-DETR builds it: `cfg.num_convs` stacked convs on maps at `strides`."""
        return cls(num_classes, in_channels, num_convs=cfg.num_convs, strides=strides)

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        num_convs: int = 1,
        feat_channels: int | None = None,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        octave_base_scale: float = 8.0,
        reg_max: int = 16,
        topk: int = 9,
        qfl_beta: float = 2.0,
        prior_prob: float = 0.01,
        test_cfg: PostprocessConfig = GFL_TEST,
    ) -> None:
        super().__init__()
        feat_channels = in_channels if feat_channels is None else feat_channels
        self.num_classes = num_classes
        self.strides = list(strides)
        self.test_cfg = test_cfg  # `detect`'s post-processing: mmdet's GFL test_cfg (no Co-DETR release has one)
        self.anchor_scales = octave_scales(octave_base_scale, 1)
        self.reg_max = reg_max
        self.qfl_beta = qfl_beta
        self.loss_weights = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_dfl": 0.25}

        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs)
        channels = tower_out_channels(in_channels, feat_channels, num_convs)
        self.cls_pred = init_head_conv(nn.Conv2d(channels, num_classes, 3, padding=1), bias=prior_bias(prior_prob))
        self.reg_pred = init_head_conv(nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1))
        self.level_scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.assigner = ATSSAssigner(topk)

    def predict(self, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """maps: L x [B, C, H_l, W_l] -> class-quality logits [B, M, K] and distribution logits
        [B, M, 4 * (reg_max + 1)], float32, M = sum_l H_l * W_l in anchor order."""
        logits, distributions = [], []
        for x, scale in zip(maps, self.level_scales):
            logits.append(self.cls_pred(self.cls_tower(x)))
            distributions.append(scale(self.reg_pred(self.reg_tower(x))))
        return (
            flatten_level_predictions(logits, self.num_classes).float(),
            flatten_level_predictions(distributions, 4 * (self.reg_max + 1)).float(),
        )

    def anchors(self, maps: list[Tensor]) -> tuple[Tensor, list[int], Tensor]:
        """All levels' anchors [M, 4] xyxy abs, the count per level, and each anchor's stride [M]."""
        per_level = multilevel_anchors(
            feature_sizes(maps), self.strides, [float(s) for s in self.strides], self.anchor_scales, (1.0,), maps[0].device
        )
        strides = [torch.full((len(a),), float(s), device=maps[0].device) for a, s in zip(per_level, self.strides)]
        return torch.cat(per_level), [len(a) for a in per_level], torch.cat(strides)

    @torch.no_grad()
    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The head's own detections (mmdet's GFLHead.predict with `self.test_cfg`), per image.

        maps: L x [B, C, H_l, W_l] at `self.strides`; image_sizes [B, 2] (h, w). Score = sigmoid(class-quality
        logit); box = anchor centre -+ the distributions' expected distances x stride, clipped. Returns per
        image {"scores" [k], "labels" [k], "boxes" [k, 4] xyxy network-input pixels}.
        """
        logits, distributions = self.predict(maps)
        anchors, num_level_anchors, strides = self.anchors(maps)
        centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
        results = []
        for image, size_hw in enumerate(image_sizes.tolist()):
            def decode(index: Tensor, image: int = image, size_hw: list[int] = size_hw) -> Tensor:
                distances = integral_distances(distributions[image][index], self.reg_max) * strides[index, None]
                return clip_to_image(distances_to_boxes(centres[index], distances), size_hw)

            results.append(dense_detections(logits[image].sigmoid(), num_level_anchors, decode, self.test_cfg))
        return results

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        """Predict, assign (ATSS) and compute the raw losses {"loss_cls", "loss_bbox", "loss_dfl"}.

        Candidates per image: every valid anchor (centre inside the image) with its assignment;
        features = the input map's feature at the anchor's location [M_valid, C] (keeps its grad).
        """
        if list(inputs.strides) != self.strides or len(inputs.maps) != len(self.strides):
            raise ValueError(f"GFLHead: expected {len(self.strides)} maps at strides {self.strides}, "
                             f"got {len(inputs.maps)} maps at strides {list(inputs.strides)}")
        check_labels("GFLHead", inputs.gt_labels, self.num_classes)
        logits, distributions = self.predict(inputs.maps)
        anchors, num_level_anchors, strides = self.anchors(inputs.maps)
        valid = valid_anchor_masks(anchors, inputs.image_sizes)  # [B, M]
        features = flatten_level_features(inputs.maps)  # [B, M, C]

        cls_logits, cls_labels, positives, candidates = [], [], [], []
        for image, (gt_boxes, gt_labels) in enumerate(zip(inputs.gt_boxes, inputs.gt_labels)):
            keep = valid[image]
            image_anchors = anchors[keep]
            assign = self.assigner.assign(image_anchors, level_counts(keep, num_level_anchors), gt_boxes, gt_labels)
            labels, targets = assignment_targets(assign.gt_inds, gt_boxes, gt_labels, self.num_classes)
            pos = assign.gt_inds > 0
            cls_logits.append(logits[image][keep])
            cls_labels.append(labels)
            positives.append(PositiveSet(
                logits[image][keep][pos], distributions[image][keep][pos], image_anchors[pos],
                strides[keep][pos], targets[pos].float(), labels[pos],
            ))
            candidates.append(Candidates(
                boxes=image_anchors, labels=labels, target_boxes=targets, features=features[image][keep],
                num_gt=int(gt_boxes.shape[0]), num_classes=self.num_classes,
            ))
        num_pos = avg_factor(sum(max(len(p.labels), 1) for p in positives), logits.device)
        losses = self.losses(torch.cat(cls_logits), torch.cat(cls_labels), PositiveSet.cat(positives), num_pos)
        return AuxHeadOutput(losses=losses, candidates=candidates)

    def losses(self, cls_logits: Tensor, cls_labels: Tensor, pos: PositiveSet, num_pos: float) -> dict[str, Tensor]:
        """cls_logits [M, K] / cls_labels [M] (num_classes = background) over the batch's valid anchors,
        `pos` its positives; num_pos the classification normaliser."""
        # Everything of the box branch in stride units, as mmdet (GIoU and IoU do not depend on the unit).
        centres = 0.5 * (pos.anchors[:, :2] + pos.anchors[:, 2:]) / pos.strides[:, None]
        target_boxes = pos.target_boxes / pos.strides[:, None]
        pred_boxes = distances_to_boxes(centres, integral_distances(pos.distributions, self.reg_max))

        # QFL targets: IoU of the decoded box with its GT on the class channel, 0 on the others.
        quality = torch.zeros_like(cls_logits)
        is_pos = cls_labels < self.num_classes
        quality[is_pos, cls_labels[is_pos]] = aligned_iou(pred_boxes.detach(), target_boxes)
        loss_cls = quality_focal_loss(cls_logits, quality, self.qfl_beta).sum() / num_pos

        weights = pos.logits.detach().sigmoid().max(dim=-1).values  # [P]
        weight_sum = avg_factor(weights.sum(), cls_logits.device)
        loss_bbox = giou_loss(pred_boxes, target_boxes, weights) / weight_sum
        target_distances = boxes_to_distances(centres, target_boxes, self.reg_max)
        dfl = distribution_focal_loss(pos.distributions.reshape(-1, self.reg_max + 1), target_distances.reshape(-1))
        loss_dfl = (dfl * weights.repeat_interleave(4)).sum() / (4.0 * weight_sum)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_dfl": loss_dfl}
