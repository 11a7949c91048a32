"""The one-to-one detector: backbone -> channel mapper -> deformable transformer -> per-layer predictions.

This is the deployed detector (the paper's Deformable-DETR baseline). Co-DETR's auxiliary parts are
training-only and never change what `forward` + `postprocess` return.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.box_ops import clip_boxes, scale_boxes
from codetr.config import ModelConfig, resolved_method
from codetr.models.backbone import build_backbone
from codetr.models.methods import QuerySetOutput, build_query_method
from codetr.models.ms_deform_attn import use_attention_impl
from codetr.models.neck import ChannelMapper
from codetr.models.position_encoding import sine_position_encoding
from codetr.models.soft_nms import batched_soft_nms
from codetr.models.transformer import DeformableTransformer, FlatFeatures, flatten_levels

if TYPE_CHECKING:  # the DINO module imports this one
    from codetr.models.dino.detector import DenoisingOutput


# Parameters only training uses: Co-DETR's branches and a query method's extra query rows (H-DETR, Group-DETR).
# The deployed one-to-one detector is built and loaded without them (codetr/engine/inference.py).
TRAINING_ONLY_PREFIXES = ("aux.", "transformer.extra_queries.")


@dataclass
class DetectorOutput:
    """What the detector predicts for a batch.

    pred_logits / pred_boxes: the last decoder layer, [B, Q, num_classes] logits and [B, Q, 4] cxcywh
    boxes normalised to each image's valid region. `layers` holds every decoder layer (the last too)
    for the per-layer losses; `enc_logits` / `enc_boxes` are the encoder proposals (two-stage only, else
    None): every token [B, S, *], trained class-agnostic (Deformable-DETR), or DINO's selected top-Q [B, Q, *],
    trained with their classes (`enc_class_agnostic` False). `denoising`: DINO's denoising queries and
    their predictions (training only, else None). `extra_queries`: the training-only queries of H-DETR or
    Group-DETR (codetr/models/methods/), else None.
    `memory` / `feats` are the encoder output and its layout, for the auxiliary branches and analyses.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    layers: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    enc_logits: Tensor | None = None
    enc_boxes: Tensor | None = None
    enc_class_agnostic: bool = True
    memory: Tensor | None = None
    feats: FlatFeatures | None = None
    aux: list | None = None  # Co-DETR's per-head training outputs (codetr.models.co_detr.model.AuxBranchOutput)
    denoising: DenoisingOutput | None = None  # DINO, training only
    extra_queries: QuerySetOutput | None = None  # H-DETR's one-to-many queries / Group-DETR's groups 1.., training only


