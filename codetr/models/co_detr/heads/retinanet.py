"""RetinaNet auxiliary head (Lin et al. 2017), with Co-DETR's GIoU regression on decoded boxes.

A = 9 anchors per location: sizes stride * 4 * 2^(i/3) (octave base scale 4, 3 scales per octave) x
ratios (0.5, 1, 2). Max-IoU assignment (positive >= 0.5, negative < 0.4, low-quality matches with
min IoU 0; anchors in between are ignored: no loss, not candidates). Losses over the valid anchors:
  - loss_cls: sigmoid focal loss (alpha 0.25, gamma 2) over positives and negatives / num_pos;
  - loss_bbox: GIoU of the decoded positives (DeltaXYWH, means 0, stds 1) with their GT / num_pos.
num_pos = sum over images of max(positives, 1) (mmdet's AnchorHead), averaged over ranks, clamped >= 1.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from codetr.config import AuxConfig

from codetr.models.co_detr.anchors import multilevel_anchors, octave_scales
from codetr.models.co_detr.assigners import MaxIoUAssigner
from codetr.models.co_detr.box_coder import DeltaXYWHCoder
from codetr.models.co_detr.heads.common import (
    assignment_targets,
    avg_factor,
    conv_tower,
    feature_sizes,
    flatten_level_features,
    flatten_level_predictions,
    giou_loss,
    init_head_conv,
    one_hot_labels,
    prior_bias,
    tower_out_channels,
    valid_anchor_masks,
)
from codetr.models.co_detr.heads.detect import RETINANET_TEST, Detections, PostprocessConfig, dense_detections
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates
from codetr.models.losses import sigmoid_focal_loss


class RetinaNetHead(nn.Module):
    """RetinaNet head on the auxiliary feature maps: forward(AuxInputs) -> raw losses + candidates.

    Separate cls / reg towers of num_convs (3x3 conv + GN + ReLU), shared over levels; 3x3 predictors
    for A * num_classes logits and A * 4 deltas.

    ignored_as_candidates: whether anchors the assigner ignores (IoU in [neg_iou_thr, pos_iou_thr))
    are handed on as background candidates (the released code's "everything not positive is
    background" reading) or left out (default: they are neither positives nor negatives here).
    """

    kind = "retinanet"

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> "RetinaNetHead":
        """The head as Co-DETR builds it: `cfg.num_convs` stacked convs on maps at `strides`."""
        return cls(num_classes, in_channels, num_convs=cfg.num_convs, strides=strides)

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        num_convs: int = 1,
        feat_channels: int | None = None,
        strides: Sequence[int] = (8, 16, 32, 64, 128),
        octave_base_scale: float = 4.0,
        scales_per_octave: int = 3,
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.4,
        min_pos_iou: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        ignored_as_candidates: bool = False,
        test_cfg: PostprocessConfig = RETINANET_TEST,
    ) -> None:
        super().__init__()
        feat_channels = in_channels if feat_channels is None else feat_channels
        self.num_classes = num_classes
        self.strides = list(strides)
        self.scales = octave_scales(octave_base_scale, scales_per_octave)
        self.ratios = list(ratios)
        self.num_anchors = len(self.scales) * len(self.ratios)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.ignored_as_candidates = ignored_as_candidates
        self.test_cfg = test_cfg  # `detect`'s post-processing: mmdet's RetinaNet test_cfg (no Co-DETR release has one)
        self.loss_weights = {"loss_cls": 1.0, "loss_bbox": 2.0}

        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs)
        channels = tower_out_channels(in_channels, feat_channels, num_convs)
        a = self.num_anchors
        self.cls_pred = init_head_conv(nn.Conv2d(channels, a * num_classes, 3, padding=1), bias=prior_bias(prior_prob))
        self.reg_pred = init_head_conv(nn.Conv2d(channels, a * 4, 3, padding=1))

        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou=min_pos_iou, match_low_quality=True)
        self.coder = DeltaXYWHCoder(means=(0.0, 0.0, 0.0, 0.0), stds=target_stds)

    def predict(self, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """maps: L x [B, C, H_l, W_l] -> logits [B, M, K] and deltas [B, M, 4] (float32), anchor order."""
        logits, deltas = [], []
        for x in maps:
            logits.append(self.cls_pred(self.cls_tower(x)))
            deltas.append(self.reg_pred(self.reg_tower(x)).float())  # deltas are decoded in float32
        return flatten_level_predictions(logits, self.num_classes), flatten_level_predictions(deltas, 4)

    def anchors(self, maps: list[Tensor]) -> Tensor:
        """All levels' anchors [M, 4] xyxy abs, level-concatenated (base size = stride)."""
        per_level = multilevel_anchors(
            feature_sizes(maps), self.strides, [float(s) for s in self.strides], self.scales, self.ratios, maps[0].device
        )
        return torch.cat(per_level)

    @torch.no_grad()
    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The head's own detections (mmdet's RetinaHead.predict with `self.test_cfg`), per image.

        maps: L x [B, C, H_l, W_l] at `self.strides`; image_sizes [B, 2] (h, w). Every anchor competes;
        score = sigmoid(class logit). Returns per image {"scores" [k], "labels" [k], "boxes" [k, 4] xyxy
        network-input pixels, clipped to the valid size}.
        """
        logits, deltas = self.predict(maps)
        anchors = self.anchors(maps)
        level_sizes = [int(m.shape[-2] * m.shape[-1]) * self.num_anchors for m in maps]
        results = []
        for image, size_hw in enumerate(image_sizes.tolist()):
            def decode(index: Tensor, image: int = image, size_hw: list[int] = size_hw) -> Tensor:
                return self.coder.decode(anchors[index], deltas[image][index], size_hw)

            results.append(dense_detections(logits[image].float().sigmoid(), level_sizes, decode, self.test_cfg))
        return results

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        """Predict, assign (max IoU) and compute the raw losses {"loss_cls", "loss_bbox"}.

        Candidates per image: the valid anchors (centre inside the image) that are positive or
        negative (and the ignored ones too if ignored_as_candidates); features = the input map's
        feature at the anchor's location [M', C] (keeps its grad).
        """
        if list(inputs.strides) != self.strides or len(inputs.maps) != len(self.strides):
            raise ValueError(
                f"RetinaNetHead: expected {len(self.strides)} maps at strides {self.strides}, "
                f"got {len(inputs.maps)} maps at strides {list(inputs.strides)}"
            )
        logits, deltas = self.predict(inputs.maps)
        anchors = self.anchors(inputs.maps)
        valid = valid_anchor_masks(anchors, inputs.image_sizes)  # [B, M]
        features = flatten_level_features(inputs.maps)  # [B, S, C], S locations
        location = torch.arange(anchors.shape[0], device=anchors.device) // self.num_anchors  # anchor -> location

        cls_logits, cls_labels = [], []
        pos_deltas, pos_anchors, pos_targets = [], [], []
        candidates, num_pos_per_image = [], []
        for image, (gt_boxes, gt_labels) in enumerate(zip(inputs.gt_boxes, inputs.gt_labels)):
            keep = valid[image]
            image_anchors = anchors[keep]
            assign = self.assigner.assign(image_anchors, gt_boxes, gt_labels)
            labels, targets = assignment_targets(assign.gt_inds, gt_boxes, gt_labels, self.num_classes)
            pos = assign.gt_inds > 0
            trained = assign.gt_inds >= 0  # positives and negatives; ignored anchors get no loss
            cls_logits.append(logits[image][keep][trained])
            cls_labels.append(labels[trained])
            pos_deltas.append(deltas[image][keep][pos])
            pos_anchors.append(image_anchors[pos])
            pos_targets.append(targets[pos])
            num_pos_per_image.append(int(pos.sum()))
            chosen = torch.ones_like(trained) if self.ignored_as_candidates else trained
            candidates.append(Candidates(
                boxes=image_anchors[chosen],
                labels=labels[chosen],
                target_boxes=targets[chosen],
                features=features[image], feature_index=location[keep][chosen],
                num_gt=int(gt_boxes.shape[0]),
                num_classes=self.num_classes,
            ))

        device = logits.device
        # mmdet's AnchorHead normaliser: every image counts at least one positive.
        num_pos = avg_factor(sum(max(n, 1) for n in num_pos_per_image), device)
        all_logits = torch.cat(cls_logits).float()
        targets_onehot = one_hot_labels(torch.cat(cls_labels), self.num_classes)
        loss_cls = sigmoid_focal_loss(all_logits, targets_onehot, self.focal_alpha, self.focal_gamma).sum() / num_pos
        decoded = self.coder.decode(torch.cat(pos_anchors), torch.cat(pos_deltas))
        loss_bbox = giou_loss(decoded, torch.cat(pos_targets).float()) / num_pos
        return AuxHeadOutput(losses={"loss_cls": loss_cls, "loss_bbox": loss_bbox}, candidates=candidates)
