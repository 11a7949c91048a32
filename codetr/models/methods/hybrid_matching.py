"""H-Deformable-DETR's hybrid matching (Jia et al., "DETRs with Hybrid Matching", CVPR 2023).

Beside the Q one-to-one queries the decoder runs M one-to-many queries (the paper: 300 + 1500). Self-attention
keeps the two sets apart; the one-to-many set is Hungarian-matched against each image's ground truth repeated k
times (k = 6), so every object gets k positives, and its losses (focal + L1 + GIoU on every decoder layer, no
encoder term) enter the total with weight lambda_one2many = 1.0 (`o2m.d{l}.*`). Two-stage models select Q + M
proposals, the one-to-one queries taking the best Q. At inference only the one-to-one queries run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from codetr.config import ModelConfig
from codetr.models.methods.common import QueryLayout, QuerySetOutput

if TYPE_CHECKING:
    from codetr.models.transformer import DecoderOutput


class HybridMatching:
    """The one-to-many branch of H-DETR: how many queries, how they are masked, how their outputs are read."""

    name = "h_detr"
    term_group = "o2m"
    architectures = ("deformable_detr",)

    def __init__(self, num_queries: int, num_one_to_many: int, repeats: int) -> None:
        self.num_queries, self.num_one_to_many, self.repeats = num_queries, num_one_to_many, repeats
        total = num_queries + num_one_to_many
        blocks = (num_queries, num_one_to_many) if num_one_to_many else (num_queries,)
        self.layout = QueryLayout(total=total, proposals=total, blocks=blocks)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> HybridMatching:
        return cls(cfg.num_queries, cfg.hybrid.num_queries, cfg.hybrid.repeats)

    @staticmethod
    def loss_factors(cfg: ModelConfig) -> dict[str, float]:
        """lambda_one2many on the one-to-many terms of every layer (codetr/models/total_loss.py applies it)."""
        return {"o2m": cfg.hybrid.weight}

    def training_queries(self, decoded: DecoderOutput) -> QuerySetOutput | None:
        """The one-to-many queries' predictions [B, M, *] per layer (None without any)."""
        if not self.num_one_to_many:
            return None
        q = self.num_queries
        layers = [(logits[:, q:], boxes[:, q:]) for logits, boxes in zip(decoded.logits, decoded.boxes)]
        return QuerySetOutput(layers, self.term_group, num_blocks=1, target_repeats=self.repeats)
