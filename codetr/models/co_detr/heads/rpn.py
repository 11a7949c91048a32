"""Region proposal network of Co-DETR's Faster-RCNN auxiliary head (mmdet 2.x RPNHead conventions).

Runs on all five encoder-output maps (strides 8..128). Per location: 3 scales x 3 ratios = 9 anchors
(octave base scale 4, 3 scales per octave, ratios 0.5 / 1 / 2), a class-agnostic objectness logit and
4 deltas (DeltaXYWH, means 0, stds 1). Training: MaxIoU assignment (0.7 / 0.3, low-quality matches
down to 0.3), 256 random samples at 0.5 positive fraction, sigmoid BCE on the sampled anchors and L1
on the positives' deltas, both divided by the number of sampled anchors. Proposals (no grad): per level
the top `nms_pre` anchors by objectness, decoded and clipped to the image, NMS 0.7 within each level,
the best `max_proposals` per image.

Anchor / prediction order everywhere: level-major, then location (row-major), then anchor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from codetr.models.co_detr.anchors import anchor_centre_valid, base_anchors, grid_anchors, octave_scales
from codetr.models.co_detr.assigners import MaxIoUAssigner, RandomSampler
from codetr.models.co_detr.box_coder import DeltaXYWHCoder
from codetr.models.co_detr.heads.detect import RPN_TEST, PostprocessConfig


@dataclass
class RPNTargets:
    """One image's RPN training targets over all its anchors [M] (all levels, concatenated)."""

    objectness: Tensor  # [M] float BCE target: 1 for the sampled positives, 0 elsewhere
    sampled: Tensor  # [M] bool: the anchor is in the random sample (weight 1 in the objectness loss)
    positive: Tensor  # [M] bool: sampled positives (the anchors that get a delta loss)
    deltas: Tensor  # [M, 4] encoded targets of the positives, zeros elsewhere
    num_pos: int
    num_neg: int


@dataclass
class RPNOutput:
    """Raw RPN losses and the detached proposals of every image."""

    losses: dict[str, Tensor]  # {"loss_rpn_cls", "loss_rpn_bbox"}, unweighted
    proposals: list[Tensor]  # per image [P_i, 4] xyxy abs, sorted by objectness (descending)
    scores: list[Tensor]  # per image [P_i] objectness probability


def rpn_targets_single(
    anchors: Tensor, valid: Tensor, gt_boxes: Tensor, assigner: MaxIoUAssigner, sampler: RandomSampler,
    coder: DeltaXYWHCoder,
) -> RPNTargets:
    """Assign and sample one image's anchors.

    anchors [M, 4] xyxy abs; valid [M] bool (centre inside the image, see `anchor_centre_valid`);
    gt_boxes [N, 4] xyxy abs. Invalid anchors are neither assigned nor sampled.
    """
    valid_index = valid.nonzero().squeeze(1)
    valid_anchors = anchors[valid_index]
    gt_boxes = gt_boxes.to(anchors.dtype)
    # The RPN is class-agnostic: every ground-truth box is class 0 (mmdet passes gt_labels=None).
    gt_labels = torch.zeros(len(gt_boxes), dtype=torch.long, device=anchors.device)
    assign = assigner.assign(valid_anchors, gt_boxes, gt_labels)
    sample = sampler.sample(assign, valid_anchors, gt_boxes, gt_labels)
    pos_index = valid_index[sample.pos_inds]
    neg_index = valid_index[sample.neg_inds]

    num_anchors = len(anchors)
    objectness = anchors.new_zeros(num_anchors)
    sampled = torch.zeros(num_anchors, dtype=torch.bool, device=anchors.device)
    positive = torch.zeros_like(sampled)
    deltas = anchors.new_zeros(num_anchors, 4)
    objectness[pos_index] = 1.0
    sampled[pos_index] = True
    sampled[neg_index] = True
    positive[pos_index] = True
    if len(pos_index) > 0:
        deltas[pos_index] = coder.encode(sample.pos_boxes, sample.pos_gt_boxes)
    return RPNTargets(objectness, sampled, positive, deltas, len(pos_index), len(neg_index))


