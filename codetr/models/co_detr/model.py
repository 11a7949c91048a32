"""Co-DETR (Co-Deformable-DETR, Co-DINO): a one-to-one detector plus training-only collaborative branches.

The auxiliary parts are built AFTER the baseline detector, so for the same seed the baseline's
parameters are identical with and without them, and inference (`forward` without targets, in eval
mode) never touches them: the deployed detector is exactly the baseline. An auxiliary head can still be
evaluated on its own (the paper's Table 11, the released `eval_module`): `postprocess_aux` runs it on the
encoder output of a forward pass, with its usual post-processing and NMS.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.config import AuxConfig, ModelConfig
from codetr.models.co_detr.aux_features import AuxFeatureMaps
from codetr.models.co_detr.heads import AUX_HEADS
from codetr.models.co_detr.heads.detect import Detections, rescale_detections, valid_sizes
from codetr.models.co_detr.positive_queries import PositiveQueryEmbedding, PositiveQueryOutput, gather_queries
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, DetectingAuxHead
from codetr.models.detector import DeformableDETR, DetectorOutput
from codetr.models.dino.detector import DINO
from codetr.models.dino.transformer import DINODecoder
from codetr.models.transformer import Decoder


def build_aux_head(kind: str, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> nn.Module:
    """One auxiliary head by its kind (a key of AUX_HEADS), sized by `cfg` (num_convs, ...), on maps at `strides`
    (the encoder's levels plus the downsampled one: 8..128, or 4..128 for 5-level models)."""
    if kind not in AUX_HEADS:
        raise ValueError(f"unknown auxiliary head kind {kind!r}; registered: {', '.join(AUX_HEADS)}")
    return AUX_HEADS[kind].from_config(num_classes, in_channels, cfg, strides)


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

    def __init__(self, cfg: AuxConfig, num_classes: int, d_model: int, level_strides: tuple[int, ...] = (8, 16, 32, 64),
                 positional_queries: bool = True) -> None:
        """level_strides: the encoder levels' strides; positional_queries: the decoder takes positional queries
        (Deformable-DETR) rather than computing them from the reference boxes (DINO)."""
        super().__init__()
        self.cfg = cfg
        self.names = head_names(cfg.heads)
        self.feature_maps = AuxFeatureMaps(d_model, level_strides)
        strides = tuple(self.feature_maps.strides)
        self.heads = nn.ModuleList(build_aux_head(k, num_classes, d_model, cfg, strides) for k in cfg.heads)
        self.query_embeddings = nn.ModuleList(
            PositiveQueryEmbedding(d_model, cfg.content_feature, positional_queries) for _ in cfg.heads
        )
        # The released R50 model has a per-head scalar (an nn.Embedding(K, 1) made by accident); "vector"
        # is the intended per-head embedding [K, d_model]. The released code adds it only together with the
        # content feature, so without that feature it is not built (it would never receive a gradient).
        width = ({"scalar": 1, "vector": d_model}.get(cfg.head_pos_embed)
                 if cfg.content_feature and positional_queries else None)
        self.head_pos_embed = nn.Parameter(torch.zeros(len(cfg.heads), width)) if width else None
        # (Its accidental third argument is padding_idx=1, which has no effect: the released code reads
        # `.weight[i]` directly, and its init_weights xavier-fills every row.)
        if self.head_pos_embed is not None:
            nn.init.xavier_uniform_(self.head_pos_embed)  # as the released model initialises it

    def loss_weights(self) -> dict[str, dict[str, float]]:
        """Each head's own per-term weights, by head name."""
        return {name: dict(head.loss_weights) for name, head in zip(self.names, self.heads)}

    def kinds(self) -> dict[str, str]:
        """Each head's kind by its name, in order (e.g. {"atss": "atss", "faster_rcnn": ..., "atss_2": "atss"})."""
        return dict(zip(self.names, self.cfg.heads))

    def can_detect(self, name: str) -> bool:
        """Whether head `name` has its own inference (`DetectingAuxHead`)."""
        return isinstance(self.heads[self.names.index(name)], DetectingAuxHead)

    @torch.no_grad()
    def detect(self, name: str, out: DetectorOutput, masks: Tensor) -> list[Detections]:
        """Head `name`'s own detections on the encoder output of `out` (an eval-mode forward; masks [B, H, W], True =
        padding): the auxiliary maps (the encoder levels plus the downsampled one), then the head's `detect`.
        Per image {"scores" [k], "labels" [k], "boxes" [k, 4] xyxy network-input pixels}."""
        if name not in self.names:
            raise KeyError(f"no auxiliary head {name!r}; the heads are {', '.join(self.names) or 'none'}")
        head = self.heads[self.names.index(name)]
        if not isinstance(head, DetectingAuxHead):
            raise TypeError(f"auxiliary head {name!r} ({type(head).__name__}) has no detect()")
        maps, _ = self.feature_maps(out.memory, out.feats)
        return head.detect(maps, valid_sizes(masks))

    def forward(self, out: DetectorOutput, masks: Tensor, targets: list[dict[str, Tensor]],
                decoder: Decoder | DINODecoder) -> list[AuxBranchOutput]:
        maps, level_masks = self.feature_maps(out.memory, out.feats)
        image_sizes = valid_sizes(masks)  # [B, 2] (h, w) of every image, from the padding mask
        scales = image_sizes.flip(-1).repeat(1, 2).to(out.memory.dtype)  # (w, h, w, h)
        inputs = AuxInputs(
            maps=maps,
            masks=level_masks,
            strides=self.feature_maps.strides,
            image_sizes=image_sizes,
            gt_boxes=[box_cxcywh_to_xyxy(t["boxes"]) * scales[i] for i, t in enumerate(targets)],
            gt_labels=[t["labels"] for t in targets],
        )
        # Every head first, then every head's positive queries, as the released code orders them (and so
        # draws its random samples: the samplers', then the query padding's).
        head_outputs = [head(inputs) for head in self.heads]
        branches = []
        for index, (name, head_out, embed) in enumerate(zip(self.names, head_outputs, self.query_embeddings)):
            queries = gather_queries(head_out.candidates, image_sizes, self.cfg.min_queries, self.cfg.max_queries)
            head_embed = self.head_pos_embed[index] if self.head_pos_embed is not None else None
            content, pos = embed(queries, head_embed)
            decoded = decoder(content, pos, queries.ref_boxes, out.memory, out.feats)
            branches.append(AuxBranchOutput(name, head_out, PositiveQueryOutput(decoded, queries)))
        return branches


class CollaborativeDetector:
    """Adds Co-DETR's collaborative branches (`aux`: trained with the detector; `postprocess_aux` evaluates one on
    its own) to a one-to-one detector class; see CoDeformableDETR and CoDINO. The branches are built AFTER the
    detector, so that for the same seed the detector's own parameters are identical with and without them."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        positional = not isinstance(self.transformer.decoder, DINODecoder)
        self.aux = CollaborativeBranches(cfg.aux, num_classes, cfg.transformer.d_model, self.level_strides, positional)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        out = super().forward(images, masks, targets)
        if self.training and targets is not None:
            out.aux = self.aux(out, masks, targets, self.transformer.decoder)
        return out

    def aux_loss_weights(self) -> dict[str, dict[str, float]]:
        return self.aux.loss_weights()

    @torch.no_grad()
    def postprocess_aux(self, name: str, outputs: DetectorOutput, masks: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Auxiliary head `name`'s own detections, rescaled like `postprocess` (the released eval_module
        'one-stage' / 'two-stage' with eval_index on that head).

        outputs: an eval-mode forward of images with padding masks [B, H, W] (True = padding); orig_sizes [B, 2]
        (h, w) of the original images (with LSJ the padded square's extent, target["box_extent"]). The head's
        boxes, clipped to the valid input size, are scaled per axis by orig / valid size. Returns per image
        {"scores" [k], "labels" [k] (contiguous), "boxes" [k, 4] xyxy in original-image pixels}.
        """
        return rescale_detections(self.aux.detect(name, outputs, masks), valid_sizes(masks), orig_sizes)

    @torch.no_grad()
    def predict_aux(self, name: str, images: Tensor, masks: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Run the detector (backbone, neck, encoder; eval mode) on images [B, 3, H, W] and return auxiliary head
        `name`'s detections as `postprocess_aux` does."""
        return self.postprocess_aux(name, self(images, masks), masks, orig_sizes)


class CoDeformableDETR(CollaborativeDetector, DeformableDETR):
    """Deformable-DETR (plain or ++) + `aux` (training only)."""


class CoDINO(CollaborativeDetector, DINO):
    """DINO + `aux` (training only): the released Co-DINO."""
