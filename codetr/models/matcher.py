"""One-to-one (Hungarian) matching between DETR queries and ground-truth boxes."""

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from codetr.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from codetr.errors import DivergenceError

# Keeps log() finite when a probability is exactly 0 or 1 (Deformable-DETR's constant).
_LOG_EPS = 1e-8


def match_cost_matrix(cost: Tensor) -> tuple[Tensor, Tensor]:
    """Minimum-cost one-to-one assignment for one image.

    cost: [Q, N] (queries x targets), any device. Returns (query_idx, target_idx), int64 on the
    CPU, each of length min(Q, N), sorted by query index. Raises DivergenceError (a ValueError) if the
    matrix holds NaN or inf (scipy would fail with an obscure message, or match garbage).
    """
    num_queries, num_targets = cost.shape
    if num_queries == 0 or num_targets == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    cost = cost.detach().cpu()
    if not torch.isfinite(cost).all():
        raise DivergenceError(
            f"HungarianMatcher: non-finite matching cost ({int((~torch.isfinite(cost)).sum())} of "
            f"{cost.numel()} entries of a {num_queries}x{num_targets} matrix are NaN/inf); "
            "the predictions (logits or boxes) have diverged"
        )
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


class HungarianMatcher(nn.Module):
    """Match each ground-truth box to at most one query by minimising a weighted cost.

    cost = cost_class * focal_class_cost + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy)).
    The class cost is the Deformable-DETR focal cost: the focal loss of calling the query
    positive for the target's class minus the focal loss of calling it negative.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou cannot all be 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def _class_cost(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Focal class cost [B*Q, sum N_i] from logits [B*Q, C] and labels [sum N_i]."""
        prob = logits.sigmoid()
        alpha, gamma = self.focal_alpha, self.focal_gamma
        neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + _LOG_EPS).log()
        pos = alpha * (1 - prob).pow(gamma) * -(prob + _LOG_EPS).log()
        return pos[:, labels] - neg[:, labels]

    @torch.no_grad()
    def batch_cost(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """Weighted cost of every query against every target of the batch, float32 [B, Q, sum N_i].

        Inputs as in ``forward``. Only the block of image i's targets in row block i is used.
        """
        # One matrix for the whole batch is a few large kernels instead of B small ones; the
        # cross-image blocks are wasted work but cheap at DETR sizes. float32 so that
        # half-precision predictions (autocast) do not round the costs.
        batch_size, num_queries = pred_logits.shape[:2]
        logits = pred_logits.flatten(0, 1).float()
        boxes_cxcywh = pred_boxes.flatten(0, 1).float()
        tgt_labels = torch.cat([t["labels"] for t in targets]).to(logits.device)
        tgt_boxes_cxcywh = torch.cat([t["boxes"] for t in targets]).to(logits.device, torch.float32)

        cost = self.cost_class * self._class_cost(logits, tgt_labels)
        cost = cost + self.cost_bbox * torch.cdist(boxes_cxcywh, tgt_boxes_cxcywh, p=1)
        cost = cost - self.cost_giou * generalized_box_iou(
            box_cxcywh_to_xyxy(boxes_cxcywh), box_cxcywh_to_xyxy(tgt_boxes_cxcywh)
        )
        return cost.view(batch_size, num_queries, -1)

    @torch.no_grad()
    def forward(
        self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        pred_logits: [B, Q, C] pre-sigmoid class scores.
        pred_boxes: [B, Q, 4] cxcywh, normalised to [0, 1].
        targets: B dicts with "labels" int64 [N_i] and "boxes" [N_i, 4] cxcywh normalised.
        Returns B pairs (query_idx, target_idx), int64 on the CPU, each of length min(Q, N_i),
        sorted by query index; images without targets get two empty tensors.
        """
        batch_size, num_queries = pred_logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: got {len(targets)} target dicts for a batch of {batch_size}")
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [match_cost_matrix(pred_logits.new_empty(num_queries, 0)) for _ in targets]
        cost_per_image = self.batch_cost(pred_logits, pred_boxes, targets).cpu().split(sizes, dim=-1)
        return [match_cost_matrix(c[i]) for i, c in enumerate(cost_per_image)]
