"""DINO's contrastive denoising (CDN) queries: noised copies of the ground truth that the decoder must
reconstruct (positives) or reject (negatives). Training only.

For a batch whose images hold at most T ground-truth boxes, G = max(1, num_queries // T) groups are built.
Each group has 2T queries per image: T positive copies (slot j = box j, corners moved by less than
box_noise * (w, h) / 2) and T negative copies (moved by between 1 and 2 times that), laid out per image as

    [pos g0 (T) | neg g0 (T) | pos g1 | neg g1 | ...],   D = 2 * T * G denoising queries,

with empty slots (images with fewer than T boxes) left at zero content and box logit 0 (box 0.5, 0.5, 0.5,
0.5), as background. A copy's content query is the embedding of its label, replaced by a random class with
probability label_noise / 2. The decoder sees [denoising | matching] queries under a self-attention mask:
matching queries do not see denoising ones, and no group sees another (each group sees the matching ones).

Targets: a positive copy must predict its box and label (no matching); negatives and empty slots are
background. The random draws follow mmdetection's CdnQueryGenerator call for call (same functions, shapes
and order), so a seeded run draws the same noise as the peer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh, inverse_sigmoid

# DINO embeds and refines boxes through inverse_sigmoid with this clamp (Deformable-DETR uses 1e-5).
DINO_LOGIT_EPS = 1e-3


@dataclass
class DenoisingQueries:
    """One batch's denoising queries and their targets (D queries per image)."""

    content: Tensor  # [B, D, C] label embeddings
    boxes_unact: Tensor  # [B, D, 4] noised boxes, cxcywh logits
    attn_mask: Tensor  # [D + Q, D + Q] bool, True = may not attend (Q matching queries follow the D)
    labels: Tensor  # [B, D] int64, num_classes = background (negatives, empty slots)
    target_boxes: Tensor  # [B, D, 4] cxcywh normalised (zeros where not positive)
    positive: Tensor  # [B, D] bool
    num_groups: int
    max_targets: int  # T

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


def num_groups_for(max_targets: int, num_queries: int) -> int:
    """G = num_queries // T, at least 1 (mmdet's dynamic groups)."""
    return max(1, num_queries // max_targets) if max_targets > 0 else 1


def denoising_attn_mask(max_targets: int, num_groups: int, num_matching: int, device: torch.device | None = None) -> Tensor:
    """[D + Q, D + Q] bool, True = masked: matching rows see no denoising column, each group's rows see only
    their own group and the matching queries."""
    group_size = 2 * max_targets
    num_dn = group_size * num_groups
    total = num_dn + num_matching
    group = torch.arange(total, device=device) // max(group_size, 1)
    group[num_dn:] = num_groups  # the matching queries form their own "group"
    is_dn_column = torch.arange(total, device=device) < num_dn
    mask = group[:, None] != group[None, :]
    mask &= is_dn_column[None, :]  # everybody may see the matching queries
    return mask


def noisy_labels(labels: Tensor, copies: int, label_noise: float, num_classes: int) -> Tensor:
    """labels [N] -> [copies * N] (copy-major), each replaced by a random class with prob label_noise / 2."""
    expanded = labels.repeat(copies, 1).view(-1)
    chosen = torch.nonzero(torch.rand_like(expanded.float()) < label_noise * 0.5).view(-1)
    random_labels = torch.randint_like(chosen, 0, num_classes)
    return expanded.scatter(0, chosen, random_labels)


def noisy_boxes(boxes_xyxy: Tensor, num_groups: int, box_noise: float) -> Tensor:
    """boxes [N, 4] xyxy normalised -> [2G * N, 4] noised copies, cxcywh logits.

    Copy 2g is group g's positives: every corner moves by u * (w, h) * box_noise / 2 with |u| < 1; copy 2g+1
    its negatives, 1 <= |u| < 2. Corners are clamped to [0, 1].
    """
    count = len(boxes_xyxy)
    expanded = boxes_xyxy.repeat(2 * num_groups, 1)
    negative = (torch.arange(2 * num_groups, device=boxes_xyxy.device) % 2 == 1).repeat_interleave(count)
    sign = torch.randint_like(expanded, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
    magnitude = torch.rand_like(expanded)
    magnitude[negative] += 1.0
    wh = box_xyxy_to_cxcywh(expanded)[:, 2:].repeat(1, 2)  # (w, h, w, h)
    moved = (expanded + magnitude * sign * wh * box_noise / 2).clamp(min=0.0, max=1.0)
    return inverse_sigmoid(box_xyxy_to_cxcywh(moved), eps=DINO_LOGIT_EPS)


class DenoisingGenerator(nn.Module):
    """Builds `DenoisingQueries` from the ground truth; owns the label embedding [num_classes, C]."""

    def __init__(self, num_classes: int, d_model: int, num_queries: int = 100, label_noise: float = 0.5,
                 box_noise: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.label_noise = label_noise
        self.box_noise = box_noise
        self.label_embedding = nn.Embedding(num_classes, d_model)

    def forward(self, targets: list[dict[str, Tensor]], num_matching: int) -> DenoisingQueries:
        """targets: per image {labels [N_i] int64, boxes [N_i, 4] cxcywh normalised}."""
        device = self.label_embedding.weight.device
        counts = [len(t["labels"]) for t in targets]
        batch, max_targets = len(targets), max(counts, default=0)
        groups = num_groups_for(max_targets, self.num_queries)
        copies = 2 * groups
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes_xyxy = box_cxcywh_to_xyxy(torch.cat([t["boxes"] for t in targets]).to(device).float())

        content_flat = self.label_embedding(noisy_labels(labels, copies, self.label_noise, self.num_classes))
        boxes_flat = noisy_boxes(boxes_xyxy, groups, self.box_noise)

        # Copy k of image b's box j goes to slot k * T + j of image b.
        image = torch.cat([torch.full((n,), b, dtype=torch.long, device=device) for b, n in enumerate(counts)])
        within = torch.cat([torch.arange(n, device=device) for n in counts])
        copy = torch.arange(copies, device=device).repeat_interleave(len(labels))
        rows, slots = image.repeat(copies), within.repeat(copies) + copy * max_targets
        num_dn = copies * max_targets
        content = content_flat.new_zeros(batch, num_dn, content_flat.shape[-1])
        boxes_unact = boxes_flat.new_zeros(batch, num_dn, 4)
        content[rows, slots] = content_flat
        boxes_unact[rows, slots] = boxes_flat

        positive = torch.zeros(batch, num_dn, dtype=torch.bool, device=device)
        target_labels = torch.full((batch, num_dn), self.num_classes, dtype=torch.long, device=device)
        target_boxes = torch.zeros(batch, num_dn, 4, device=device)
        is_positive_copy = copy % 2 == 0
        pos_rows, pos_slots = rows[is_positive_copy], slots[is_positive_copy]
        positive[pos_rows, pos_slots] = True
        target_labels[pos_rows, pos_slots] = labels.repeat(groups)
        target_boxes[pos_rows, pos_slots] = box_xyxy_to_cxcywh(boxes_xyxy).repeat(groups, 1)
        return DenoisingQueries(
            content=content, boxes_unact=boxes_unact,
            attn_mask=denoising_attn_mask(max_targets, groups, num_matching, device),
            labels=target_labels, target_boxes=target_boxes, positive=positive,
            num_groups=groups, max_targets=max_targets,
        )
