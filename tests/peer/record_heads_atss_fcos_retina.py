"""Record mmdetection 3.3's own ATSSHead, FCOSHead and RetinaHead on one small padded batch.

Run by hand in the peer venv (never by CI, never imported by tests):

    ~/.cache/codetr-peer/venv/bin/python tests/peer/record_heads_atss_fcos_retina.py

Writes tests/fixtures/peer/head_{atss,fcos,retinanet}.pt (torch.save of plain tensors, dicts and lists),
each holding:
  - "config": the head's dimensions and settings (plain values) and "loss_weights": mmdet's loss_weight
    of each term, so a test divides mmdet's (weighted) terms by them to get raw terms;
    "loss_weight_fold": the factor those weights carry beyond the head's own relative weights (12 for
    Co-DETR's ATSS: num_dec_layer x lambda_2, which codetr applies in its total loss instead);
  - "state_dict": the mmdet head's parameters (random, fixed seed), mmdet's names;
  - "inputs": maps (5 x [B, C, H_l, W_l], strides 8..128), image_sizes [B, 2] (h, w) valid, the padded
    batch shape (H, W), gt_boxes per image [N_i, 4] xyxy pixels, gt_labels per image [N_i] int64;
  - "losses": each term summed over levels (mmdet's anchor heads return one value per level; the
    per-level values are kept under "losses_per_level") and "input_grads": d(sum of raw terms) / d(maps);
  - "assignment": per image what the head's own assigner returned (see each recorder).

Settings: Co-DETR's released CoATSSHead config for ATSS (octave base scale 8, one scale, ratio 1,
strides 8..128, stds 0.1/0.1/0.2/0.2, GIoU, topk 9, loss weights 12/24/12 = base x num_dec_layer 6 x
lambda_2 2). Co-DETR releases no FCOS or RetinaNet head config: FCOS uses mmdet's
"center-normbbox-centeronreg-giou" settings, RetinaNet mmdet's retinanet config with GroupNorm towers
and GIoU on decoded boxes (reg_decoded_bbox), the form the paper's K=6 model uses. Valid flags come
from pad_shape = img_shape per image, as Co-DETR's pipeline (Pad size_divisor=1) gives them.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from mmdet.registry import MODELS
from mmdet.utils import register_all_modules

OUT_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "peer"
NUM_CLASSES = 4
IN_CHANNELS = 32
STRIDES = [8, 16, 32, 64, 128]
BATCH_HW = (128, 160)  # padded batch (H, W)
IMAGE_SIZES = [(128, 160), (96, 120)]  # valid (h, w) of each image
GT_BOXES = [
    # a tiny box, a small one, a large one and a medium one
    [[100.0, 20.0, 108.0, 30.0], [10.0, 12.0, 42.0, 40.0], [20.0, 30.0, 150.0, 120.0], [110.0, 60.0, 150.0, 104.0]],
    [[5.0, 5.0, 60.0, 70.0], [64.0, 40.0, 112.0, 90.0], [30.0, 70.0, 46.0, 86.0]],
]
GT_LABELS = [[2, 0, 1, 3], [1, 1, 0]]
# Co-DETR's auxiliary weights fold num_dec_layer x lambda_2 (6 x 2.0) into each loss weight.
CODETR_FOLD = 6 * 2.0


def feature_size(length: int, stride: int) -> int:
    return math.ceil(length / stride)


def make_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    maps = [
        torch.randn(2, IN_CHANNELS, feature_size(BATCH_HW[0], s), feature_size(BATCH_HW[1], s), generator=g)
        for s in STRIDES
    ]
    return {
        "maps": maps,
        "strides": list(STRIDES),
        "image_sizes": torch.tensor(IMAGE_SIZES, dtype=torch.int64),
        "batch_hw": list(BATCH_HW),
        "gt_boxes": [torch.tensor(b, dtype=torch.float32) for b in GT_BOXES],
        "gt_labels": [torch.tensor(l, dtype=torch.int64) for l in GT_LABELS],
    }


def randomize(head: torch.nn.Module, seed: int) -> None:
    """Random weights that make every output vary (mmdet's init gives near-constant predictions)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("scale"):  # Scale modules
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif ".gn." in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 4:
                p.copy_(0.03 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def gt_instances(inputs: dict) -> list[InstanceData]:
    return [InstanceData(bboxes=b.clone(), labels=l.clone()) for b, l in zip(inputs["gt_boxes"], inputs["gt_labels"])]


def img_metas(inputs: dict) -> list[dict]:
    return [
        {"img_shape": tuple(size), "pad_shape": tuple(size), "batch_input_shape": tuple(inputs["batch_hw"])}
        for size in inputs["image_sizes"].tolist()
    ]


def record_calls(obj, name: str, store: list) -> None:
    """Wrap obj.<name> so every call's return value is appended to store (the head keeps working)."""
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        store.append(result)
        return result

    setattr(obj, name, wrapped)


def total_terms(losses: dict, weights: dict) -> tuple[dict, dict, torch.Tensor]:
    """Level sums and per-level values of each term (still weighted), and the sum of raw terms."""
    summed, per_level, raw_total = {}, {}, 0.0
    for key, value in losses.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        per_level[key] = [v.detach().clone() for v in values]
        term = sum(values)
        summed[key] = term.detach().clone()
        raw_total = raw_total + term / weights[key]
    return summed, per_level, raw_total


def run_head(head: torch.nn.Module, inputs: dict, weights: dict) -> tuple[dict, dict, list]:
    maps = [m.clone().requires_grad_() for m in inputs["maps"]]
    head.train()
    outs = head(maps)
    losses = head.loss_by_feat(*outs, gt_instances(inputs), img_metas(inputs))
    summed, per_level, raw_total = total_terms(losses, weights)
    raw_total.backward()
    return summed, per_level, [m.grad.detach().clone() for m in maps]


def anchor_assignment(head: torch.nn.Module, inputs: dict, assign_results: list) -> dict:
    """Anchors [M, 4] of all levels, per-image valid flags [M] and the assigner's gt_inds over the valid ones."""
    featmap_sizes = [m.shape[-2:] for m in inputs["maps"]]
    anchor_list, valid_list = head.get_anchors(featmap_sizes, img_metas(inputs), device="cpu")
    return {
        "anchors": torch.cat(anchor_list[0]).clone(),
        "num_level_anchors": [len(a) for a in anchor_list[0]],
        "valid": [torch.cat(v).clone() for v in valid_list],
        # 0 negative, -1 ignored, k >= 1 assigned to GT k - 1 (over the valid anchors, in order)
        "gt_inds": [r.gt_inds.clone() for r in assign_results],
        "labels": [r.labels.clone() for r in assign_results],
    }


def record_atss(inputs: dict) -> dict:
    weights = {"loss_cls": 1.0 * CODETR_FOLD, "loss_bbox": 2.0 * CODETR_FOLD, "loss_centerness": 1.0 * CODETR_FOLD}
    cfg = dict(
        type="ATSSHead", num_classes=NUM_CLASSES, in_channels=IN_CHANNELS, stacked_convs=1, feat_channels=64,
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=STRIDES),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=weights["loss_cls"]),
        loss_bbox=dict(type="GIoULoss", loss_weight=weights["loss_bbox"]),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=weights["loss_centerness"]),
        train_cfg=ConfigDict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1,
                             debug=False),
    )
    head = MODELS.build(cfg)
    randomize(head, seed=1)
    assigned: list = []
    record_calls(head.assigner, "assign", assigned)
    losses, per_level, grads = run_head(head, inputs, weights)
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": IN_CHANNELS, "feat_channels": 64, "num_convs": 1,
                   "octave_base_scale": 8.0, "scales_per_octave": 1, "ratios": [1.0], "topk": 9,
                   "target_stds": [0.1, 0.1, 0.2, 0.2]},
        "loss_weights": weights, "loss_weight_fold": CODETR_FOLD,
        "state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "inputs": inputs, "losses": losses, "losses_per_level": per_level, "input_grads": grads,
        "assignment": anchor_assignment(head, inputs, assigned),
    }


