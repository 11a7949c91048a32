"""FCOS auxiliary head (Tian et al. 2019), with the training tricks of mmdet's FCOS config.

Each feature-map cell is a point at ((x + 0.5) * stride, (y + 0.5) * stride), i.e. x * stride + stride // 2
for the even strides used here (mmdet 2.x `MlvlPointGenerator`, offset 0.5). A point is positive for a
ground-truth box when
  1. it lies inside the box's "centre region": the box shrunk to radius * stride around its centre
     (center sampling, radius 1.5), and
  2. its largest distance to the box's sides lies in the level's regress range (64 px for stride 8, ...);
if several boxes qualify, the one with the smallest area wins (the lower index on equal areas).

Tricks that are always on (the mmdet "fcos_center-normbbox-centeronreg-giou" setting): distances are
predicted in stride units (norm_on_bbox) and kept >= 0 by a ReLU, centerness comes from the regression
tower, the box loss is GIoU on decoded boxes weighted by the centerness targets.

Co-DETR specific: each point at stride s also carries a square box of side 8 * s centred on it, so FCOS
positives can become positive queries like anchors (`Candidates.boxes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.box_ops import box_area
from codetr.config import AuxConfig
from codetr.models.co_detr.anchors import anchor_centre_valid
from codetr.models.co_detr.heads.common import (
    Scale,
    avg_factor,
    conv_tower,
    flatten_level_features,
    flatten_level_predictions,
    giou_loss,
    init_head_conv,
    one_hot_labels,
    prior_bias,
    reduce_mean,
    tower_out_channels,
)
from codetr.models.co_detr.heads.detect import FCOS_TEST, Detections, PostprocessConfig, clip_to_image, dense_detections
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates
from codetr.models.losses import sigmoid_focal_loss

INF = math.inf
DEFAULT_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))


def regress_ranges_for(strides: Sequence[int]) -> tuple[tuple[float, float], ...]:
    """Each level's range of the largest point-to-side distance: (4 s, 8 s] at stride s, the first level from
    -1 and the last to infinity. DEFAULT_REGRESS_RANGES for strides 8..128; (-1, 32), (32, 64), ... for the
    4..128 of 5-level models (the paper has no FCOS on Co-DINO; this extends mmdet's pattern)."""
    ranges = [(4.0 * s, 8.0 * s) for s in strides]
    ranges[0] = (-1.0, ranges[0][1])
    ranges[-1] = (ranges[-1][0], INF)
    return tuple(ranges)


def level_points(feature_size: tuple[int, int], stride: int, device: torch.device | None = None) -> Tensor:
    """Points of one level [H*W, 2] (x, y) in pixels, row-major over (y, x) like `Tensor.flatten(2)`."""
    height, width = feature_size
    xs = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) * stride
    ys = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) * stride
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=-1)


def point_boxes(points: Tensor, strides: Tensor, scale: float = 8.0) -> Tensor:
    """Co-DETR's explicit box of a point: square of side scale * stride centred on it.

    points [P, 2] (x, y) pixels, strides [P] -> boxes [P, 4] xyxy abs.
    """
    half = 0.5 * scale * strides[:, None]
    return torch.cat((points - half, points + half), dim=-1)


def distances_to_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """points [N, 2] (x, y) and distances [N, 4] (l, t, r, b), same units -> boxes [N, 4] xyxy."""
    return torch.cat((points - distances[:, :2], points + distances[:, 2:]), dim=-1)


