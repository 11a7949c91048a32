"""DINO: the one-to-one detector of Co-DINO (backbone -> channel mapper -> DINO transformer).

Same interface as DeformableDETR (forward, postprocess, DetectorOutput). In training, with targets, the
decoder also runs DINO's denoising queries; their predictions come back in `DetectorOutput.denoising` and
`layers` / `pred_*` hold the matching queries only. Inference never builds denoising queries.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from codetr.config import ModelConfig
from codetr.models.detector import DeformableDETR, DetectorOutput
from codetr.models.dino.denoising import DenoisingGenerator, DenoisingQueries
from codetr.models.dino.transformer import DINOTransformer


@dataclass
class DenoisingOutput:
    """The denoising queries of a training batch and what every decoder layer predicted for them."""

    queries: DenoisingQueries
    logits: list[Tensor]  # per layer [B, D, num_classes]
    boxes: list[Tensor]  # per layer [B, D, 4] cxcywh normalised


class DINO(DeformableDETR):
    """DINO with any number of feature levels (5 in the presets: strides 4..64)."""

    def __init__(self, cfg: ModelConfig, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        dn = cfg.denoising
        self.denoising = DenoisingGenerator(num_classes, cfg.transformer.d_model, dn.num_queries, dn.label_noise,
                                            dn.box_noise)

    def build_transformer(self, cfg: ModelConfig, num_classes: int) -> nn.Module:
        t = cfg.transformer
        return DINOTransformer(
            num_classes=num_classes, num_queries=cfg.num_queries, d_model=t.d_model, num_heads=t.num_heads,
            num_encoder_layers=t.num_encoder_layers, num_decoder_layers=t.num_decoder_layers, ffn_dim=t.ffn_dim,
            dropout=t.dropout, num_levels=t.num_levels, num_points=t.num_points,
        )

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        """images [B, 3, H, W], masks [B, H, W] (True = padding); targets (training only) feed the denoising
        queries: per image {labels [N] int64, boxes [N, 4] cxcywh normalised}."""
        feats = self.extract_features(images, masks)
        queries = None
        if self.training and targets is not None and self.denoising.num_queries > 0:
            queries = self.denoising(targets, self.transformer.num_queries)
        decoded, proposals, memory = self.transformer(feats, queries)
        num_dn = queries.num_queries if queries is not None else 0
        layers = [(logits[:, num_dn:], boxes[:, num_dn:]) for logits, boxes in zip(decoded.logits, decoded.boxes)]
        denoising = None
        if queries is not None:
            dn_logits = [logits[:, :num_dn] for logits in decoded.logits]
            if num_dn == 0:  # no ground truth in the batch: keep the label embedding in the graph (DDP)
                dn_logits[0] = dn_logits[0] + 0.0 * self.denoising.label_embedding.weight[0, 0]
            denoising = DenoisingOutput(queries, dn_logits, [boxes[:, :num_dn] for boxes in decoded.boxes])
        return DetectorOutput(
            pred_logits=layers[-1][0],
            pred_boxes=layers[-1][1],
            layers=layers,
            enc_logits=proposals.logits,
            enc_boxes=proposals.boxes,
            enc_class_agnostic=False,
            memory=memory,
            feats=feats,
            denoising=denoising,
        )