def rpn_losses(logits: Tensor, deltas: Tensor, targets: list[RPNTargets]) -> dict[str, Tensor]:
    """Sigmoid BCE on sampled anchors, L1 on positives' deltas; both divided by the sample count.

    logits [B, M], deltas [B, M, 4] (all levels concatenated). The normaliser is mmdet 2.x's anchor-head
    avg_factor with sampling: sum over images of max(num_pos, 1) + max(num_neg, 1) (not all-reduced
    across ranks, as in mmdet).
    """
    logits, deltas = logits.float(), deltas.float()
    objectness = torch.stack([t.objectness for t in targets])
    sampled = torch.stack([t.sampled for t in targets])
    positive = torch.stack([t.positive for t in targets])
    delta_targets = torch.stack([t.deltas for t in targets])
    avg_factor = float(sum(max(t.num_pos, 1) + max(t.num_neg, 1) for t in targets))
    bce = F.binary_cross_entropy_with_logits(logits, objectness, reduction="none")
    loss_cls = (bce * sampled).sum() / avg_factor
    loss_bbox = (deltas[positive] - delta_targets[positive]).abs().sum() / avg_factor
    return {"loss_rpn_cls": loss_cls, "loss_rpn_bbox": loss_bbox}


@torch.no_grad()
def proposals_single(
    logits_per_level: list[Tensor], deltas_per_level: list[Tensor], anchors_per_level: list[Tensor],
    image_size_hw: tuple[int, int], coder: DeltaXYWHCoder, nms_pre: int = 4000, iou_threshold: float = 0.7,
    max_proposals: int = 1000, min_box_size: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """One image's proposals: (boxes [P, 4] xyxy abs, scores [P]), sorted by score, P <= max_proposals.

    logits_per_level [M_l], deltas_per_level [M_l, 4], anchors_per_level [M_l, 4] for each level l.
    Every anchor competes, padded locations included (like mmdet); boxes are clipped to the image's
    valid size, boxes with width or height <= min_box_size are dropped, and NMS runs within each level
    (level ids keep levels from suppressing each other).
    """
    boxes, scores, levels = [], [], []
    for level, (logits, deltas, anchors) in enumerate(zip(logits_per_level, deltas_per_level, anchors_per_level)):
        level_scores = logits.float().sigmoid()
        if 0 < nms_pre < len(level_scores):
            level_scores, keep = level_scores.topk(nms_pre)
            deltas, anchors = deltas[keep], anchors[keep]
        boxes.append(coder.decode(anchors, deltas.float(), image_size_hw))
        scores.append(level_scores)
        levels.append(torch.full_like(level_scores, level, dtype=torch.long))
    boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    large = (width > min_box_size) & (height > min_box_size)
    boxes, scores, levels = boxes[large], scores[large], levels[large]
    keep = batched_nms(boxes, scores, levels, iou_threshold)[:max_proposals]  # sorted by score
    return boxes[keep], scores[keep]


class RPNHead(nn.Module):
    """RPN on multi-level maps: shared conv tower (num_convs x 3x3 conv + ReLU), 1x1 objectness, 1x1 deltas.

    forward(maps, image_sizes, gt_boxes) -> RPNOutput with raw losses and detached proposals.
    """

    def __init__(
        self, in_channels: int = 256, feat_channels: int = 256, num_convs: int = 1,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128), octave_base_scale: float = 4.0,
        scales_per_octave: int = 3, ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        pos_iou_thr: float = 0.7, neg_iou_thr: float = 0.3, min_pos_iou: float = 0.3,
        num_samples: int = 256, pos_fraction: float = 0.5,
        nms_pre: int = 4000, nms_iou_thr: float = 0.7, max_proposals: int = 1000, min_box_size: float = 0.0,
    ) -> None:
        super().__init__()
        if num_convs < 0:
            raise ValueError(f"RPNHead: num_convs must be >= 0, got {num_convs}")
        self.strides = tuple(strides)
        scales = octave_scales(octave_base_scale, scales_per_octave)  # 4 * 2^(i/3)
        # mmdet uses the stride as each level's base size; [L, A, 4] xyxy around (0, 0).
        base = torch.stack([base_anchors(s, scales, ratios) for s in self.strides])
        self.register_buffer("base_anchors", base.float(), persistent=False)
        self.num_anchors = base.shape[1]

        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(channels, feat_channels, 3, padding=1), nn.ReLU(inplace=True)]
            channels = feat_channels
        self.tower = nn.Sequential(*layers)
        self.objectness = nn.Conv2d(channels, self.num_anchors, 1)
        self.deltas = nn.Conv2d(channels, self.num_anchors * 4, 1)
        for module in self.modules():  # mmdet RPNHead init: normal(std 0.01), zero bias
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

        self.coder = DeltaXYWHCoder((0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 1.0, 1.0))
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality=True,
                                       gt_max_assign_all=True)
        self.sampler = RandomSampler(num_samples, pos_fraction, neg_pos_ub=-1, add_gt_as_proposals=False)
        self.nms_pre = nms_pre
        self.nms_iou_thr = nms_iou_thr
        self.max_proposals = max_proposals
        self.min_box_size = min_box_size

    def anchors(self, maps: list[Tensor]) -> list[Tensor]:
        """Per level [H_l * W_l * A, 4] xyxy abs anchors (float32, on the maps' device)."""
        return [
            grid_anchors(self.base_anchors[level].float(), tuple(x.shape[-2:]), stride)
            for level, (x, stride) in enumerate(zip(maps, self.strides))
        ]

    def predict(self, maps: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per level objectness logits [B, H*W*A] and deltas [B, H*W*A, 4] (location-major, anchor inner)."""
        logits, deltas = [], []
        for x in maps:
            x = self.tower(x)
            batch = x.shape[0]
            logits.append(self.objectness(x).permute(0, 2, 3, 1).reshape(batch, -1))
            deltas.append(self.deltas(x).permute(0, 2, 3, 1).reshape(batch, -1, 4))
        return logits, deltas

    @torch.no_grad()
    def propose(self, maps: list[Tensor], image_sizes: Tensor, cfg: PostprocessConfig = RPN_TEST) -> list[Tensor]:
        """Test-time proposals (mmdet's RPNHead.predict with Co-DETR's released test_cfg.rpn by default: the top
        1000 anchors per level, NMS 0.7 within each level, 1000 per image): per image [P_i, 4] xyxy abs, clipped
        to its valid size (h, w) of image_sizes [B, 2], sorted by objectness."""
        logits, deltas = self.predict(maps)
        anchors = self.anchors(maps)
        proposals = []
        for image, size_hw in enumerate(image_sizes.tolist()):
            boxes, _ = proposals_single([x[image] for x in logits], [x[image] for x in deltas], anchors,
                                        tuple(size_hw), self.coder, cfg.nms_pre, cfg.nms_iou, cfg.max_per_img,
                                        cfg.min_box_size)
            proposals.append(boxes)
        return proposals

    def forward(self, maps: list[Tensor], image_sizes: Tensor, gt_boxes: list[Tensor]) -> RPNOutput:
        """maps: L x [B, C, H_l, W_l] at `self.strides`; image_sizes [B, 2] (h, w) valid pixels;
        gt_boxes: per image [N_i, 4] xyxy abs."""
        if len(maps) != len(self.strides):
            raise ValueError(
                f"RPNHead: expected {len(self.strides)} maps (strides {self.strides}), got {len(maps)}"
            )
        logits, deltas = self.predict(maps)
        anchors = self.anchors(maps)
        all_anchors = torch.cat(anchors)
        targets = []
        for image, boxes in enumerate(gt_boxes):
            size_hw = tuple(int(v) for v in image_sizes[image].tolist())
            valid = anchor_centre_valid(all_anchors, size_hw)
            targets.append(rpn_targets_single(all_anchors, valid, boxes, self.assigner, self.sampler, self.coder))
        losses = rpn_losses(torch.cat(logits, 1), torch.cat(deltas, 1), targets)

        proposals, scores = [], []
        for image in range(len(gt_boxes)):
            size_hw = tuple(int(v) for v in image_sizes[image].tolist())
            # detached: proposals are inputs to the RoI head, not a path for its gradients (as in mmdet)
            boxes, probs = proposals_single(
                [x[image].detach() for x in logits], [x[image].detach() for x in deltas], anchors, size_hw,
                self.coder, self.nms_pre, self.nms_iou_thr, self.max_proposals, self.min_box_size,
            )
            proposals.append(boxes)
            scores.append(probs)
        return RPNOutput(losses, proposals, scores)
