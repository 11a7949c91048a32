"""Inference of an auxiliary head on its own (Co-DETR's Table 11; the released `eval_module` 'one-stage' /
'two-stage'): the head's usual post-processing and NMS, as mmdetection 3.3's heads predict.

A dense (one-stage) head, per image (mmdet's BaseDenseHead.predict_by_feat with its `test_cfg`):
  1. per level, the (prior, class) pairs whose classification probability exceeds `score_thr`, the best
     `nms_pre` of them (ranked by the classification probability alone);
  2. their boxes decoded and clipped to the image's valid size;
  3. a score factor, where the head has one (ATSS / FCOS: sigmoid(centerness)), multiplies the scores;
  4. boxes with a side <= `min_box_size` dropped, per-class NMS at `nms_iou`, the best `max_per_img` kept.
Boxes stay in network-input pixels; `rescale_detections` maps them to the original image afterwards
(mmdet rescales before its size filter and NMS: the same result, as IoU does not change under a
per-axis scaling).

Every detection is a dict {"scores" [k] float32, "labels" [k] int64 (contiguous classes), "boxes" [k, 4]
xyxy abs}, sorted by score (descending) unless a head says otherwise.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

Detections = dict[str, Tensor]


@dataclass(frozen=True)
class PostprocessConfig:
    """A head's post-processing (mmdet's test_cfg). The defaults are Co-DETR's released ATSS test_cfg."""

    nms_pre: int = 1000  # per level, the best (prior, class) pairs kept before NMS; <= 0 keeps all
    score_thr: float = 0.0  # keep pairs scoring strictly above it (mmdet's `scores > score_thr`)
    nms_iou: float = 0.6  # per-class NMS: a box overlapping a better one by IoU > nms_iou is dropped
    max_per_img: int = 100  # detections kept per image after NMS
    min_box_size: float = 0.0  # drop boxes with width or height <= it; negative keeps every box

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


# mmdet's test_cfg of each detector a head comes from. ATSS and Faster-RCNN: Co-DETR's released config
# (Sense-X co_deformable_detr_r50_1x_coco.py; the same in mmdet 3.3's projects/CO-DETR). Co-DETR releases
# no FCOS / RetinaNet / GFL / PAA config: those are mmdet's fcos / retinanet / gfl / paa_r50_fpn_1x ones.
ATSS_TEST = PostprocessConfig(nms_pre=1000, score_thr=0.0, nms_iou=0.6, max_per_img=100, min_box_size=0.0)
RPN_TEST = PostprocessConfig(nms_pre=1000, score_thr=0.0, nms_iou=0.7, max_per_img=1000, min_box_size=0.0)
RCNN_TEST = PostprocessConfig(nms_pre=0, score_thr=0.0, nms_iou=0.5, max_per_img=100, min_box_size=-1.0)
RETINANET_TEST = PostprocessConfig(nms_pre=1000, score_thr=0.05, nms_iou=0.5, max_per_img=100, min_box_size=0.0)
FCOS_TEST = PostprocessConfig(nms_pre=1000, score_thr=0.05, nms_iou=0.5, max_per_img=100, min_box_size=0.0)
GFL_TEST = PostprocessConfig(nms_pre=1000, score_thr=0.05, nms_iou=0.6, max_per_img=100, min_box_size=0.0)
PAA_TEST = PostprocessConfig(nms_pre=1000, score_thr=0.05, nms_iou=0.6, max_per_img=100, min_box_size=-1.0)


def empty_detections(device: torch.device | str) -> Detections:
    return {"scores": torch.zeros(0, device=device), "labels": torch.zeros(0, dtype=torch.int64, device=device),
            "boxes": torch.zeros(0, 4, device=device)}


def clip_to_image(boxes_xyxy_abs: Tensor, size_hw: tuple[int, int] | list[int]) -> Tensor:
    """Clamp boxes [N, 4] xyxy abs to one image: x to [0, w], y to [0, h]."""
    height, width = (float(v) for v in size_hw)
    x1, y1, x2, y2 = boxes_xyxy_abs.unbind(-1)
    return torch.stack((x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), -1)


def top_pairs_per_level(scores: Tensor, level_sizes: list[int], score_thr: float,
                        nms_pre: int) -> tuple[Tensor, Tensor, Tensor]:
    """mmdet's filter_scores_and_topk on every level.

    scores [M, K] probabilities of M priors (levels concatenated, level_sizes[l] rows each). Returns the
    kept pairs' scores [n], prior index [n] (into M) and class [n] int64: per level the pairs scoring above
    score_thr, the best nms_pre of them (all when nms_pre <= 0).
    """
    kept_scores, kept_priors, kept_labels = [], [], []
    start = 0
    for level in scores.split(level_sizes):
        above = level > score_thr
        values = level[above]
        pairs = above.nonzero()  # [n, 2] (prior, class), prior-major as mmdet's nonzero
        if 0 < nms_pre < len(values):
            values, order = values.topk(nms_pre)
            pairs = pairs[order]
        kept_scores.append(values)
        kept_priors.append(pairs[:, 0] + start)
        kept_labels.append(pairs[:, 1])
        start += len(level)
    return torch.cat(kept_scores), torch.cat(kept_priors), torch.cat(kept_labels)


