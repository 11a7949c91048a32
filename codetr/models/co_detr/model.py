"""Co-Deformable-DETR: the one-to-one detector plus training-only collaborative branches.

The auxiliary parts are built AFTER the baseline detector, so for the same seed the baseline's
parameters are identical with and without them, and inference (`forward` without targets, in eval
mode) never touches them: the deployed detector is exactly the baseline.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.config import AuxConfig, ModelConfig
from codetr.models.co_detr.aux_features import AuxFeatureMaps
from codetr.models.co_detr.positive_queries import PositiveQueryEmbedding, PositiveQueryOutput, gather_queries
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs
from codetr.models.detector import DeformableDETR, DetectorOutput
from codetr.models.transformer import Decoder


def build_aux_head(kind: str, num_classes: int, in_channels: int, cfg: AuxConfig) -> nn.Module:
    """One auxiliary head by its kind (the names of AuxConfig.heads), sized by `cfg` (num_convs, ...)."""
    num_convs = cfg.num_convs
    if kind == "atss":
        from codetr.models.co_detr.heads.atss import ATSSHead

        return ATSSHead(num_classes, in_channels, num_convs=num_convs)
    if kind == "retinanet":
        from codetr.models.co_detr.heads.retinanet import RetinaNetHead

        return RetinaNetHead(num_classes, in_channels, num_convs=num_convs)
    if kind == "fcos":
        from codetr.models.co_detr.heads.fcos import FCOSHead

        return FCOSHead(num_classes, in_channels, num_convs=num_convs, ignore_padding=cfg.fcos_ignore_padding)
    if kind == "gfl":
        from codetr.models.co_detr.heads.gfl import GFLHead

        return GFLHead(num_classes, in_channels, num_convs=num_convs)
    if kind == "paa":
        from codetr.models.co_detr.heads.paa import PAAHead

        return PAAHead(num_classes, in_channels, num_convs=num_convs)
    if kind == "faster_rcnn":
        from codetr.models.co_detr.heads.faster_rcnn import FasterRCNNHead

        return FasterRCNNHead(num_classes, in_channels, fc_channels=cfg.rcnn_fc_channels)
    raise ValueError(f"unknown auxiliary head kind {kind!r}")


def head_names(kinds: list[str]) -> list[str]:
    """Unique log names: ['atss', 'atss'] -> ['atss', 'atss_2'] (the paper's "2 x ATSS")."""
    seen: Counter[str] = Counter()
    names = []
    for kind in kinds:
        seen[kind] += 1
        names.append(kind if seen[kind] == 1 else f"{kind}_{seen[kind]}")
    return names


@dataclass
class AuxBranchOutput:
    """One auxiliary head's training outputs: its own losses/assignment and its positive-query pass."""

    name: str
    head: AuxHeadOutput
    posq: PositiveQueryOutput

    def assignment_counts(self) -> list[tuple[int, int]]:
        """Per image (positives, ground-truth boxes) of the head's one-to-many assignment, counted
        before the positive queries' cap (the paper's positive-query ratio is their quotient)."""
        return [(c.num_positives, c.num_gt) for c in self.head.candidates]


class CollaborativeBranches(nn.Module):
    """K auxiliary heads on the encoder output, and their positive queries through the shared decoder."""

    def __init__(self, cfg: AuxConfig, num_classes: int, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.names = head_names(cfg.heads)
        self.feature_maps = AuxFeatureMaps(d_model)
        self.heads = nn.ModuleList(build_aux_head(k, num_classes, d_model, cfg) for k in cfg.heads)
        self.query_embeddings = nn.ModuleList(PositiveQueryEmbedding(d_model, cfg.content_feature) for _ in cfg.heads)
        # The released R50 model has a per-head scalar (an nn.Embedding(K, 1) made by accident); "vector"
        # is the intended per-head embedding [K, d_model]. The released code adds it only together with the
        # content feature, so without that feature it is not built (it would never receive a gradient).
        width = {"scalar": 1, "vector": d_model}.get(cfg.head_pos_embed) if cfg.content_feature else None
        self.head_pos_embed = nn.Parameter(torch.zeros(len(cfg.heads), width)) if width else None
        # (Its accidental third argument is padding_idx=1, which has no effect: the released code reads
        # `.weight[i]` directly, and its init_weights xavier-fills every row.)
        if self.head_pos_embed is not None:
            nn.init.xavier_uniform_(self.head_pos_embed)  # as the released model initialises it

    def loss_weights(self) -> dict[str, dict[str, float]]:
        """Each head's own per-term weights, by head name."""
        return {name: dict(head.loss_weights) for name, head in zip(self.names, self.heads)}

    def forward(self, out: DetectorOutput, masks: Tensor, targets: list[dict[str, Tensor]], decoder: Decoder) -> list[AuxBranchOutput]:
        maps, level_masks = self.feature_maps(out.memory, out.feats)
        # Valid (unpadded) size of every image, from the padding mask: [B, 2] (h, w).
        image_sizes = torch.stack(((~masks[:, :, 0]).sum(1), (~masks[:, 0, :]).sum(1)), -1)
        scales = image_sizes.flip(-1).repeat(1, 2).to(out.memory.dtype)  # (w, h, w, h)
        inputs = AuxInputs(
            maps=maps,
            masks=level_masks,
            strides=AuxFeatureMaps.strides,
            image_sizes=image_sizes,
            gt_boxes=[box_cxcywh_to_xyxy(t["boxes"]) * scales[i] for i, t in enumerate(targets)],
            gt_labels=[t["labels"] for t in targets],
        )
        branches = []
        for index, (name, head, embed) in enumerate(zip(self.names, self.heads, self.query_embeddings)):
            head_out = head(inputs)
            queries = gather_queries(head_out.candidates, image_sizes, self.cfg.min_queries, self.cfg.max_queries)
            head_embed = self.head_pos_embed[index] if self.head_pos_embed is not None else None
            content, pos = embed(queries, head_embed)
            decoded = decoder(content, pos, queries.ref_boxes, out.memory, out.feats)
            branches.append(AuxBranchOutput(name, head_out, PositiveQueryOutput(decoded, queries)))
        return branches


class CoDeformableDETR(DeformableDETR):
    """The baseline detector + `aux` (training only)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)  # first, so the baseline's initial weights do not change
        self.aux = CollaborativeBranches(cfg.aux, num_classes, cfg.transformer.d_model)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        out = super().forward(images, masks)
        if self.training and targets is not None:
            out.aux = self.aux(out, masks, targets, self.transformer.decoder)
        return out

    def aux_loss_weights(self) -> dict[str, dict[str, float]]:
        return self.aux.loss_weights()
