"""Losses of the one-to-one head: Hungarian matching, then focal + L1 + GIoU per decoder layer and on the
encoder proposals.

Every term is returned RAW (unweighted) under a stable dotted name (the grammar: codetr/models/loss_terms.py):
dec.d{l}.* for decoder layer l, enc.* for the encoder proposals (Deformable-DETR: every token, class-agnostic;
DINO: the selected top-Q, with their classes), dn.d{l}.* for DINO's denoising queries, o2m.d{l}.* / grp.d{l}.*
for H-DETR's one-to-many queries / Group-DETR's other groups, aux.<head>.* and posq.<head>.d{l}.* for Co-DETR.
Weights (and lambda1 / lambda2) are applied once, in codetr/models/total_loss.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.box_ops import box_cxcywh_to_xyxy, elementwise_box_iou, elementwise_generalized_box_iou
from codetr.config import ModelConfig
from codetr.models.detector import DetectorOutput
from codetr.models.dino.detector import DenoisingOutput
from codetr.models.loss_terms import aux_term, encoder_term, layer_term, posq_term
from codetr.models.losses import quality_focal_loss, sigmoid_focal_loss
from codetr.models.matcher import HungarianMatcher
from codetr.models.methods import QuerySetOutput
from codetr.models.total_loss import LossWeights


def num_boxes_normalizer(targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
    """Average number of target boxes per process (all-reduced across ranks), at least 1.

    Every rank divides by the same number, so DDP's gradient averaging equals one big batch.
    """
    return synced_count(float(sum(len(t["labels"]) for t in targets)), device)


def synced_count(local_count: float, device: torch.device) -> Tensor:
    """A count averaged over ranks, at least 1 (a loss normaliser)."""
    count = torch.tensor(local_count, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def dense_targets(
    indices: list[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]], num_queries: int, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Matched pairs -> per-query targets.

    Returns labels [B, Q] (num_classes = background), boxes [B, Q, 4] cxcywh (zeros where unmatched)
    and positive mask [B, Q].
    """
    device = targets[0]["boxes"].device if targets else torch.device("cpu")
    batch = len(targets)
    labels = torch.full((batch, num_queries), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(batch, num_queries, 4, device=device)
    positive = torch.zeros(batch, num_queries, dtype=torch.bool, device=device)
    for b, (query_index, target_index) in enumerate(indices):
        labels[b, query_index] = targets[b]["labels"][target_index]
        boxes[b, query_index] = targets[b]["boxes"][target_index].to(boxes.dtype)
        positive[b, query_index] = True
    return labels, boxes, positive


def detection_losses(
    logits: Tensor,
    boxes: Tensor,
    target_labels: Tensor,
    target_boxes: Tensor,
    positive: Tensor,
    num_boxes: Tensor,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    cls_loss: str = "focal",
    qfl_beta: float = 2.0,
) -> dict[str, Tensor]:
    """Classification over all queries (focal, or quality focal with the IoU of each positive's detached box
    as its target); L1 and GIoU on positive queries only.

    logits [B, Q, C]; boxes, target_boxes [B, Q, 4] cxcywh normalised; target_labels [B, Q] with C for
    background; positive [B, Q] bool. Each sum is divided by `num_boxes`.
    """
    logits, boxes = logits.float(), boxes.float()  # losses in float32 even after a bf16/fp16 forward
    num_classes = logits.shape[-1]
    pred = boxes[positive].float()
    gt = target_boxes[positive].float()
    pred_xyxy, gt_xyxy = box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt)
    if cls_loss == "qfl":
        quality = torch.zeros(target_labels.shape, device=logits.device)
        quality[positive] = elementwise_box_iou(pred_xyxy.detach(), gt_xyxy)
        loss_cls = quality_focal_loss(logits.flatten(0, 1), target_labels.flatten(), quality.flatten(), qfl_beta)
        loss_cls = loss_cls.sum() / num_boxes
    else:
        onehot = F.one_hot(target_labels, num_classes + 1)[..., :num_classes].to(logits.dtype)
        loss_cls = sigmoid_focal_loss(logits, onehot, focal_alpha, focal_gamma).sum() / num_boxes
    loss_bbox = F.l1_loss(pred, gt, reduction="sum") / num_boxes
    loss_giou = (1 - elementwise_generalized_box_iou(pred_xyxy, gt_xyxy)).sum() / num_boxes
    return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_giou": loss_giou}


