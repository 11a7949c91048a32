"""PAA auxiliary head: Probabilistic Anchor Assignment (Kim & Lee, ECCV 2020), as mmdet 2.x's PAAHead.

Architecture as ATSS (one square anchor of side 8 * stride per location, cls / reg towers, a learned
per-level Scale on the deltas); its 1-channel branch on the reg tower predicts the IoU of the decoded
box with its GT instead of centerness. Assignment per image:
  1. pre-assignment: MaxIoUAssigner(pos 0.1, neg 0.1, min_pos_iou 0), low-quality matches on;
  2. score of every pre-assigned positive (no grad) = focal loss summed over classes + 1.3 * (1 - GIoU)
     of its decoded box with its GT (mmdet's loss modules carry their loss weights into this score);
  3. per GT and per level, the topk (9) lowest-score anchors are its candidates; a GT with fewer than
     two candidates gets no positive;
  4. a two-component 1-D Gaussian mixture is fitted to the GT's sorted candidate scores (init means
     (min, max), variances 1, weights 0.5; see gmm.py); positives = the candidates of component 0 (the
     low-score one), in ascending score order, up to and including the one with the highest mixture
     log-density (mmdet's gmm_separation_scheme, scheme (c) of the paper's Fig. 3);
  5. every other pre-assigned positive becomes a negative (nothing is ignored).
Losses over the valid anchors (released defaults; weights {"loss_cls": 1.0, "loss_bbox": 1.3, "loss_iou": 0.5}):
  - loss_cls: sigmoid focal loss (alpha 0.25, gamma 2) / max(num_pos, num_images);
  - loss_bbox: GIoU of the decoded positives with their GT, weighted by the (detached) IoU target
    clamped >= 1e-12, divided by the IoU targets' sum (+ float32 eps);
  - loss_iou: BCE of the IoU logit against the IoU of the decoded (detached) box with its GT / num_pos.
Normalisers are mmdet PAAHead's: num_pos is this process's count (PAAHead does not average it over ranks).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.box_ops import box_area, box_iou, elementwise_generalized_box_iou
from codetr.models.co_detr.assigners import NEGATIVE, MaxIoUAssigner
from codetr.models.co_detr.heads.atss import ATSSHead
from codetr.models.co_detr.heads.common import (
    assignment_targets,
    flatten_level_features,
    giou_loss,
    level_counts,
    one_hot_labels,
    valid_anchor_masks,
)
from codetr.models.co_detr.heads.detect import PAA_TEST, Detections, PostprocessConfig, multiclass_detections
from codetr.models.co_detr.heads.fcos import check_labels
from codetr.models.co_detr.heads.gmm import fit_gaussian_mixture_1d
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates
from codetr.models.losses import sigmoid_focal_loss

IOU_WEIGHT_MIN = 1e-12  # mmdet's EPS on the IoU weights of the box loss
VOTING_SIGMA = 0.025  # score voting: a candidate's weight is exp(-(1 - IoU)^2 / sigma) x its score (mmdet's value)
VOTING_MIN_IOU = 0.01  # candidates overlapping a detection by IoU <= this do not vote for it


def paired_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs boxes1 [P, 4] / boxes2 [P, 4] xyxy -> [P] (0 for an empty union)."""
    top_left = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    union = box_area(boxes1) + box_area(boxes2) - inter
    return inter / union.clamp(min=1e-6)


def _rank_in_groups(keys: Tensor) -> Tensor:
    """Position of each element within its run of equal keys; keys [P] must be sorted (grouped)."""
    first = torch.searchsorted(keys, keys, right=False)
    return torch.arange(keys.numel(), device=keys.device) - first


def select_candidates(gt_index: Tensor, level: Tensor, scores: Tensor, topk: int) -> Tensor:
    """Per (GT, level) group, the topk lowest scores; returns indices into the inputs [P], grouped by GT
    (ascending) and sorted by score within a GT. Ties go to the lower input index (inputs in anchor order).

    gt_index [P] int64 (0-based), level [P] int64, scores [P].
    """
    by_score = torch.sort(scores, stable=True).indices
    num_levels = int(level.max()) + 1 if level.numel() else 1
    group = gt_index * num_levels + level
    by_group = by_score[torch.sort(group[by_score], stable=True).indices]  # (gt, level) groups, scores ascending
    kept = by_group[_rank_in_groups(group[by_group]) < topk]
    kept = kept[torch.sort(scores[kept], stable=True).indices]
    return kept[torch.sort(gt_index[kept], stable=True).indices]


