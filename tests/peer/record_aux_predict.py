"""Record mmdetection 3.3's own inference of the auxiliary head kinds, for tests/test_aux_branch_eval.py.

Run by hand in the peer venv (never by CI, never imported by the tests):

    ~/.cache/codetr-peer/venv/bin/python tests/peer/record_aux_predict.py

Writes tests/fixtures/peer/aux_predict.pt (torch.save of plain tensors, dicts and lists):
  - "inputs": 5 random feature maps [2, C, H_l, W_l] at strides 8..128 of a padded batch of two images, each
    image's valid size (h, w), its original size (h, w) and mmdet's scale_factor (w_scale, h_scale) =
    valid / original per axis (image 1 scaled unevenly);
  - per head kind ("atss", "faster_rcnn", "fcos", "retinanet", "gfl", "paa", "paa_nms_pre200"): "config"
    (dimensions), "test_cfg" (mmdet's, as plain values), "state_dict" (mmdet's names, random weights, fixed
    seed) and what mmdet's head predicts on the maps, per image {"bboxes" [k, 4] xyxy, "scores" [k],
    "labels" [k]}: "rescaled" with rescale=True (original-image pixels) and "input" with rescale=False
    (network-input pixels); for faster_rcnn also the RPN's "proposals" (rescale=False, as Co-DETR's
    predict_roi_head asks for them).

The test_cfgs: ATSS and Faster-RCNN are Co-DETR's released ones (Sense-X co_deformable_detr_r50_1x_coco.py, the
same in mmdet 3.3's projects/CO-DETR configs): ATSS nms_pre 1000, score_thr 0.0, NMS 0.6, 100 per image; RPN
nms_pre 1000, NMS 0.7, 1000 proposals; RCNN score_thr 0.0, NMS 0.5, 100 per image. FCOS, RetinaNet, GFL and
PAA (score voting on): mmdet's own fcos / retinanet / gfl / paa_r50_fpn_1x test_cfgs (Co-DETR releases none);
"paa_nms_pre200" is PAA with nms_pre 200 (and "paa"'s weights, not stored again: "same_weights_as"), so that
its per-level anchor selection is exercised on the first level (320 anchors). The heads are built as in record_heads_atss_fcos_retina.py / record_heads_rcnn_gfl_paa.py
(one stacked conv, GroupNorm towers, 32 channels). Predictions come from each head's `predict` (mmdet's
BaseDenseHead / RPNHead / StandardRoIHead predict with img_shape = the valid size, as Co-DETR's test
pipeline pads with size_divisor 1).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record_heads_rcnn_gfl_paa import randomize  # noqa: E402  (the same deterministic weights as the loss fixtures)

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "peer" / "aux_predict.pt"
NUM_CLASSES = 4
CHANNELS = 32  # GroupNorm(32) in the one-stage towers
STRIDES = [8, 16, 32, 64, 128]
PAD_HW = (128, 160)
IMAGE_SIZES = [(128, 160), (96, 120)]  # valid (h, w)
ORIG_SIZES = [(480, 600), (200, 300)]  # original (h, w): image 0 scaled by 4 / 15 both ways, image 1 unevenly

CODETR_ATSS = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.0, nms=dict(type="nms", iou_threshold=0.6),
                      max_per_img=100)
CODETR_RPN = dict(nms_pre=1000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
CODETR_RCNN = dict(score_thr=0.0, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)
MMDET_RETINA_FCOS = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5),
                         max_per_img=100)
MMDET_GFL_PAA = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type="nms", iou_threshold=0.6),
                     max_per_img=100)
ATSS_ANCHORS = dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1, strides=STRIDES)
GN = dict(type="GN", num_groups=32, requires_grad=True)


def make_inputs(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, CHANNELS, -(-PAD_HW[0] // s), -(-PAD_HW[1] // s), generator=generator) for s in STRIDES]
    scale_factors = [(w / ow, h / oh) for (h, w), (oh, ow) in zip(IMAGE_SIZES, ORIG_SIZES)]
    return {"maps": maps, "strides": list(STRIDES), "image_sizes": torch.tensor(IMAGE_SIZES),
            "orig_sizes": torch.tensor(ORIG_SIZES), "scale_factors": torch.tensor(scale_factors, dtype=torch.float64)}


def data_samples(inputs: dict) -> list[DetDataSample]:
    samples = []
    for (h, w), (oh, ow), factor in zip(IMAGE_SIZES, ORIG_SIZES, inputs["scale_factors"].tolist()):
        samples.append(DetDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w), batch_input_shape=PAD_HW,
                                                   ori_shape=(oh, ow), scale_factor=tuple(factor))))
    return samples


def plain(results: list[InstanceData]) -> list[dict[str, torch.Tensor]]:
    return [{"bboxes": r.bboxes.detach().clone(), "scores": r.scores.detach().clone(),
             "labels": r.labels.detach().clone()} for r in results]


def as_plain_cfg(cfg: dict) -> dict:
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}


def dense_record(cfg: dict, test_cfg: dict, seed: int, gains: dict, biases: dict, inputs: dict) -> dict:
    head = MODELS.build({**cfg, "test_cfg": ConfigDict(test_cfg)})
    randomize(head, seed, gains, biases)
    head.eval()
    maps = [m.clone() for m in inputs["maps"]]
    with torch.no_grad():
        rescaled = head.predict(maps, data_samples(inputs), rescale=True)
        unscaled = head.predict(maps, data_samples(inputs), rescale=False)
    return {"test_cfg": as_plain_cfg(test_cfg), "state_dict": {k: v.clone() for k, v in head.state_dict().items()},
            "rescaled": plain(rescaled), "input": plain(unscaled)}


def record_atss(inputs: dict) -> dict:
    cfg = dict(type="ATSSHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1, feat_channels=CHANNELS,
               anchor_generator=ATSS_ANCHORS,
               bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]))
    record = dense_record(cfg, CODETR_ATSS, 1, {"atss_reg": 0.5}, {"atss_cls": -2.0}, inputs)
    record["config"] = {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "feat_channels": CHANNELS, "num_convs": 1}
    return record


def record_fcos(inputs: dict) -> dict:
    cfg = dict(type="FCOSHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1, feat_channels=CHANNELS,
               strides=STRIDES, norm_on_bbox=True, centerness_on_reg=True, center_sampling=True,
               center_sample_radius=1.5, norm_cfg=GN)
    record = dense_record(cfg, MMDET_RETINA_FCOS, 3, {"conv_reg": 0.5}, {"conv_cls": -1.5, "conv_reg": 1.0}, inputs)
    record["config"] = {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "feat_channels": CHANNELS, "num_convs": 1}
    return record


def record_retinanet(inputs: dict) -> dict:
    cfg = dict(type="RetinaHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1,
               feat_channels=CHANNELS, norm_cfg=GN,
               anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                                     ratios=[0.5, 1.0, 2.0], strides=STRIDES),
               bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4))
    record = dense_record(cfg, MMDET_RETINA_FCOS, 2, {"retina_reg": 0.3}, {"retina_cls": -2.5}, inputs)
    record["config"] = {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "feat_channels": CHANNELS, "num_convs": 1}
    return record


def record_gfl(inputs: dict) -> dict:
    cfg = dict(type="GFLHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1, feat_channels=CHANNELS,
               anchor_generator=ATSS_ANCHORS, reg_max=16)
    record = dense_record(cfg, MMDET_GFL_PAA, 4, {"gfl_reg": 1.0}, {"gfl_cls": -1.5}, inputs)
    record["config"] = {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "num_convs": 1, "reg_max": 16}
    return record


def record_paa(inputs: dict, nms_pre: int = 1000) -> dict:
    cfg = dict(type="PAAHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1, feat_channels=CHANNELS,
               reg_decoded_bbox=True, score_voting=True, topk=9, anchor_generator=ATSS_ANCHORS,
               bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
               loss_bbox=dict(type="GIoULoss", loss_weight=1.3))
    record = dense_record(cfg, {**MMDET_GFL_PAA, "nms_pre": nms_pre}, 5, {"atss_reg": 0.5},
                          {"atss_cls": -1.0, "atss_centerness": 1.0}, inputs)
    record["config"] = {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "num_convs": 1}
    return record


def record_faster_rcnn(inputs: dict) -> dict:
    rpn = MODELS.build(dict(
        type="RPNHead", in_channels=CHANNELS, feat_channels=CHANNELS,
        anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=STRIDES),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        test_cfg=ConfigDict(CODETR_RPN)))
    roi = MODELS.build(dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                out_channels=CHANNELS, featmap_strides=STRIDES[:4], finest_scale=112),
        bbox_head=dict(type="Shared2FCBBoxHead", in_channels=CHANNELS, fc_out_channels=16, roi_feat_size=7,
                       num_classes=NUM_CLASSES, reg_class_agnostic=False, reg_decoded_bbox=True,
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                       target_stds=[0.1, 0.1, 0.2, 0.2])),
        test_cfg=ConfigDict(CODETR_RCNN)))
    randomize(rpn, 6, {"rpn_reg": 0.5, "rpn_cls": 2.0}, {})
    randomize(roi, 7, {"fc_reg": 0.3, "fc_cls": 2.0}, {})
    rpn.eval()
    roi.eval()
    maps = [m.clone() for m in inputs["maps"]]
    with torch.no_grad():
        proposals = rpn.predict(maps, data_samples(inputs), rescale=False)  # as Co-DETR's predict_roi_head
        rescaled = roi.predict(maps, [p.clone() for p in proposals], data_samples(inputs), rescale=True)
        unscaled = roi.predict(maps, [p.clone() for p in proposals], data_samples(inputs), rescale=False)
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "fc_channels": 16, "num_convs": 1,
                   "rpn_strides": STRIDES, "roi_strides": STRIDES[:4], "finest_scale": 112.0},
        "test_cfg": {"rpn": as_plain_cfg(CODETR_RPN), "rcnn": as_plain_cfg(CODETR_RCNN)},
        "state_dict": {**{f"rpn_head.{k}": v.clone() for k, v in rpn.state_dict().items()},
                       **{f"roi_head.{k}": v.clone() for k, v in roi.state_dict().items()}},
        "proposals": plain(proposals), "rescaled": plain(rescaled), "input": plain(unscaled),
    }


def main() -> None:
    register_all_modules()
    torch.set_num_threads(1)
    inputs = make_inputs()
    fixture = {"inputs": inputs, "peer": "mmdet 3.3.0 / mmcv 2.1.0 / mmengine 0.10.7, CPU, float32", "heads": {}}
    recorders = {"atss": record_atss, "faster_rcnn": record_faster_rcnn, "fcos": record_fcos,
                 "retinanet": record_retinanet, "gfl": record_gfl, "paa": record_paa,
                 "paa_nms_pre200": lambda i: record_paa(i, nms_pre=200)}
    for name, recorder in recorders.items():
        fixture["heads"][name] = record = recorder(inputs)
        if name == "paa_nms_pre200":  # the same weights as "paa" (same seed): not stored twice
            paa_state = fixture["heads"]["paa"]["state_dict"]
            assert all(torch.equal(v, paa_state[k]) for k, v in record.pop("state_dict").items())
            record["same_weights_as"] = "paa"
        counts = [len(r["scores"]) for r in record["rescaled"]]
        print(f"{name}: detections per image {counts}, score range "
              f"{min(float(r['scores'].min()) for r in record['rescaled']):.4f}.."
              f"{max(float(r['scores'].max()) for r in record['rescaled']):.4f}")
    torch.save(fixture, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
