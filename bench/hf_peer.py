"""The benchmark peer: Hugging Face transformers' DeformableDetr, two-stage + box refine, ResNet-50 from
transformers (no timm, no pretrained download), sized like our `deformable_detr_pp_r50_1x` preset."""
from __future__ import annotations

import torch


def build_hf_deformable_detr(num_classes: int):
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
        # HF defaults to FFN width 1024; Co-DETR's Deformable-DETR uses 2048: match it so that both
        # sides do the same work.
        encoder_ffn_dim=2048,
        decoder_ffn_dim=2048,
    )
    return DeformableDetrForObjectDetection(config)


def hf_labels(targets: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Our targets {labels, boxes cxcywh normalised} -> HF's {class_labels, boxes}."""
    return [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
