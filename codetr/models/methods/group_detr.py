"""Group-DETR (Chen et al., "Group DETR: Fast DETR Training with Group-Wise One-to-Many Assignment", ICCV 2023).

G groups of Q queries run through the decoder together; self-attention stays within a group, and each group is
Hungarian-matched to the ground truth on its own, so every object gets G positives, one per group. The original
divides the summed loss by G x the number of boxes: the loss is the groups' mean. Here group 0 is the one-to-one
detector (`dec.d{l}.*`) and groups 1..G-1 are logged as `grp.d{l}.*`, each group normalised as the baseline is;
Eq. 6's factors (codetr/models/total_loss.py) divide both by G. Inference runs group 0 alone.

Two-stage models: every group starts from the same top-Q encoder proposals, with its own learned content queries
(mixed selection). Without mixed selection the groups would be identical copies, so that setting is refused.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from codetr.config import ModelConfig
from codetr.models.methods.common import QueryLayout, QuerySetOutput

if TYPE_CHECKING:
    from codetr.models.transformer import DecoderOutput


class GroupQueries:
    """Group-DETR's query groups: how many queries, how they are masked, how their outputs are read."""

    name = "group_detr"
    term_group = "grp"
    architectures = ("deformable_detr",)

    def __init__(self, num_queries: int, num_groups: int) -> None:
        self.num_queries, self.num_groups = num_queries, num_groups
        self.layout = QueryLayout(total=num_queries * num_groups, proposals=num_queries,
                                  blocks=(num_queries,) * num_groups)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> GroupQueries:
        return cls(cfg.num_queries, cfg.group.num_groups)

    @staticmethod
    def loss_factors(cfg: ModelConfig) -> dict[str, float]:
        """The original divides the groups' summed loss by G x the boxes: every group's decoder terms by G."""
        return {"dec": 1.0 / cfg.group.num_groups, "grp": 1.0 / cfg.group.num_groups}

    def training_queries(self, decoded: DecoderOutput) -> QuerySetOutput | None:
        """Groups 1..G-1's predictions [B, (G-1) Q, *] per layer (None for G = 1)."""
        if self.num_groups == 1:
            return None
        q = self.num_queries
        layers = [(logits[:, q:], boxes[:, q:]) for logits, boxes in zip(decoded.logits, decoded.boxes)]
        return QuerySetOutput(layers, self.term_group, num_blocks=self.num_groups - 1, target_repeats=1)
