"""What a query method (H-DETR, Group-DETR) hands the transformer and the criterion.

A query method adds training-only queries beside the Q one-to-one ones. The decoder runs all of them at once
as consecutive blocks of queries ([one-to-one | the method's own ...]) that cannot see each other through
self-attention; inference runs the first block alone and is exactly the one-to-one detector.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class QueryLayout:
    """The decoder's queries in training.

    total: queries in all, the one-to-one ones first (the rows of the learned query embeddings, or of the
        mixed-selection content queries).
    proposals: two-stage models: the encoder proposals selected, tiled total // proposals times (Group-DETR's
        groups share the top-Q proposals; H-DETR selects all its queries' proposals).
    blocks: the sizes of the blocks that self-attention keeps apart, summing to `total`.
    """

    total: int
    proposals: int
    blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if sum(self.blocks) != self.total or self.total % self.proposals != 0:
            raise ValueError(f"inconsistent query layout {self}")


def block_attention_mask(blocks: tuple[int, ...], device: torch.device | None = None) -> Tensor:
    """[T, T] bool self-attention mask, True = may NOT attend (nn.MultiheadAttention's convention): each query
    sees exactly the queries of its own block. blocks: the block sizes in query order, T = sum(blocks)."""
    block_of_query = torch.repeat_interleave(torch.arange(len(blocks), device=device),
                                             torch.tensor(blocks, device=device))
    return block_of_query[:, None] != block_of_query[None, :]


@dataclass
class QuerySetOutput:
    """A method's training-only queries through every decoder layer, for the criterion.

    layers: per decoder layer (logits [B, M, num_classes], boxes [B, M, 4] cxcywh normalised).
    term_group: the group of their loss terms, `<term_group>.d{l}.<type>` (see codetr/models/loss_terms.py).
    num_blocks: the M queries are this many equal consecutive blocks, each matched one-to-one on its own
        (Group-DETR's groups 1..G-1); 1 = matched as one set (H-DETR).
    target_repeats: each image's ground truth is repeated this many times before matching (H-DETR's k).
    """

    layers: list[tuple[Tensor, Tensor]]
    term_group: str
    num_blocks: int = 1
    target_repeats: int = 1