class SetCriterion(nn.Module):
    """Hungarian-matched losses on every decoder layer and on the encoder proposals."""

    # Target boxes per process that the box-normalised losses divide by; None: each batch's own count
    # (set through `shared_box_count` by gradient accumulation).
    box_count: float | None = None

    def __init__(self, num_classes: int, cfg: ModelConfig, aux_head_weights: dict[str, dict[str, float]] | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cfg = cfg.loss
        self.weights = LossWeights(cfg, aux_head_weights)  # applied by total_loss.weighted_total
        self.matcher = HungarianMatcher(
            cost_class=self.cfg.match_cost_class,
            cost_bbox=self.cfg.match_cost_bbox,
            cost_giou=self.cfg.match_cost_giou,
            focal_alpha=self.cfg.focal_alpha,
            focal_gamma=self.cfg.focal_gamma,
        )

    @contextmanager
    def shared_box_count(self, box_count: float | None) -> Iterator[None]:
        """Inside, the one-to-one losses (dec.*, enc.*) and H-DETR's / Group-DETR's (o2m.*, grp.*) divide by
        `box_count` boxes per process (averaged over ranks as usual) instead of by the batch's own count.
        Gradient accumulation passes the mean over its micro-batches, so that the micro-batches' losses,
        averaged, are the big batch's: the Hungarian losses' normaliser is known from the targets alone. The
        other normalisers (DINO's denoising copies, Co-DETR's positives) depend on each micro-batch's forward
        and stay per micro-batch."""
        previous, self.box_count = self.box_count, box_count
        try:
            yield
        finally:
            self.box_count = previous

    def box_normalizer(self, targets: list[dict[str, Tensor]], device: torch.device, repeats: int = 1) -> Tensor:
        """The Hungarian losses' normaliser: `repeats` x the target boxes per process, averaged over ranks."""
        count = float(sum(len(t["labels"]) for t in targets)) if self.box_count is None else self.box_count
        return synced_count(repeats * count, device)

    def matched_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], num_boxes: Tensor) -> dict[str, Tensor]:
        logits, boxes = logits.float(), boxes.float()
        indices = self.matcher(logits, boxes, targets)
        labels, target_boxes, positive = dense_targets(indices, targets, logits.shape[1], logits.shape[-1])
        return self.losses(logits, boxes, labels, target_boxes, positive, num_boxes)

    def losses(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor, positive: Tensor,
               normalizer: Tensor) -> dict[str, Tensor]:
        """`detection_losses` with this model's classification loss."""
        c = self.cfg
        return detection_losses(logits, boxes, labels, target_boxes, positive, normalizer, c.focal_alpha,
                                c.focal_gamma, c.cls_loss, c.qfl_beta)

    def forward(self, outputs: DetectorOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """targets: per image {labels [N] int64, boxes [N, 4] cxcywh normalised}."""
        num_boxes = self.box_normalizer(targets, outputs.pred_logits.device)
        losses: dict[str, Tensor] = {}
        for layer, (logits, boxes) in enumerate(outputs.layers):
            for name, value in self.matched_losses(logits, boxes, targets, num_boxes).items():
                losses[layer_term("dec", layer, name)] = value
        if outputs.enc_logits is not None:
            # Deformable-DETR's proposals are class-agnostic: every object counts as class 0 (targets copied).
            enc_targets = ([{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
                           if outputs.enc_class_agnostic else targets)
            for name, value in self.matched_losses(outputs.enc_logits, outputs.enc_boxes, enc_targets, num_boxes).items():
                losses[encoder_term(name)] = value
        if outputs.denoising is not None:
            losses.update(self.denoising_losses(outputs.denoising))
        if outputs.extra_queries is not None:
            losses.update(self.query_set_losses(outputs.extra_queries, targets))
        for branch in outputs.aux or []:
            losses.update(self.aux_losses(branch))
        return losses

    def denoising_losses(self, denoising: DenoisingOutput) -> dict[str, Tensor]:
        """DINO's denoising queries on every decoder layer against their own boxes (no matching), normalised
        by the positive copies (num_groups x the ground-truth boxes), averaged over ranks: each rank has its
        own number of groups."""
        queries = denoising.queries
        normalizer = synced_count(float(queries.positive.sum()), queries.labels.device)
        losses = {}
        for layer, (logits, boxes) in enumerate(zip(denoising.logits, denoising.boxes)):
            terms = self.losses(logits, boxes, queries.labels, queries.target_boxes, queries.positive, normalizer)
            losses.update({layer_term("dn", layer, term): value for term, value in terms.items()})
        return losses

    def query_set_losses(self, extra: QuerySetOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """H-DETR's one-to-many queries / Group-DETR's groups 1..G-1 on every decoder layer: each block of queries
        Hungarian-matched on its own against each image's ground truth repeated `target_repeats` times (H-DETR's
        k), normalised by the repeated boxes averaged over ranks, as the one-to-one loss is by its own."""
        k = extra.target_repeats
        repeated = [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
        normalizer = self.box_normalizer(targets, extra.layers[0][0].device, repeats=k)
        losses: dict[str, Tensor] = {}
        for layer, (logits, boxes) in enumerate(extra.layers):
            blocks = zip(logits.chunk(extra.num_blocks, 1), boxes.chunk(extra.num_blocks, 1))
            per_block = [self.matched_losses(block_logits, block_boxes, repeated, normalizer)
                         for block_logits, block_boxes in blocks]
            for term in per_block[0]:
                losses[layer_term(extra.term_group, layer, term)] = torch.stack([b[term] for b in per_block]).sum()
        return losses

    def aux_losses(self, branch) -> dict[str, Tensor]:
        """A Co-DETR branch: the head's own raw losses, and its positive queries' losses on every
        decoder layer against the head's one-to-many targets (no matching), normalised by positives."""
        losses = {aux_term(branch.name, term): value for term, value in branch.head.losses.items()}
        queries = branch.posq.queries
        num_positive = synced_count(float(queries.positive.sum()), queries.labels.device)
        for layer, (logits, boxes) in enumerate(zip(branch.posq.decoded.logits, branch.posq.decoded.boxes)):
            terms = self.losses(logits, boxes, queries.labels, queries.target_boxes, queries.positive, num_positive)
            for term, value in terms.items():
                losses[posq_term(branch.name, layer, term)] = value
        return losses


def build_criterion(model: nn.Module, cfg: ModelConfig) -> SetCriterion:
    """The criterion for `model` (the baseline or Co-DETR, whose heads bring their own term weights)."""
    return SetCriterion(model.num_classes, cfg, model.aux_loss_weights())
