"""Customized positive queries: an auxiliary head's positives become extra decoder queries.

For each auxiliary head i, per image:
  1. count: N = clamp(max positives of any image in the batch, min_queries, max_queries) (9 and 300);
  2. select: all positives, randomly sub-sampled to N if there are more; padded up to N with random
     negatives of the same head (background label, no box loss);
  3. embed: LN(Linear(sine(box clamped to [0, 1]))) split in (positional, content) halves; with the content
     feature, the content half adds LN(Linear(feature at the positive)) and the positional half a per-head
     embedding. With DINO's decoder (Co-DINO), which derives positions from the reference boxes, the
     projection is the content query alone;
  4. decode: the SAME decoder (shared weights) runs once more on these queries, with the candidate box as
     reference box, attending to the same encoder memory;
  5. targets come from the head's own one-to-many assignment (no Hungarian matching); the loss is the
     one-to-one head's loss on every decoder layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.box_ops import box_xyxy_to_cxcywh, inverse_sigmoid
from codetr.models.co_detr.types import Candidates
from codetr.models.position_encoding import box_sine_embedding
from codetr.models.transformer import DecoderOutput


@dataclass
class PositiveQueryBatch:
    """Selected candidates of one head for a batch, N per image, boxes cxcywh normalised to each image."""

    ref_boxes: Tensor  # [B, N, 4] the candidates' own boxes (may exceed 1: large anchors, as released)
    features: Tensor | None  # [B, N, C]
    labels: Tensor  # [B, N] int64, num_classes = background (padding)
    target_boxes: Tensor  # [B, N, 4] assigned ground truth
    positive: Tensor  # [B, N] bool


def query_count(num_positives: list[int], min_queries: int = 9, max_queries: int = 300) -> int:
    """N = clamp(max positives of any image in the batch, min_queries, max_queries)."""
    return min(max(max(num_positives, default=0), min_queries), max_queries)


def select_indices(candidates: Candidates, count: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of `count` candidates: positives first (randomly sub-sampled if too many), then random
    negatives; if the head has fewer negatives than needed they are drawn again (with replacement)."""
    device = candidates.labels.device
    positive = candidates.positive.nonzero().squeeze(1)
    negative = (~candidates.positive).nonzero().squeeze(1)
    if len(positive) > count:
        positive = positive[torch.randperm(len(positive), generator=generator)[:count].to(device)]
    missing = count - len(positive)
    if missing == 0:
        return positive
    if len(negative) == 0:
        raise ValueError("cannot pad positive queries: the head produced no negative candidates")
    if len(negative) >= missing:
        padding = negative[torch.randperm(len(negative), generator=generator)[:missing].to(device)]
    else:
        padding = negative[torch.randint(len(negative), (missing,), generator=generator).to(device)]
    return torch.cat((positive, padding))


def gather_queries(
    candidates: list[Candidates], image_sizes: Tensor, min_queries: int = 9, max_queries: int = 300,
    generator: torch.Generator | None = None,
) -> PositiveQueryBatch:
    """Select N candidates per image and express their boxes as cxcywh normalised to the image.

    image_sizes: [B, 2] (h, w) of each image's valid region, pixels.
    """
    count = query_count([c.num_positives for c in candidates], min_queries, max_queries)
    refs, feats, labels, targets, positives = [], [], [], [], []
    for image, cand in enumerate(candidates):
        index = select_indices(cand, count, generator)
        height, width = image_sizes[image].tolist()
        scale = cand.boxes.new_tensor([width, height, width, height])
        refs.append(box_xyxy_to_cxcywh(cand.boxes[index] / scale))
        targets.append(box_xyxy_to_cxcywh(cand.target_boxes[index] / scale))
        labels.append(cand.labels[index])
        positives.append(cand.positive[index])
        if cand.features is not None:
            feats.append(cand.features_of(index))
    return PositiveQueryBatch(
        ref_boxes=torch.stack(refs).detach(),  # reference boxes are inputs, like the two-stage proposals
        features=torch.stack(feats) if feats else None,
        labels=torch.stack(labels),
        target_boxes=torch.stack(targets).detach(),
        positive=torch.stack(positives),
    )


class PositiveQueryEmbedding(nn.Module):
    """One head's query embedding: boxes (+ features) -> (content, positional) queries [B, N, C].

    positional=True (Deformable-DETR): LN(Linear(sine(box))) of width 2C is split into (positional, content).
    positional=False (DINO, whose decoder derives the positional query from the reference box itself):
    LN(Linear(sine(box))) of width C is the content query and the positional query is None (released Co-DINO).
    """

    def __init__(self, d_model: int, content_feature: bool = True, positional: bool = True) -> None:
        super().__init__()
        self.d_model = d_model
        self.positional = positional
        width = 2 * d_model if positional else d_model
        self.pos_trans = nn.Linear(2 * d_model, width)
        self.pos_trans_norm = nn.LayerNorm(width)
        nn.init.xavier_uniform_(self.pos_trans.weight)
        self.feature_proj = nn.Linear(d_model, d_model) if content_feature else None
        self.feature_norm = nn.LayerNorm(d_model) if content_feature else None

    def forward(self, queries: PositiveQueryBatch, head_embed: Tensor | None) -> tuple[Tensor, Tensor | None]:
        # Embedded clamped to [0, 1] (the released code embeds sigmoid(inverse_sigmoid(box))); the reference
        # box itself stays unclamped, as released: a large anchor may reach past the image.
        embedded = box_sine_embedding(inverse_sigmoid(queries.ref_boxes).sigmoid(), num_feats=self.d_model // 2)
        projected = self.pos_trans_norm(self.pos_trans(embedded))
        pos, content = projected.split(self.d_model, -1) if self.positional else (None, projected)
        if self.feature_proj is not None and queries.features is not None:
            content = content + self.feature_norm(self.feature_proj(queries.features))
        if head_embed is not None and pos is not None:
            pos = pos + head_embed
        return content, pos


@dataclass
class PositiveQueryOutput:
    """One head's positive-query decoder pass and its targets (for the loss)."""

    decoded: DecoderOutput
    queries: PositiveQueryBatch