def paa_reassign(gt_inds: Tensor, scores: Tensor, num_level_anchors: list[int], topk: int) -> Tensor:
    """PAA's second assignment stage on one image's anchors (levels concatenated).

    gt_inds [M] int64: the pre-assignment (0 negative, -1 ignored, k >= 1 -> GT k - 1); scores [M]:
    the per-anchor score (loss), read at the pre-assigned positives only. Returns the new gt_inds [M]:
    the GMM-selected positives keep their GT, the other pre-assigned positives become 0 (negative),
    ignored anchors stay -1.
    """
    if sum(num_level_anchors) != gt_inds.shape[0]:
        raise ValueError(f"paa_reassign: num_level_anchors sums to {sum(num_level_anchors)}, "
                         f"but there are {gt_inds.shape[0]} anchors")
    result = gt_inds.clone()
    pos_index = torch.nonzero(gt_inds > 0).flatten()  # [P] ascending
    if pos_index.numel() == 0:
        return result
    result[pos_index] = NEGATIVE
    device = gt_inds.device
    level_ends = torch.tensor(num_level_anchors, device=device).cumsum(0)
    level = torch.bucketize(pos_index, level_ends, right=True)
    gt_index = gt_inds[pos_index] - 1
    pos_scores = scores[pos_index].detach()
    kept = select_candidates(gt_index, level, pos_scores, topk)  # grouped by GT, ascending scores

    # one row per GT, the candidates' scores in ascending order, padded on the right
    kept_gt = gt_index[kept]
    column = _rank_in_groups(kept_gt)
    num_rows = int(gt_index.max()) + 1
    width = int(column.max()) + 1
    values = torch.zeros(num_rows, width, dtype=torch.float64, device=device)
    mask = torch.zeros(num_rows, width, dtype=torch.bool, device=device)
    anchor = torch.zeros(num_rows, width, dtype=torch.long, device=device)
    values[kept_gt, column] = pos_scores[kept].double()
    mask[kept_gt, column] = True
    anchor[kept_gt, column] = pos_index[kept]

    # The fit is tiny and iterative (a convergence check each step): run it on the CPU, in float64, as
    # mmdet does with scikit-learn.
    values_cpu = values.cpu()
    mixture = fit_gaussian_mixture_1d(values_cpu, mask.cpu())
    component = mixture.predict(values_cpu).to(device)
    log_density = mixture.score_samples(values_cpu).to(device)
    fittable = mask.sum(dim=1) >= 2  # a mixture of two needs two samples; otherwise no positive
    foreground = (component == 0) & mask & fittable[:, None]
    best = torch.where(foreground, log_density, torch.full_like(log_density, float("-inf"))).argmax(dim=1)
    columns = torch.arange(width, device=device)
    selected = foreground & (columns[None, :] <= best[:, None])
    rows = torch.arange(num_rows, device=device)[:, None].expand(-1, width)
    result[anchor[selected]] = rows[selected] + 1
    return result


def top_priors_per_level(prior_scores: Tensor, level_sizes: list[int], nms_pre: int) -> Tensor:
    """Index [n] (into M) of the nms_pre best priors of every level by prior_scores [M] (levels concatenated,
    level_sizes[l] each); a level with at most nms_pre priors (or nms_pre <= 0) keeps them all."""
    kept, start = [], 0
    for level in prior_scores.split(level_sizes):
        index = torch.arange(len(level), device=level.device)
        if 0 < nms_pre < len(level):
            index = level.topk(nms_pre).indices
        kept.append(index + start)
        start += len(level)
    return torch.cat(kept)


def score_voting(detections: Detections, boxes_xyxy_abs: Tensor, class_scores: Tensor, score_thr: float) -> Detections:
    """PAA's score voting (mmdet's PAAHead.score_voting): each detection's box becomes the average of the boxes
    of its class scoring above score_thr that overlap it by IoU > 0.01, weighted by exp(-(1 - IoU)^2 / 0.025)
    x their score; its score stays. detections after NMS; boxes [n, 4] / class_scores [n, K] every candidate
    before NMS. Output ordered by class, then as the input within a class (mmdet's order). A detection
    without any voter (a zero-area box) keeps its own box, where mmdet's becomes NaN.
    """
    voted_boxes, voted_scores, voted_labels = [], [], []
    for cls in range(class_scores.shape[1]):
        mine = detections["labels"] == cls
        candidates = class_scores[:, cls] > score_thr
        if not mine.any() or not candidates.any():
            continue
        candidate_boxes, candidate_scores = boxes_xyxy_abs[candidates], class_scores[candidates, cls]
        iou = box_iou(detections["boxes"][mine], candidate_boxes)[0]  # [D, C]
        weights = torch.exp(-(1 - iou) ** 2 / VOTING_SIGMA) * candidate_scores * (iou > VOTING_MIN_IOU)
        total = weights.sum(1, keepdim=True)
        # a degenerate (zero-area) detection overlaps nothing, itself included: it keeps its box (mmdet's is NaN)
        voted = torch.where(total > 0, weights @ candidate_boxes / total.clamp(min=torch.finfo(total.dtype).tiny),
                            detections["boxes"][mine])
        voted_boxes.append(voted)
        voted_scores.append(detections["scores"][mine])
        voted_labels.append(detections["labels"][mine])
    if not voted_boxes:
        return detections
    return {"scores": torch.cat(voted_scores), "labels": torch.cat(voted_labels), "boxes": torch.cat(voted_boxes)}


