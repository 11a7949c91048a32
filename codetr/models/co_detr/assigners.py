"""One-to-many label assignment for the auxiliary heads: max-IoU, ATSS, and random sampling.

Semantics follow mmdet 2.x (the released Co-DETR's), pinned by tests/test_anchors_assigners.py.
Orientation: IoU matrices here are boxes x gts ([M, N]). Boxes are xyxy in absolute pixels.
gt_inds encoding: 0 = negative, -1 = ignored (neither), k >= 1 = assigned to ground-truth box k - 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from codetr.box_ops import box_iou

NEGATIVE = 0
IGNORED = -1


@dataclass
class AssignResult:
    """Assignment of M boxes to N ground-truth boxes.

    max_overlaps is each box's largest IoU with any ground-truth box (0 when there is none); for
    a low-quality / ATSS positive that may be another GT than the assigned one.
    """

    num_gts: int
    gt_inds: Tensor  # [M] int64: 0 negative, -1 ignored, k >= 1 -> gt k - 1
    max_overlaps: Tensor  # [M] float
    labels: Tensor  # [M] int64: the assigned GT's label, -1 where not positive

    @property
    def positive(self) -> Tensor:
        """[M] bool mask of boxes assigned to a ground-truth box."""
        return self.gt_inds > 0


def _empty_result(num_boxes: int, num_gts: int, device: torch.device) -> AssignResult:
    """All negative (no GT) or no boxes at all."""
    return AssignResult(
        num_gts=num_gts,
        gt_inds=torch.full((num_boxes,), NEGATIVE, dtype=torch.long, device=device),
        max_overlaps=torch.zeros(num_boxes, device=device),
        labels=torch.full((num_boxes,), -1, dtype=torch.long, device=device),
    )


def _labels_of(gt_inds: Tensor, gt_labels: Tensor) -> Tensor:
    labels = torch.full_like(gt_inds, -1)
    pos = gt_inds > 0
    labels[pos] = gt_labels[gt_inds[pos] - 1].long()
    return labels


def _check_inputs(where: str, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4 or gt_boxes.dim() != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"{where}: boxes and gt_boxes must be [M, 4] / [N, 4], got "
                         f"{tuple(boxes.shape)} and {tuple(gt_boxes.shape)}")
    if gt_labels.shape != gt_boxes.shape[:1]:
        raise ValueError(f"{where}: gt_labels {tuple(gt_labels.shape)} must be [N] for gt_boxes {tuple(gt_boxes.shape)}")


class MaxIoUAssigner:
    """Assign each box to the GT it overlaps most (mmdet's MaxIoUAssigner).

    1. IoU < neg_iou_thr with every GT -> negative; IoU >= pos_iou_thr -> positive for its best GT;
       in between -> ignored.
    2. match_low_quality: for each GT i (in index order, so a later GT wins a shared box) whose best
       IoU is >= min_pos_iou, the box(es) reaching that best IoU are assigned to GT i (all tied boxes
       if gt_max_assign_all, else the first one). Caveat kept from mmdet: with min_pos_iou = 0, a GT
       that overlaps no box at all (best IoU 0) claims every box with IoU 0 to it.
    """

    def __init__(
        self,
        pos_iou_thr: float,
        neg_iou_thr: float,
        min_pos_iou: float = 0.0,
        match_low_quality: bool = True,
        gt_max_assign_all: bool = True,
    ) -> None:
        self.pos_iou_thr = pos_iou_thr
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = min_pos_iou
        self.match_low_quality = match_low_quality
        self.gt_max_assign_all = gt_max_assign_all

    @torch.no_grad()
    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        """boxes [M, 4], gt_boxes [N, 4] xyxy abs, gt_labels [N] -> AssignResult over the M boxes."""
        _check_inputs("MaxIoUAssigner.assign", boxes, gt_boxes, gt_labels)
        num_boxes, num_gts = boxes.shape[0], gt_boxes.shape[0]
        if num_boxes == 0 or num_gts == 0:
            return _empty_result(num_boxes, num_gts, boxes.device)
        iou = box_iou(boxes.float(), gt_boxes.float())[0]  # [M, N]
        max_iou, best_gt = iou.max(dim=1)
        gt_inds = torch.full((num_boxes,), IGNORED, dtype=torch.long, device=boxes.device)
        gt_inds[max_iou < self.neg_iou_thr] = NEGATIVE
        pos = max_iou >= self.pos_iou_thr
        gt_inds[pos] = best_gt[pos] + 1
        if self.match_low_quality:
            gt_best_iou, gt_best_box = iou.max(dim=0)  # [N]
            if self.gt_max_assign_all:
                claims = iou == gt_best_iou[None, :]  # [M, N]: box reaches GT's best IoU (ties included)
            else:
                claims = torch.zeros_like(iou, dtype=torch.bool)
                claims[gt_best_box, torch.arange(num_gts, device=boxes.device)] = True
            claims &= (gt_best_iou >= self.min_pos_iou)[None, :]
            # Sequential override in GT order == the highest claiming GT index wins.
            gt_numbers = torch.arange(1, num_gts + 1, device=boxes.device)
            last_claim = (claims.long() * gt_numbers[None, :]).max(dim=1).values  # [M], 0 = none
            gt_inds = torch.where(last_claim > 0, last_claim, gt_inds)
        return AssignResult(num_gts, gt_inds, max_iou, _labels_of(gt_inds, gt_labels))


class ATSSAssigner:
    """Adaptive Training Sample Selection (Zhang et al. 2020), mmdet's ATSSAssigner.

    For each GT: per level, the topk boxes whose centres are closest to the GT's centre are
    candidates; the IoU threshold is mean + std (unbiased, torch.std) of the candidates' IoUs; a
    candidate is positive if its IoU >= threshold and its centre lies inside the GT (every side's
    distance > 0.01). A box positive for several GTs goes to the one with the highest IoU.
    """

    CENTRE_EPS = 0.01

    def __init__(self, topk: int = 9) -> None:
        if topk < 1:
            raise ValueError(f"ATSSAssigner: topk must be >= 1, got {topk}")
        self.topk = topk

    @torch.no_grad()
    def assign(self, anchors: Tensor, num_level_anchors: list[int], gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        """anchors [M, 4] xyxy abs (levels concatenated, num_level_anchors[l] rows each), gt [N, 4], [N]."""
        _check_inputs("ATSSAssigner.assign", anchors, gt_boxes, gt_labels)
        if sum(num_level_anchors) != anchors.shape[0]:
            raise ValueError(f"ATSSAssigner.assign: num_level_anchors sums to {sum(num_level_anchors)}, "
                             f"but there are {anchors.shape[0]} anchors")
        num_boxes, num_gts = anchors.shape[0], gt_boxes.shape[0]
        if num_boxes == 0 or num_gts == 0:
            return _empty_result(num_boxes, num_gts, anchors.device)
        anchors, gt_boxes = anchors.float(), gt_boxes.float()
        iou = box_iou(anchors, gt_boxes)[0]  # [M, N]
        anchor_ctr = 0.5 * (anchors[:, :2] + anchors[:, 2:])  # [M, 2]
        gt_ctr = 0.5 * (gt_boxes[:, :2] + gt_boxes[:, 2:])  # [N, 2]
        distances = torch.cdist(anchor_ctr, gt_ctr)  # [M, N]

        candidates = []  # per level [k_l, N] anchor indices
        start = 0
        for count in num_level_anchors:
            if count > 0:
                k = min(self.topk, count)
                nearest = distances[start:start + count].topk(k, dim=0, largest=False).indices
                candidates.append(nearest + start)
            start += count
        cand = torch.cat(candidates, dim=0)  # [K, N], distinct rows within each column
        cand_iou = iou.gather(0, cand)
        threshold = cand_iou.mean(dim=0) + cand_iou.std(dim=0)  # [N]; NaN (no positive) if K == 1
        is_pos = cand_iou >= threshold[None, :]

        cand_ctr = anchor_ctr[cand]  # [K, N, 2]
        sides = torch.cat((cand_ctr - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - cand_ctr), dim=-1)
        is_pos &= sides.min(dim=-1).values > self.CENTRE_EPS

        masked_iou = torch.full_like(iou, float("-inf"))
        masked_iou.scatter_(0, cand, torch.where(is_pos, cand_iou, torch.full_like(cand_iou, float("-inf"))))
        best_iou, best_gt = masked_iou.max(dim=1)
        gt_inds = torch.where(best_iou > float("-inf"), best_gt + 1, torch.zeros_like(best_gt))
        return AssignResult(num_gts, gt_inds, iou.max(dim=1).values, _labels_of(gt_inds, gt_labels))


@dataclass
class SamplingResult:
    """Boxes drawn by a sampler. Indices refer to `boxes` (which starts with the GT boxes when they
    were added as proposals); `assign` is the assignment of those `boxes`."""

    pos_inds: Tensor  # [P] int64, sorted
    neg_inds: Tensor  # [Q] int64, sorted
    pos_boxes: Tensor  # [P, 4]
    neg_boxes: Tensor  # [Q, 4]
    pos_gt_boxes: Tensor  # [P, 4] the assigned GT box of each positive
    pos_gt_labels: Tensor  # [P] int64
    pos_assigned_gt_inds: Tensor  # [P] int64, 0-based GT index
    pos_is_gt: Tensor  # [P] bool: the positive is a GT box added as proposal
    boxes: Tensor  # [M', 4] the (possibly GT-augmented) boxes
    assign: AssignResult  # the (possibly GT-augmented) assignment of `boxes`


class RandomSampler:
    """Draw at most `num` boxes, at most num * pos_fraction of them positive, uniformly at random.

    Negatives fill the rest, capped at neg_pos_ub * max(1, positives) when neg_pos_ub >= 0. With
    add_gt_as_proposals the GT boxes are prepended to the boxes as positives of themselves (IoU 1).
    Randomness: torch's global generator (torch.randperm), so torch.manual_seed reproduces a draw.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: int = -1, add_gt_as_proposals: bool = True) -> None:
        self.num = num
        self.pos_fraction = pos_fraction
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = add_gt_as_proposals

    @staticmethod
    def _choose(gallery: Tensor, count: int) -> Tensor:
        """At most `count` of the indices in gallery, sorted; all of them if there are not more."""
        if gallery.numel() > count:
            gallery = gallery[torch.randperm(gallery.numel())[:count].to(gallery.device)]
        return gallery.sort().values

    @torch.no_grad()
    def sample(self, assign: AssignResult, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> SamplingResult:
        """assign of boxes [M, 4]; gt_boxes [N, 4] xyxy abs, gt_labels [N] -> SamplingResult."""
        boxes = boxes[:, :4]
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and gt_boxes.shape[0] > 0:
            num_gts = gt_boxes.shape[0]
            boxes = torch.cat((gt_boxes.to(boxes.dtype), boxes), dim=0)
            gt_numbers = torch.arange(1, num_gts + 1, dtype=torch.long, device=boxes.device)
            assign = AssignResult(
                num_gts=assign.num_gts,
                gt_inds=torch.cat((gt_numbers, assign.gt_inds)),
                max_overlaps=torch.cat((assign.max_overlaps.new_ones(num_gts), assign.max_overlaps)),
                labels=torch.cat((gt_labels.long(), assign.labels)),
            )
            is_gt = torch.cat((torch.ones(num_gts, dtype=torch.bool, device=boxes.device), is_gt))

        pos_inds = self._choose(torch.nonzero(assign.gt_inds > 0).flatten(), int(self.num * self.pos_fraction))
        num_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = self._choose(torch.nonzero(assign.gt_inds == 0).flatten(), num_neg)

        pos_assigned = assign.gt_inds[pos_inds] - 1
        if gt_boxes.shape[0] > 0:
            pos_gt_boxes = gt_boxes[pos_assigned]
        else:
            pos_gt_boxes = gt_boxes.new_zeros((0, 4))
        return SamplingResult(
            pos_inds=pos_inds,
            neg_inds=neg_inds,
            pos_boxes=boxes[pos_inds],
            neg_boxes=boxes[neg_inds],
            pos_gt_boxes=pos_gt_boxes,
            pos_gt_labels=assign.labels[pos_inds],
            pos_assigned_gt_inds=pos_assigned,
            pos_is_gt=is_gt[pos_inds],
            boxes=boxes,
            assign=assign,
        )