def nms_detections(boxes_xyxy_abs: Tensor, scores: Tensor, labels: Tensor, cfg: PostprocessConfig) -> Detections:
    """Size filter, per-class NMS and the best max_per_img: boxes [n, 4], scores [n], labels [n] -> Detections
    sorted by score."""
    if cfg.min_box_size >= 0:
        wh = boxes_xyxy_abs[:, 2:] - boxes_xyxy_abs[:, :2]
        large = (wh > cfg.min_box_size).all(-1)
        boxes_xyxy_abs, scores, labels = boxes_xyxy_abs[large], scores[large], labels[large]
    keep = batched_nms(boxes_xyxy_abs.float(), scores.float(), labels, cfg.nms_iou)[: cfg.max_per_img]
    return {"scores": scores[keep].float(), "labels": labels[keep], "boxes": boxes_xyxy_abs[keep].float()}


def dense_detections(scores: Tensor, level_sizes: list[int], decode: Callable[[Tensor], Tensor], cfg: PostprocessConfig,
                     score_factors: Tensor | None = None) -> Detections:
    """One image of a dense head (see the module docstring).

    scores [M, K] classification probabilities of its M priors (levels concatenated, level_sizes[l] each);
    decode(prior_index [n]) -> the boxes [n, 4] xyxy abs of those priors, clipped to the image;
    score_factors [M] probabilities that multiply the kept pairs' scores (mmdet's with_score_factors), or None.
    """
    top_scores, priors, labels = top_pairs_per_level(scores, level_sizes, cfg.score_thr, cfg.nms_pre)
    if score_factors is not None:
        top_scores = top_scores * score_factors[priors]
    return nms_detections(decode(priors), top_scores, labels, cfg)


def multiclass_detections(boxes_xyxy_abs: Tensor, class_scores: Tensor, cfg: PostprocessConfig) -> Detections:
    """mmdet's multiclass_nms: every (box, class) pair scoring above score_thr, per-class NMS, the best max_per_img.

    boxes [n, 4] (shared by the classes) or [n, K, 4] (one per class), xyxy abs; class_scores [n, K].
    """
    num, num_classes = class_scores.shape
    if boxes_xyxy_abs.dim() == 2:
        boxes_xyxy_abs = boxes_xyxy_abs[:, None].expand(num, num_classes, 4)
    scores = class_scores.reshape(-1)
    labels = torch.arange(num_classes, device=scores.device).repeat(num)
    above = scores > cfg.score_thr
    return nms_detections(boxes_xyxy_abs.reshape(-1, 4)[above], scores[above], labels[above], cfg)


def rescale_detections(detections: list[Detections], input_sizes: Tensor, orig_sizes: Tensor) -> list[Detections]:
    """Map each image's boxes from network-input pixels to original-image pixels (mmdet's rescale=True).

    input_sizes [B, 2] (h, w): the valid network-input size the boxes were clipped to; orig_sizes [B, 2]
    (h, w): the original pixels that size covers (with LSJ: target["box_extent"]), as the one-to-one head's
    postprocess takes them. Boxes are scaled per axis by orig / input; scores and labels are unchanged.
    """
    factors = orig_sizes.double() / input_sizes.double()  # [B, 2] (h, w)
    out = []
    for result, (fy, fx) in zip(detections, factors.tolist()):
        scale = result["boxes"].new_tensor([fx, fy, fx, fy])
        out.append({**result, "boxes": result["boxes"] * scale})
    return out


def valid_sizes(masks: Tensor) -> Tensor:
    """[B, 2] (h, w) valid (unpadded) size of each image, from its padding mask [B, H, W] (True = padding)."""
    return torch.stack(((~masks[:, :, 0]).sum(1), (~masks[:, 0, :]).sum(1)), -1)


__all__ = [
    "ATSS_TEST", "Detections", "FCOS_TEST", "GFL_TEST", "PAA_TEST", "PostprocessConfig", "RCNN_TEST",
    "RETINANET_TEST", "RPN_TEST", "clip_to_image", "dense_detections", "empty_detections", "multiclass_detections", "nms_detections", "rescale_detections",
    "top_pairs_per_level", "valid_sizes",
]
