"""Soft-NMS (Bodla et al. 2017), per class, as the released Co-DINO applies it at test time.

Co-DINO's test config asks mmcv's `batched_nms` for `soft_nms` with iou_threshold 0.8 and the defaults
linear decay, min_score 1e-3. These semantics are reproduced here (and tested against recorded mmcv
outputs), including the order in which boxes come out and which box is dropped when a score falls below
`min_score`, because the kept set and its order depend on them:
  - repeatedly pick the highest remaining score (the first one on ties, in the current order);
  - decay every later box's score by (1 - IoU) when IoU >= iou_threshold ("linear");
  - a box whose score drops below min_score is removed by moving the last box into its place.
Classes are kept apart as mmcv does: boxes are shifted by class index * (largest coordinate + 1) so that
boxes of different classes never overlap.
"""
from __future__ import annotations

import torch
from torch import Tensor

from codetr.box_ops import box_iou


def soft_nms(boxes_xyxy: Tensor, scores: Tensor, iou_threshold: float = 0.3, min_score: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Linear soft-NMS of one set of boxes.

    boxes_xyxy [N, 4], scores [N]. Returns (decayed scores [M], indices [M] into the input), in the order
    the boxes were picked (scores descending), M <= N.
    """
    boxes = boxes_xyxy.detach().float().cpu()
    remaining_scores = scores.detach().float().cpu().clone()
    # [N, N] as nested lists: each pair's IoU is read at most once, in a Python loop (tensor indexing there
    # cost ~70 ms per 300 boxes)
    iou = box_iou(boxes, boxes)[0].tolist()
    order = list(range(len(boxes)))  # current position -> input index (the arrays mmcv permutes in place)
    current = remaining_scores.tolist()
    count = len(order)
    picked_scores, picked = [], []
    for i in range(count):
        if i >= count:
            break
        best = max(range(i, count), key=lambda pos: (current[pos], -pos))  # first maximum
        order[i], order[best] = order[best], order[i]
        current[i], current[best] = current[best], current[i]
        picked.append(order[i])
        picked_scores.append(current[i])
        pos = i + 1
        while pos < count:
            overlap = iou[order[i]][order[pos]]
            if overlap >= iou_threshold:
                current[pos] *= 1.0 - overlap
            if current[pos] < min_score:  # drop it: the last box takes its place and is looked at next
                order[pos], current[pos] = order[count - 1], current[count - 1]
                count -= 1
                continue
            pos += 1
    device = scores.device
    return (torch.tensor(picked_scores, dtype=scores.dtype, device=device),
            torch.tensor(picked, dtype=torch.long, device=device))


def batched_soft_nms(boxes_xyxy: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = 0.8,
                     min_score: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Soft-NMS within each class. boxes_xyxy [N, 4] (any coordinates >= 0), scores [N], labels [N].

    Returns (decayed scores [M], kept indices [M]) sorted as picked (scores descending).
    """
    if boxes_xyxy.numel() == 0:
        return scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=scores.device)
    boxes = boxes_xyxy.float()  # the class offsets reach 1e5: in bf16 they would swamp the coordinates
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return soft_nms(boxes + offsets[:, None], scores, iou_threshold, min_score)