class PAAHead(ATSSHead):
    """PAA head on the auxiliary feature maps: forward(AuxInputs) -> raw losses + candidates.

    Inherits ATSS's towers, predictors, anchors and Scales; `centerness_pred` (mmdet's naming, kept)
    predicts the IoU logit here. The score used by the assignment is
    score_cls_weight * focal + score_bbox_weight * (1 - GIoU), mmdet's loss weights 1.0 and 1.3.
    """

    kind = "paa"

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
        pos_iou_thr: float = 0.1,
        neg_iou_thr: float = 0.1,
        min_pos_iou: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        score_cls_weight: float = 1.0,
        score_bbox_weight: float = 1.3,
        test_cfg: PostprocessConfig = PAA_TEST,
        with_score_voting: bool = True,
    ) -> None:
        if topk < 1:
            raise ValueError(f"PAAHead: topk must be >= 1, got {topk}")
        super().__init__(num_classes, in_channels, num_convs, feat_channels, strides, octave_base_scale,
                         scales_per_octave, ratios, topk, focal_alpha, focal_gamma, prior_prob, target_stds)
        self.topk = topk
        self.score_cls_weight = score_cls_weight
        self.score_bbox_weight = score_bbox_weight
        # PAA's pre-assignment replaces ATSS's assigner
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou)
        self.loss_weights = {"loss_cls": 1.0, "loss_bbox": 1.3, "loss_iou": 0.5}
        # `detect`'s post-processing: mmdet's PAA test_cfg (no Co-DETR release has one; PAAHead ignores its
        # min_bbox_size) and mmdet PAAHead's score voting
        self.test_cfg = test_cfg
        self.with_score_voting = with_score_voting

    @torch.no_grad()
    def anchor_scores(self, anchors: Tensor, logits: Tensor, deltas: Tensor, labels: Tensor,
                      target_boxes: Tensor) -> Tensor:
        """Assignment score of anchors [P, 4] xyxy abs with their predictions (logits [P, K], deltas [P, 4])
        against their pre-assigned GT (labels [P], target_boxes [P, 4] xyxy abs) -> [P] float32."""
        focal = sigmoid_focal_loss(logits.float(), one_hot_labels(labels, self.num_classes),
                                   self.focal_alpha, self.focal_gamma).sum(dim=-1)
        decoded = self.coder.decode(anchors, deltas.float())
        giou = elementwise_generalized_box_iou(decoded, target_boxes.float())
        return self.score_cls_weight * focal + self.score_bbox_weight * (1.0 - giou)

    def assign(self, anchors: Tensor, num_level_anchors: list[int], logits: Tensor, deltas: Tensor,
               gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
        """One image's PAA assignment of its valid anchors [M, 4] (levels concatenated) -> gt_inds [M]
        (0 negative, -1 ignored, k >= 1 -> GT k - 1); logits [M, K], deltas [M, 4] are its predictions."""
        pre = self.assigner.assign(anchors, gt_boxes, gt_labels)
        pos = pre.gt_inds > 0
        scores = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
        if pos.any():
            matched = pre.gt_inds[pos] - 1
            scores[pos] = self.anchor_scores(anchors[pos], logits[pos], deltas[pos], gt_labels[matched].long(),
                                             gt_boxes[matched])
        return paa_reassign(pre.gt_inds, scores, num_level_anchors, self.topk)

    @torch.no_grad()
    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The head's own detections (mmdet's PAAHead.predict with `self.test_cfg`), per image.

        maps: L x [B, C, H_l, W_l] at `self.strides`; image_sizes [B, 2] (h, w). Score of (anchor, class) =
        sqrt(sigmoid(class logit) x sigmoid(IoU logit)); per level the nms_pre anchors with the best score over
        classes keep all their classes; boxes decoded and clipped; pairs above score_thr go through per-class
        NMS, the best max_per_img stay, then score voting (ordered by class). Returns per image {"scores" [k],
        "labels" [k], "boxes" [k, 4] xyxy network-input pixels}.
        """
        logits, deltas, iou_logits = self.predict(maps)
        anchors, num_level_anchors = self.anchors(maps)
        cfg, results = self.test_cfg, []
        for image, size_hw in enumerate(image_sizes.tolist()):
            scores = (logits[image].float().sigmoid() * iou_logits[image].float().sigmoid()[:, None]).sqrt()  # [M, K]
            index = top_priors_per_level(scores.max(-1).values, num_level_anchors, cfg.nms_pre)
            boxes, scores = self.coder.decode(anchors[index], deltas[image][index], size_hw), scores[index]
            pairs = multiclass_detections(boxes, scores, cfg)
            results.append(score_voting(pairs, boxes, scores, cfg.score_thr) if self.with_score_voting else pairs)
        return results

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        """Predict, assign (PAA) and compute the raw losses {"loss_cls", "loss_bbox", "loss_iou"}.

        Candidates per image: every valid anchor (centre inside the image) with its PAA assignment;
        features = the image's per-location bank [S, C] with feature_index [M_valid] = each anchor's
        location, so features_of(i) is the input map's feature at anchor i (keeps its grad).
        """
        self._check(inputs)
        check_labels(type(self).__name__, inputs.gt_labels, self.num_classes)
        logits, deltas, iou_logits = self.predict(inputs.maps)
        anchors, num_level_anchors = self.anchors(inputs.maps)
        valid = valid_anchor_masks(anchors, inputs.image_sizes)  # [B, M]
        features = flatten_level_features(inputs.maps)  # [B, S, C], S locations
        location = torch.arange(anchors.shape[0], device=anchors.device) // self.num_anchors  # anchor -> location

        cls_logits, cls_labels = [], []
        pos_deltas, pos_anchors, pos_targets, pos_iou_logits = [], [], [], []
        candidates = []
        for image, (gt_boxes, gt_labels) in enumerate(zip(inputs.gt_boxes, inputs.gt_labels)):
            keep = valid[image]
            image_anchors = anchors[keep]
            image_logits, image_deltas = logits[image][keep], deltas[image][keep]
            gt_inds = self.assign(image_anchors, level_counts(keep, num_level_anchors), image_logits,
                                  image_deltas, gt_boxes, gt_labels)
            labels, targets = assignment_targets(gt_inds, gt_boxes, gt_labels, self.num_classes)
            pos, counted = gt_inds > 0, gt_inds >= 0  # ignored anchors (-1) take no classification loss
            cls_logits.append(image_logits[counted])
            cls_labels.append(labels[counted])
            pos_deltas.append(image_deltas[pos])
            pos_anchors.append(image_anchors[pos])
            pos_targets.append(targets[pos])
            pos_iou_logits.append(iou_logits[image][keep][pos])
            candidates.append(Candidates(
                boxes=image_anchors,
                labels=labels,
                target_boxes=targets,
                features=features[image], feature_index=location[keep],
                num_gt=int(gt_boxes.shape[0]),
                num_classes=self.num_classes,
            ))

        num_pos = sum(len(d) for d in pos_deltas)
        all_logits = torch.cat(cls_logits).float()
        targets_onehot = one_hot_labels(torch.cat(cls_labels), self.num_classes)
        loss_cls = sigmoid_focal_loss(all_logits, targets_onehot, self.focal_alpha, self.focal_gamma).sum()
        loss_cls = loss_cls / max(num_pos, len(inputs.gt_boxes))
        if num_pos == 0:
            # keep both branches in the graph with zero losses
            return AuxHeadOutput(losses={"loss_cls": loss_cls, "loss_bbox": deltas.sum() * 0,
                                         "loss_iou": iou_logits.float().sum() * 0}, candidates=candidates)

        pos_targets_t = torch.cat(pos_targets).float()
        decoded = self.coder.decode(torch.cat(pos_anchors), torch.cat(pos_deltas))
        # the IoU target is a label, not a path for gradients into the regression branch
        iou_targets = paired_iou(decoded.detach(), pos_targets_t)
        loss_iou = F.binary_cross_entropy_with_logits(torch.cat(pos_iou_logits).float(), iou_targets,
                                                      reduction="sum") / num_pos
        weights = iou_targets.clamp(min=IOU_WEIGHT_MIN)
        loss_bbox = giou_loss(decoded, pos_targets_t, weights=weights) / (iou_targets.sum()
                                                                            + torch.finfo(torch.float32).eps)
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_iou": loss_iou}
        return AuxHeadOutput(losses=losses, candidates=candidates)


__all__ = ["PAAHead", "paa_reassign", "paired_iou", "score_voting", "select_candidates", "top_priors_per_level"]
