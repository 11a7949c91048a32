"""The benchmark peer: Hugging Face transformers' DeformableDetr, two-stage + box refine, ResNet-50 from
transformers (no timm, no pretrained download), sized like our `deformable_detr_pp_r50_1x` preset."""
from __future__ import annotations

import torch


def build_hf_deformable_detr(num_classes: int, ffn_dim: int = 2048, dropout: float = 0.1):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck", out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        num_labels=num_classes,
        two_stage=True,
        with_box_refine=True,
        num_queries=300,
        two_stage_num_proposals=300,
        # HF defaults to FFN width 1024; Co-DETR's Deformable-DETR uses 2048 (bench_detector.py passes the
        # preset's width, or its --ffn-dim) so that every side does the same work.
        encoder_ffn_dim=ffn_dim,
        decoder_ffn_dim=ffn_dim,
        dropout=dropout,
        attention_dropout=dropout,
        activation_dropout=dropout,
    )
    model = DeformableDetrForObjectDetection(config)
    train_backbone_from_stage_2(model)
    return model


def train_backbone_from_stage_2(model) -> None:
    """Train the ResNet's stages 2-4, as codetr and mmdet do (frozen_stages=1: stem and stage 1 frozen).
    transformers means the same, but its filter looks for "stage.1".."stage.3" in the parameter names,
    which transformers' own ResNet spells "stages.N": it freezes the whole backbone, and backward then
    skips the backbone altogether."""
    for name, parameter in model.named_parameters():
        if ".backbone.model.encoder.stages." in name and ".stages.0." not in name:
            parameter.requires_grad_(True)


def hf_labels(targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Our targets {labels, boxes cxcywh normalised} -> HF's {class_labels, boxes}."""
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