def record_retinanet(inputs: dict) -> dict:
    weights = {"loss_cls": 1.0, "loss_bbox": 2.0}
    cfg = dict(
        type="RetinaHead", num_classes=NUM_CLASSES, in_channels=IN_CHANNELS, stacked_convs=1, feat_channels=32,
        norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
        anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=STRIDES),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        reg_decoded_bbox=True,
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=weights["loss_cls"]),
        loss_bbox=dict(type="GIoULoss", loss_weight=weights["loss_bbox"]),
        train_cfg=ConfigDict(
            assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0,
                          ignore_iof_thr=-1),
            sampler=dict(type="PseudoSampler"), allowed_border=-1, pos_weight=-1, debug=False),
    )
    head = MODELS.build(cfg)
    randomize(head, seed=2)
    assigned: list = []
    record_calls(head.assigner, "assign", assigned)
    losses, per_level, grads = run_head(head, inputs, weights)
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": IN_CHANNELS, "feat_channels": 32, "num_convs": 1,
                   "octave_base_scale": 4.0, "scales_per_octave": 3, "ratios": [0.5, 1.0, 2.0],
                   "pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "min_pos_iou": 0.0, "target_stds": [1.0] * 4},
        "loss_weights": weights, "loss_weight_fold": 1.0,
        "state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "inputs": inputs, "losses": losses, "losses_per_level": per_level, "input_grads": grads,
        "assignment": anchor_assignment(head, inputs, assigned),
    }