class DeformableDETR(nn.Module):
    """Deformable-DETR: plain, or with any of two-stage, box refine, mixed selection, look forward twice
    (all four: the paper's Deformable-DETR++). With model.method h_detr or group_detr it composes that query
    method (`query_method`), which adds training-only queries; inference is the one-to-one detector alone."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__()
        t = cfg.transformer
        self.num_classes = num_classes
        self.num_detections = cfg.num_detections
        self.test_nms, self.test_nms_iou = cfg.test_nms, cfg.test_nms_iou
        self.pos_temperature, self.pos_offset = t.pos_temperature, t.pos_offset
        # 4 levels: C3..C5 + one extra (strides 8..64); 5 levels: C2..C5 + one extra (strides 4..64)
        self.backbone = build_backbone(cfg.backbone, first_stage=5 - t.num_levels)
        self.neck = ChannelMapper(self.backbone.out_channels, t.d_model)
        self.level_strides = (*self.backbone.out_strides, 2 * self.backbone.out_strides[-1])
        self.query_method = build_query_method(cfg)
        self.transformer = self.build_transformer(cfg, num_classes)
        # Channels-last convolutions are faster on CPU (mkldnn) and on GPU tensor cores, and the
        # neck's channels-last outputs flatten into [B, HW, C] tokens without a copy.
        self.backbone.to(memory_format=torch.channels_last)
        self.neck.to(memory_format=torch.channels_last)

    def build_transformer(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        t = cfg.transformer
        return DeformableTransformer(
            num_classes=num_classes,
            num_queries=cfg.num_queries,
            d_model=t.d_model,
            num_heads=t.num_heads,
            num_encoder_layers=t.num_encoder_layers,
            num_decoder_layers=t.num_decoder_layers,
            ffn_dim=t.ffn_dim,
            dropout=t.dropout,
            num_levels=t.num_levels,
            num_points=t.num_points,
            two_stage=cfg.two_stage,
            with_box_refine=cfg.with_box_refine,
            mixed_selection=cfg.mixed_selection,
            look_forward_twice=cfg.look_forward_twice,
            num_train_queries=self.query_method.layout.total if self.query_method is not None else None,
        )

    def extract_features(self, images: Tensor, masks: Tensor) -> FlatFeatures:
        """images [B, 3, H, W], masks [B, H, W] (True = padding) -> flattened multi-level features."""
        maps = self.neck(self.backbone(images.contiguous(memory_format=torch.channels_last)))
        level_masks = [F.interpolate(masks[None].float(), size=m.shape[-2:])[0].bool() for m in maps]
        pos = [sine_position_encoding(m, num_feats=maps[0].shape[1] // 2, temperature=self.pos_temperature,
                                      offset=self.pos_offset).to(maps[0].dtype) for m in level_masks]
        return flatten_levels(maps, level_masks, pos, self.transformer.level_embed, self.level_strides)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        """images [B, 3, H, W], masks [B, H, W] (True = padding). `targets` is used only by Co-DETR's
        training branches (see CoDeformableDETR); the one-to-one detector ignores it."""
        feats = self.extract_features(images, masks)
        method = self.query_method if self.training else None
        decoded, proposals, memory = self.transformer(feats, method.layout if method is not None else None)
        q = self.transformer.num_queries  # the one-to-one queries come first
        layers = [(logits[:, :q], boxes[:, :q]) for logits, boxes in zip(decoded.logits, decoded.boxes)]
        return DetectorOutput(
            pred_logits=layers[-1][0],
            pred_boxes=layers[-1][1],
            layers=layers,
            enc_logits=proposals.logits if proposals is not None else None,
            enc_boxes=proposals.boxes if proposals is not None else None,
            memory=memory,
            feats=feats,
            extra_queries=method.training_queries(decoded) if method is not None else None,
        )

    def aux_loss_weights(self) -> dict[str, dict[str, float]]:
        """Per-term weights of auxiliary heads, by head name: none in the baseline."""
        return {}

    @torch.no_grad()
    def postprocess(self, outputs: DetectorOutput, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Top-k (query, class) pairs by sigmoid score; boxes clipped to the image, as the released head does
        before rescaling; then soft-NMS per class where the config asks for it (Co-DINO), else no NMS.

        orig_sizes: [B, 2] (h, w) of the original images (with LSJ: the original pixels the padded square
        covers, target["box_extent"]). Returns per image {scores [k], labels [k]
        (contiguous), boxes [k, 4] xyxy in original-image pixels}.
        """
        scores, labels, boxes = top_detections(outputs.pred_logits, outputs.pred_boxes, orig_sizes, self.num_detections)
        results = [{"scores": s, "labels": l, "boxes": b} for s, l, b in zip(scores, labels, boxes)]
        if self.test_nms == "soft":  # Co-DINO: per-class soft-NMS on the top-k, scores decayed, re-sorted
            for result in results:
                decayed, keep = batched_soft_nms(result["boxes"], result["scores"], result["labels"], self.test_nms_iou)
                result.update(scores=decayed, labels=result["labels"][keep], boxes=result["boxes"][keep])
        return results


def top_detections(logits: Tensor, boxes: Tensor, sizes_hw: Tensor, num_detections: int) -> tuple[Tensor, Tensor, Tensor]:
    """The best `num_detections` (query, class) pairs of each image by sigmoid score (capped at Q * C), before any NMS.

    logits [B, Q, C]; boxes [B, Q, 4] cxcywh normalised to each image's valid region; sizes_hw [B, 2] (h, w) the
    boxes are scaled to. Returns scores [B, K] (descending), labels [B, K] int64 (contiguous class index) and boxes
    [B, K, 4] xyxy in those pixels, clipped to them; float32. Tensor operations only: the exported graph runs it
    (codetr/engine/export.py).
    """
    logits, boxes = logits.float(), boxes.float()
    num_queries, num_classes = logits.shape[1], logits.shape[2]
    k = min(num_detections, num_queries * num_classes)
    scores, flat_index = logits.sigmoid().flatten(1).topk(k, dim=1)
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    labels = flat_index % num_classes
    boxes = scale_boxes(torch.gather(boxes, 1, query_index[..., None].expand(-1, -1, 4)), sizes_hw)
    return scores, labels, clip_boxes(boxes, sizes_hw)


def build_detector(cfg: ModelConfig, num_classes: int) -> DeformableDETR:
    """Deformable-DETR or DINO (`cfg.architecture`), trained by the config's method: the one-to-one baseline,
    H-DETR or Group-DETR (query methods the detector composes), or Co-DETR (its auxiliary branches: Co-Deformable-
    DETR, Co-DINO). `num_classes` comes from the dataset unless the config fixes it (model.num_classes > 0)."""
    num_classes = cfg.num_classes or num_classes
    dino = cfg.architecture == "dino"
    if resolved_method(cfg) == "co_detr":
        from codetr.models.co_detr.model import CoDeformableDETR, CoDINO

        model = (CoDINO if dino else CoDeformableDETR)(cfg, num_classes)
    elif dino:
        from codetr.models.dino.detector import DINO

        model = DINO(cfg, num_classes)
    else:
        model = DeformableDETR(cfg, num_classes)
    return use_attention_impl(model, cfg.transformer.attention_impl)