def centerness_targets(distances: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of positive distances [P, 4] (l, t, r, b) -> [P]."""
    left_right = distances[:, 0::2]
    top_bottom = distances[:, 1::2]
    ratio_x = left_right.min(-1).values / left_right.max(-1).values
    ratio_y = top_bottom.min(-1).values / top_bottom.max(-1).values
    return (ratio_x * ratio_y).sqrt()


def check_labels(where: str, gt_labels: list[Tensor], num_classes: int) -> None:
    """Raise ValueError unless every ground-truth label lies in [0, num_classes)."""
    for image, labels in enumerate(gt_labels):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{where}: image {image} has gt label(s) {sorted(set(labels.tolist()))} outside "
                             f"[0, {num_classes})")


@dataclass
class FCOSTargets:
    """One image's FCOS assignment of P points."""

    labels: Tensor  # [P] int64, num_classes = background
    gt_index: Tensor  # [P] int64, the assigned ground-truth box, -1 for negatives
    distances: Tensor  # [P, 4] (left, top, right, bottom) pixels to the assigned box; zeros for negatives


def fcos_targets(
    points: Tensor,
    strides: Tensor,
    regress_ranges: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    num_classes: int,
    center_sampling: bool = True,
    radius: float = 1.5,
) -> FCOSTargets:
    """Assign each point to at most one ground-truth box (mmdet FCOS semantics).

    points [P, 2] (x, y) pixels; strides [P] each point's stride; regress_ranges [P, 2] (low, high) pixels;
    gt_boxes [N, 4] xyxy abs; gt_labels [N] int64 in [0, num_classes).
    """
    num_points, num_gt = len(points), len(gt_boxes)
    if num_gt == 0:
        return FCOSTargets(
            labels=torch.full((num_points,), num_classes, dtype=torch.int64, device=points.device),
            gt_index=torch.full((num_points,), -1, dtype=torch.int64, device=points.device),
            distances=points.new_zeros(num_points, 4),
        )
    gt_boxes = gt_boxes.to(points.dtype)
    xs, ys = points[:, 0, None], points[:, 1, None]  # [P, 1]
    x1, y1, x2, y2 = gt_boxes.unbind(-1)  # [N] each
    distances = torch.stack((xs - x1, ys - y1, x2 - xs, y2 - ys), dim=-1)  # [P, N, 4]

    if center_sampling:
        # The box clipped to a square of half-side radius * stride around its centre.
        reach = radius * strides[:, None].to(points.dtype)  # [P, 1]
        cx, cy = 0.5 * (x1 + x2), 0.5 * (y1 + y2)
        inner = torch.stack(
            (
                xs - torch.maximum(cx - reach, x1),
                ys - torch.maximum(cy - reach, y1),
                torch.minimum(cx + reach, x2) - xs,
                torch.minimum(cy + reach, y2) - ys,
            ),
            dim=-1,
        )
        inside = inner.min(-1).values > 0  # [P, N]
    else:
        inside = distances.min(-1).values > 0

    max_distance = distances.max(-1).values  # [P, N]
    in_range = (max_distance >= regress_ranges[:, 0, None]) & (max_distance <= regress_ranges[:, 1, None])

    # Smallest area wins; torch.min returns the first minimum, so equal areas go to the lower index.
    areas = box_area(gt_boxes)[None, :].expand(num_points, num_gt)
    areas = torch.where(inside & in_range, areas, torch.full_like(areas, INF))
    min_area, gt_index = areas.min(dim=1)
    positive = min_area < INF

    labels = torch.where(positive, gt_labels[gt_index], torch.full_like(gt_index, num_classes))
    chosen = distances[torch.arange(num_points, device=points.device), gt_index]
    return FCOSTargets(
        labels=labels,
        gt_index=torch.where(positive, gt_index, torch.full_like(gt_index, -1)),
        distances=torch.where(positive[:, None], chosen, torch.zeros_like(chosen)),
    )


class FCOSHead(nn.Module):
    """FCOS on Co-DETR's five encoder maps; predictions, assignment and raw losses in one forward.

    Losses (raw; the caller applies `loss_weights`):
      loss_cls: sigmoid focal loss (alpha 0.25, gamma 2) over valid points / number of positives;
      loss_bbox: GIoU loss of the decoded positive boxes, weighted by their centerness targets and
        divided by the sum of those targets;
      loss_centerness: BCE of the predicted centerness against its target / number of positives.
    Normalisers are averaged over ranks when torch.distributed is initialised.

    ignore_padding: points whose centre lies in the batch padding (outside the image's valid size)
    take no part and are no candidates (default, like the anchor heads' valid flags). False: every
    point of the padded batch is a classification sample and a candidate (a negative: GT boxes lie in
    the image), as mmdet's FCOSHead, which never looks at the image sizes.
    """

    kind = "fcos"

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> "FCOSHead":
        """The head as Co-DETR builds it: `cfg.num_convs` stacked convs on maps at `strides`, with regress ranges
        for those strides."""
        return cls(num_classes, in_channels, num_convs=cfg.num_convs, ignore_padding=cfg.fcos_ignore_padding,
                   strides=strides, regress_ranges=regress_ranges_for(strides))

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        num_convs: int = 1,
        feat_channels: int | None = None,
        strides: Sequence[int] = DEFAULT_STRIDES,
        regress_ranges: Sequence[tuple[float, float]] = DEFAULT_REGRESS_RANGES,
        center_sampling: bool = True,
        center_sample_radius: float = 1.5,
        point_box_scale: float = 8.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        ignore_padding: bool = True,
        test_cfg: PostprocessConfig = FCOS_TEST,
    ) -> None:
        super().__init__()
        if len(strides) != len(regress_ranges):
            raise ValueError(f"FCOSHead: {len(strides)} strides but {len(regress_ranges)} regress ranges")
        feat_channels = in_channels if feat_channels is None else feat_channels
        self.num_classes = num_classes
        self.strides = list(strides)
        self.regress_ranges = [tuple(map(float, r)) for r in regress_ranges]
        self.center_sampling = center_sampling
        self.center_sample_radius = center_sample_radius
        self.point_box_scale = point_box_scale
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.ignore_padding = ignore_padding
        self.test_cfg = test_cfg  # `detect`'s post-processing: mmdet's FCOS test_cfg (no Co-DETR release has one)
        self.loss_weights = {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_centerness": 1.0}

        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs)
        head_in = tower_out_channels(in_channels, feat_channels, num_convs)
        self.cls_logits = init_head_conv(nn.Conv2d(head_in, num_classes, 3, padding=1), bias=prior_bias(prior_prob))
        self.bbox_pred = init_head_conv(nn.Conv2d(head_in, 4, 3, padding=1))
        self.centerness = init_head_conv(nn.Conv2d(head_in, 1, 3, padding=1))
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)

    def predict(self, maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """maps: L x [B, C, H_l, W_l] -> (cls logits [B, P, K], distances in stride units [B, P, 4] (l, t, r, b),
        centerness logits [B, P]), P = sum_l H_l * W_l, levels concatenated, each row-major over (y, x)."""
        cls_all, reg_all, ctr_all = [], [], []
        for x, scale in zip(maps, self.scales):
            cls_feat = self.cls_tower(x)
            reg_feat = self.reg_tower(x)
            cls_all.append(self.cls_logits(cls_feat))
            # norm_on_bbox: distances / stride, kept >= 0 by a ReLU (not exp)
            reg_all.append(F.relu(scale(self.bbox_pred(reg_feat))))
            ctr_all.append(self.centerness(reg_feat))  # centerness_on_reg
        # float32 for the losses, also under autocast
        cls_logits = flatten_level_predictions(cls_all, self.num_classes).float()
        distances = flatten_level_predictions(reg_all, 4).float()
        centerness = flatten_level_predictions(ctr_all, 1).squeeze(-1).float()
        return cls_logits, distances, centerness

    def priors(self, maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """All levels' points [P, 2] (x, y) pixels, their strides [P] and regress ranges [P, 2]."""
        device = maps[0].device
        points, strides, ranges = [], [], []
        for x, stride, regress_range in zip(maps, self.strides, self.regress_ranges):
            level = level_points(tuple(x.shape[-2:]), stride, device)
            points.append(level)
            strides.append(torch.full((len(level),), float(stride), device=device))
            ranges.append(level.new_tensor(regress_range).expand(len(level), 2))
        return torch.cat(points), torch.cat(strides), torch.cat(ranges)

    @torch.no_grad()
    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The head's own detections (mmdet's FCOSHead.predict with `self.test_cfg`), per image.

        maps: L x [B, C, H_l, W_l] at `self.strides`; image_sizes [B, 2] (h, w). Every point competes;
        score = sigmoid(class logit) * sigmoid(centerness), boxes = point -+ distances x stride, clipped.
        Returns per image {"scores" [k], "labels" [k], "boxes" [k, 4] xyxy network-input pixels}.
        """
        logits, distances, centerness = self.predict(maps)
        points, strides, _ = self.priors(maps)
        level_sizes = [int(m.shape[-2] * m.shape[-1]) for m in maps]
        results = []
        for image, size_hw in enumerate(image_sizes.tolist()):
            def decode(index: Tensor, image: int = image, size_hw: list[int] = size_hw) -> Tensor:
                boxes = distances_to_boxes(points[index], distances[image][index] * strides[index, None])
                return clip_to_image(boxes, size_hw)

            results.append(dense_detections(logits[image].sigmoid(), level_sizes, decode, self.test_cfg,
                                            centerness[image].sigmoid()))
        return results

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        if len(inputs.maps) != len(self.strides) or list(inputs.strides) != self.strides:
            raise ValueError(f"FCOSHead: expected maps at strides {self.strides}, got {list(inputs.strides)}")
        check_labels("FCOSHead", inputs.gt_labels, self.num_classes)
        cls_logits, distances_pred, ctr_logits = self.predict(inputs.maps)
        points, strides, ranges = self.priors(inputs.maps)
        boxes = point_boxes(points, strides, self.point_box_scale)
        features = flatten_level_features(inputs.maps)  # [B, P, C], keeps the graph

        candidates, cls_logits_valid, labels_valid = [], [], []
        pos_pred, pos_ctr, pos_target, pos_points, pos_strides = [], [], [], [], []
        for image, (gt_boxes, gt_labels) in enumerate(zip(inputs.gt_boxes, inputs.gt_labels)):
            if self.ignore_padding:
                valid = anchor_centre_valid(boxes, inputs.image_sizes[image])
            else:
                valid = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
            targets = fcos_targets(
                points[valid], strides[valid], ranges[valid], gt_boxes, gt_labels, self.num_classes,
                self.center_sampling, self.center_sample_radius,
            )
            positive = targets.labels < self.num_classes
            cls_logits_valid.append(cls_logits[image][valid])
            labels_valid.append(targets.labels)
            pos_pred.append(distances_pred[image][valid][positive])
            pos_ctr.append(ctr_logits[image][valid][positive])
            pos_target.append(targets.distances[positive])
            pos_points.append(points[valid][positive])
            pos_strides.append(strides[valid][positive])
            target_boxes = torch.zeros_like(boxes[valid])
            target_boxes[positive] = gt_boxes[targets.gt_index[positive]].to(target_boxes.dtype)
            candidates.append(Candidates(
                boxes=boxes[valid], labels=targets.labels, target_boxes=target_boxes,
                features=features[image][valid], num_gt=len(gt_boxes), num_classes=self.num_classes,
            ))
        losses = self.losses(
            torch.cat(cls_logits_valid), torch.cat(labels_valid), torch.cat(pos_pred), torch.cat(pos_ctr),
            torch.cat(pos_target), torch.cat(pos_points), torch.cat(pos_strides),
        )
        return AuxHeadOutput(losses=losses, candidates=candidates)

    def losses(
        self, cls_logits: Tensor, labels: Tensor, pred_distances: Tensor, ctr_logits: Tensor,
        target_distances: Tensor, points: Tensor, strides: Tensor,
    ) -> dict[str, Tensor]:
        """Raw losses of a batch. cls_logits [M, K] and labels [M] (num_classes = background) over all valid
        points; then the N positives': pred_distances [N, 4] stride units, ctr_logits [N], target_distances
        [N, 4] pixels, points [N, 2] pixels, strides [N]. N = 0 gives zero box / centerness terms."""
        num_pos = avg_factor(len(points), cls_logits.device)
        onehot = one_hot_labels(labels, self.num_classes)
        loss_cls = sigmoid_focal_loss(cls_logits, onehot, self.focal_alpha, self.focal_gamma).sum() / num_pos

        centerness = centerness_targets(target_distances)
        pred_boxes = distances_to_boxes(points, pred_distances * strides[:, None])
        target_boxes = distances_to_boxes(points, target_distances)
        # Reduced on every rank, positives or not (a collective skipped on one rank would hang the others).
        # mmdet clamps this sum of values in (0, 1] at 1e-6, not 1.
        centerness_sum = reduce_mean(centerness.sum().detach()).clamp(min=1e-6)
        loss_bbox = giou_loss(pred_boxes, target_boxes, centerness) / centerness_sum
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_logits, centerness, reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_ctr}