def record_fcos(inputs: dict) -> dict:
    weights = {"loss_cls": 1.0, "loss_bbox": 1.0, "loss_centerness": 1.0}
    cfg = dict(
        type="FCOSHead", num_classes=NUM_CLASSES, in_channels=IN_CHANNELS, stacked_convs=2, feat_channels=64,
        strides=STRIDES, norm_on_bbox=True, centerness_on_reg=True, dcn_on_last_conv=False, center_sampling=True,
        center_sample_radius=1.5, norm_cfg=dict(type="GN", num_groups=32, requires_grad=True),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=weights["loss_cls"]),
        loss_bbox=dict(type="GIoULoss", loss_weight=weights["loss_bbox"]),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=weights["loss_centerness"]),
    )
    head = MODELS.build(cfg)
    randomize(head, seed=3)
    targets: list = []
    record_calls(head, "_get_targets_single", targets)
    losses, per_level, grads = run_head(head, inputs, weights)

    featmap_sizes = [m.shape[-2:] for m in inputs["maps"]]
    points = torch.cat(head.prior_generator.grid_priors(featmap_sizes, dtype=torch.float32, device="cpu"))
    labels = [t[0].clone() for t in targets]  # per image [P], num_classes = background
    distances = [t[1].clone() for t in targets]  # per image [P, 4] (l, t, r, b) pixels to the chosen GT
    gt_index = []
    for lab, dist, gt in zip(labels, distances, inputs["gt_boxes"]):
        # mmdet returns the chosen GT's distances, not its index: find the GT box they describe
        boxes = torch.cat((points - dist[:, :2], points + dist[:, 2:]), dim=-1)
        error = (boxes[:, None, :] - gt[None, :, :]).abs().amax(-1)  # [P, N]
        best_error, best = error.min(dim=1)
        positive = lab < NUM_CLASSES
        assert bool((best_error[positive] < 1e-3).all()), "a positive's distances match no GT box"
        gt_index.append(torch.where(positive, best, torch.full_like(best, -1)))
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": IN_CHANNELS, "feat_channels": 64, "num_convs": 2,
                   "center_sampling": True, "center_sample_radius": 1.5,
                   "regress_ranges": [list(r) for r in head.regress_ranges]},
        "loss_weights": weights, "loss_weight_fold": 1.0,
        "state_dict": {k: v.detach().clone() for k, v in head.state_dict().items()},
        "inputs": inputs, "losses": losses, "losses_per_level": per_level, "input_grads": grads,
        "assignment": {"points": points, "labels": labels, "distances": distances, "gt_index": gt_index},
    }


def main() -> None:
    register_all_modules()
    torch.manual_seed(0)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for kind, recorder, seed in (("atss", record_atss, 10), ("fcos", record_fcos, 11),
                                 ("retinanet", record_retinanet, 12)):
        record = recorder(make_inputs(seed))
        record["peer"] = "mmdet 3.3.0 / mmcv 2.1.0 / mmengine 0.10.7, CPU, float32"
        path = OUT_DIR / f"head_{kind}.pt"
        torch.save(record, path)
        terms = ", ".join(f"{k} {float(v):.6f}" for k, v in record["losses"].items())
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB; {terms}")


if __name__ == "__main__":
    main()
