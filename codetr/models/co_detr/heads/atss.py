"""ATSS auxiliary head (Zhang et al. 2020), as Co-DETR's released CoATSSHead trains it.

One square anchor of side 8 * stride per location (octave base scale 8, one scale, ratio 1), adaptive
training sample selection (topk 9 per level), and three losses over the valid anchors:
  - loss_cls: sigmoid focal loss (alpha 0.25, gamma 2) over all valid anchors / num_pos;
  - loss_bbox: GIoU of the decoded boxes (DeltaXYWH, stds 0.1, 0.1, 0.2, 0.2) with their GT, weighted
    by the centerness targets and divided by the centerness targets' sum;
  - loss_centerness: BCE of the predicted centerness logit against the centerness target / num_pos.
Normalisers as the released code: num_pos = sum over images of max(positives, 1), averaged over ranks,
clamped >= 1; the centerness sum is averaged over ranks and clamped >= 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.config import AuxConfig

from codetr.models.co_detr.anchors import multilevel_anchors, octave_scales
from codetr.models.co_detr.assigners import ATSSAssigner
from codetr.models.co_detr.box_coder import DeltaXYWHCoder
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
    one_hot_labels,
    prior_bias,
    tower_out_channels,
    valid_anchor_masks,
)
from codetr.models.co_detr.heads.detect import ATSS_TEST, Detections, PostprocessConfig, dense_detections
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates
from codetr.models.losses import sigmoid_focal_loss


def unmap(values: Tensor, keep: Tensor, fill: float | int) -> Tensor:
    """values [M_keep, ...] of the kept rows -> [M, ...] with `fill` in the other rows (mmdet's unmap)."""
    full = values.new_full((keep.shape[0], *values.shape[1:]), fill)
    full[keep] = values
    return full


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS centerness of each anchor centre inside its GT: sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)).

    anchors [P, 4], gt_boxes [P, 4] xyxy abs, matched pairs; the centre must lie inside the box
    (true for ATSS positives), else the value is undefined. Returns [P] in (0, 1].
    """
    cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
    cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
    left, right = cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx
    top, bottom = cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy
    ratio_x = torch.minimum(left, right) / torch.maximum(left, right)
    ratio_y = torch.minimum(top, bottom) / torch.maximum(top, bottom)
    return torch.sqrt(ratio_x * ratio_y)


class ATSSHead(nn.Module):
    """ATSS head on the auxiliary feature maps: forward(AuxInputs) -> raw losses + candidates.

    Separate cls / reg towers of num_convs (3x3 conv + GN + ReLU), shared over levels; predictors
    (3x3 convs) for A * num_classes logits, A * 4 deltas (times a learned per-level Scale) and A
    centerness logits, the latter from the reg tower.
    """

    kind = "atss"

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> "ATSSHead":
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
        scales_per_octave: int = 1,
        ratios: Sequence[float] = (1.0,),
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        test_cfg: PostprocessConfig = ATSS_TEST,
    ) -> None:
        super().__init__()
        feat_channels = in_channels if feat_channels is None else feat_channels
        self.num_classes = num_classes
        self.strides = list(strides)
        self.scales = octave_scales(octave_base_scale, scales_per_octave)
        self.ratios = list(ratios)
        self.num_anchors = len(self.scales) * len(self.ratios)
        self.test_cfg = test_cfg  # `detect`'s post-processing: Co-DETR's released ATSS test_cfg
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.loss_weights = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0}

        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs)
        channels = tower_out_channels(in_channels, feat_channels, num_convs)
        a = self.num_anchors
        self.cls_pred = init_head_conv(nn.Conv2d(channels, a * num_classes, 3, padding=1), bias=prior_bias(prior_prob))
        self.reg_pred = init_head_conv(nn.Conv2d(channels, a * 4, 3, padding=1))
        self.centerness_pred = init_head_conv(nn.Conv2d(channels, a, 3, padding=1))
        self.level_scales = nn.ModuleList(Scale(1.0) for _ in self.strides)

        self.assigner = ATSSAssigner(topk)
        self.coder = DeltaXYWHCoder(means=(0.0, 0.0, 0.0, 0.0), stds=target_stds)

    def predict(self, maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """maps: L x [B, C, H_l, W_l] -> logits [B, M, K], deltas [B, M, 4] (float32), centerness logits [B, M].

        M = sum_l H_l * W_l * A, in anchor order (see common.flatten_level_predictions).
        """
        logits, deltas, centerness = [], [], []
        for x, scale in zip(maps, self.level_scales):
            cls_feat = self.cls_tower(x)
            reg_feat = self.reg_tower(x)
            logits.append(self.cls_pred(cls_feat))
            deltas.append(scale(self.reg_pred(reg_feat)).float())  # deltas are decoded in float32
            centerness.append(self.centerness_pred(reg_feat))
        return (
            flatten_level_predictions(logits, self.num_classes),
            flatten_level_predictions(deltas, 4),
            flatten_level_predictions(centerness, 1).squeeze(-1),
        )

    def anchors(self, maps: list[Tensor]) -> tuple[Tensor, list[int]]:
        """All levels' anchors [M, 4] xyxy abs (level-concatenated) and the count per level."""
        per_level = multilevel_anchors(
            feature_sizes(maps), self.strides, [float(s) for s in self.strides], self.scales, self.ratios, maps[0].device
        )
        return torch.cat(per_level), [len(a) for a in per_level]

    @torch.no_grad()
    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The head's own detections (mmdet's ATSSHead.predict with `self.test_cfg`), per image.

        maps: L x [B, C, H_l, W_l] at `self.strides`; image_sizes [B, 2] (h, w) valid pixels. Every anchor
        competes (padding included, as mmdet); score = sigmoid(class logit) * sigmoid(centerness), the top
        nms_pre pairs per level ranked by the class probability alone. Returns per image {"scores" [k],
        "labels" [k], "boxes" [k, 4] xyxy in network-input pixels, clipped to the valid size}.
        """
        logits, deltas, centerness = self.predict(maps)
        anchors, num_level_anchors = self.anchors(maps)
        results = []
        for image, size_hw in enumerate(image_sizes.tolist()):
            def decode(index: Tensor, image: int = image, size_hw: list[int] = size_hw) -> Tensor:
                return self.coder.decode(anchors[index], deltas[image][index], size_hw)

            results.append(dense_detections(logits[image].float().sigmoid(), num_level_anchors, decode, self.test_cfg,
                                            centerness[image].float().sigmoid()))
        return results

    def _check(self, inputs: AuxInputs) -> None:
        if list(inputs.strides) != self.strides or len(inputs.maps) != len(self.strides):
            raise ValueError(
                f"{type(self).__name__}: expected {len(self.strides)} maps at strides {self.strides}, "
                f"got {len(inputs.maps)} maps at strides {list(inputs.strides)}"
            )

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        """Predict, assign (ATSS) and compute the raw losses {"loss_cls", "loss_bbox", "loss_centerness"}.

        Candidates per image: every anchor, as the released head returns them (mmdet's unmap): a valid anchor
        (centre inside the image) with its assignment, an invalid one as a zero box labelled background (the
        positive queries may be padded with it); features = the input map's feature at the anchor's
        location (keeps its grad).
        """
        self._check(inputs)
        logits, deltas, centerness = self.predict(inputs.maps)
        anchors, num_level_anchors = self.anchors(inputs.maps)
        valid = valid_anchor_masks(anchors, inputs.image_sizes)  # [B, M]
        features = flatten_level_features(inputs.maps)  # [B, S, C], S locations
        location = torch.arange(anchors.shape[0], device=anchors.device) // self.num_anchors  # anchor -> location

        cls_logits, cls_labels = [], []
        pos_deltas, pos_anchors, pos_targets, pos_centerness = [], [], [], []
        candidates, num_pos_per_image = [], []
        for image, (gt_boxes, gt_labels) in enumerate(zip(inputs.gt_boxes, inputs.gt_labels)):
            keep = valid[image]
            image_anchors = anchors[keep]
            assign = self.assigner.assign(image_anchors, level_counts(keep, num_level_anchors), gt_boxes, gt_labels)
            labels, targets = assignment_targets(assign.gt_inds, gt_boxes, gt_labels, self.num_classes)
            pos = assign.gt_inds > 0
            cls_logits.append(logits[image][keep])
            cls_labels.append(labels)
            pos_deltas.append(deltas[image][keep][pos])
            pos_anchors.append(image_anchors[pos])
            pos_targets.append(targets[pos])
            pos_centerness.append(centerness[image][keep][pos])
            num_pos_per_image.append(int(pos.sum()))
            candidates.append(Candidates(
                boxes=unmap(image_anchors, keep, 0.0),
                labels=unmap(labels, keep, self.num_classes),
                target_boxes=unmap(targets, keep, 0.0),
                features=features[image], feature_index=location,
                num_gt=int(gt_boxes.shape[0]),
                num_classes=self.num_classes,
            ))

        device = logits.device
        # Released normaliser: every image counts at least one positive.
        num_pos = avg_factor(sum(max(n, 1) for n in num_pos_per_image), device)
        all_logits = torch.cat(cls_logits).float()
        targets_onehot = one_hot_labels(torch.cat(cls_labels), self.num_classes)
        loss_cls = sigmoid_focal_loss(all_logits, targets_onehot, self.focal_alpha, self.focal_gamma).sum() / num_pos

        pos_anchors_t, pos_targets_t = torch.cat(pos_anchors), torch.cat(pos_targets).float()
        ctr_targets = centerness_targets(pos_anchors_t, pos_targets_t)
        decoded = self.coder.decode(pos_anchors_t, torch.cat(pos_deltas))
        loss_bbox = giou_loss(decoded, pos_targets_t, weights=ctr_targets) / avg_factor(ctr_targets.sum(), device)
        ctr_logits = torch.cat(pos_centerness).float()
        loss_centerness = F.binary_cross_entropy_with_logits(ctr_logits, ctr_targets, reduction="sum") / num_pos
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_centerness}
        return AuxHeadOutput(losses=losses, candidates=candidates)
