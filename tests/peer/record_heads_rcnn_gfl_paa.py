"""Record mmdetection 3.3's own auxiliary heads on fixed inputs, for tests/test_peer_heads_rcnn_gfl_paa.py.

Run by hand in the peer venv (never by CI, never imported by the tests):

    PYTHONPATH=/path/to/scikit-learn ~/.cache/codetr-peer/venv/bin/python tests/peer/record_heads_rcnn_gfl_paa.py

(PAA's assignment fits scikit-learn's GaussianMixture, which the peer venv does not ship: put a
scikit-learn for python 3.11 on PYTHONPATH, e.g. `pip install --target DIR --python-version 3.11
--only-binary=:all: --no-deps scikit-learn threadpoolctl joblib cloudpickle narwhals`.)

Writes tests/fixtures/peer/head2_{faster_rcnn,gfl,paa}.pt (torch.save of plain tensors / dicts / lists):
  - "config": the dimensions and the mmdet settings used, "loss_weights": mmdet's loss_weight per term;
  - "state_dict": the mmdet head's state dict (random weights, fixed seed);
  - "inputs": 5 feature maps [2, C, H_l, W_l] at strides 8..128 of a padded batch of two images of
    different valid sizes, the valid sizes (h, w), ground-truth boxes (xyxy pixels) and labels;
  - "losses": mmdet's loss terms as it returns them (weighted by "loss_weights"; per-level lists summed);
  - "assignment": per image, what mmdet assigned (see each recorder);
  - "randperm": every torch.randperm result drawn while the head ran, in order (the random samplers'
    draws), so that a test can replay them;
  - "image1_without_gt": the same head and maps with image 1 left without ground truth: its gt_boxes /
    gt_labels, losses, assignment and randperm.

Settings: the heads' mmdet 3.3 classes with Co-DETR's released settings where Co-DETR sets them
(Sense-X/Co-DETR projects/configs/co_deformable_detr/co_deformable_detr_r50_1x_coco.py: the RPN on strides
8..128, octave base scale 4, 3 scales, MaxIoU 0.7/0.3/0.3, 256 samples at 0.5, nms_pre 4000, NMS 0.7,
1000 proposals; the RoI head on strides 8..64 with finest_scale 112, MaxIoU 0.5 without low-quality
matches, 512 samples at 0.25 with GT as proposals, GIoU on decoded boxes; all loss weights
x num_dec_layer * lambda_2 = 12). Co-DETR releases no GFL or PAA config: those use mmdet's
gfl_r50_fpn_1x / paa_r50_fpn_1x settings and loss weights with Co-DETR's one stacked conv and anchors of
octave scale 8 on strides 8..128. Image metas: img_shape = pad_shape = the valid size (the released
pipeline pads each image with size_divisor 1), so valid anchors are those whose grid cell lies in the image.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from mmengine.config import ConfigDict
from mmengine.structures import InstanceData

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules

OUT = Path(__file__).resolve().parents[1] / "fixtures" / "peer"
NUM_CLASSES = 4
CHANNELS = 32  # GroupNorm(32) in the one-stage heads' towers needs a multiple of 32
RCNN_FC = 32
STRIDES = [8, 16, 32, 64, 128]
PAD_HW = (160, 224)  # the padded batch
IMAGE_SIZES = [(160, 224), (118, 150)]  # valid (h, w) of each image
RELEASED = 6 * 2.0  # Co-DETR's num_dec_layer * lambda_2


def feature_sizes() -> list[tuple[int, int]]:
    """Map sizes of the padded batch: ceil(size / stride) per level (as strided convs give)."""
    return [(-(-PAD_HW[0] // s), -(-PAD_HW[1] // s)) for s in STRIDES]


def make_inputs(seed: int = 0, without_gt: tuple[int, ...] = ()) -> dict:
    """The recorded inputs; images listed in without_gt get no ground truth (same maps)."""
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, CHANNELS, h, w, generator=generator) for h, w in feature_sizes()]
    masks = []
    for level, (h, w) in enumerate(feature_sizes()):
        mask = torch.ones(2, h, w, dtype=torch.bool)
        for image, (ih, iw) in enumerate(IMAGE_SIZES):
            mask[image, : -(-ih // STRIDES[level]), : -(-iw // STRIDES[level])] = False
        masks.append(mask)
    # a small and a large box in each image, the rest medium; coordinates off the integer grid
    gt_boxes = [
        torch.tensor([[12.3, 20.7, 24.1, 33.9],      # small (12 x 13)
                      [30.2, 15.6, 190.4, 150.8],    # large
                      [100.5, 60.2, 160.7, 110.1],
                      [150.3, 100.9, 215.6, 155.2],
                      [60.8, 90.4, 92.6, 140.3]]),
        # small: 20 x 21, its best RPN anchor IoU (about 0.42) lies between min_pos_iou 0.3 and pos_iou_thr 0.7,
        # so only the RPN's low-quality match makes it positive
        torch.tensor([[5.4, 8.2, 25.6, 29.5],
                      [20.6, 10.1, 140.2, 112.7],    # large
                      [70.3, 40.5, 120.8, 90.6]]),
    ]
    gt_labels = [torch.tensor([0, 1, 2, 3, 1]), torch.tensor([2, 0, 3])]
    for image in without_gt:
        gt_boxes[image], gt_labels[image] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    return {"maps": maps, "masks": masks, "strides": STRIDES, "image_sizes": torch.tensor(IMAGE_SIZES),
            "gt_boxes": gt_boxes, "gt_labels": gt_labels}


def data_samples(inputs: dict, class_agnostic: bool = False) -> list[DetDataSample]:
    samples = []
    for (h, w), boxes, labels in zip(IMAGE_SIZES, inputs["gt_boxes"], inputs["gt_labels"]):
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), pad_shape=(h, w), batch_input_shape=PAD_HW,
                                             ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        gt = InstanceData()
        gt.bboxes = boxes.clone()
        gt.labels = torch.zeros_like(labels) if class_agnostic else labels.clone()
        sample.gt_instances = gt
        samples.append(sample)
    return samples


def randomize(module: torch.nn.Module, seed: int, gains: dict[str, float], biases: dict[str, float] | None = None
              ) -> None:
    """Deterministic random weights: weights ~ N(0, gain / sqrt(fan_in)), biases ~ N(0, 0.1) (+ a shift where a
    name fragment of `biases` matches, e.g. to start class scores where a score threshold matters), GroupNorm affine
    ~ 1 + N(0, 0.1) / N(0, 0.1), Scales ~ 1 + N(0, 0.1). `gains`: name fragment -> gain."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("scale") or ".gn.weight" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise + next((b for key, b in (biases or {}).items() if key in name), 0.0))
            else:
                gain = next((g for key, g in gains.items() if key in name), 1.0)
                param.copy_(noise * gain / param[0].numel() ** 0.5)


class Recorder:
    """Wraps methods of mmdet modules and torch.randperm to keep what they returned."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}
        self.randperm: list[torch.Tensor] = []
        self._undo: list = []

    def wrap(self, owner, name: str, key: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            result = original(*args, **kwargs)
            self.calls.setdefault(key, []).append(result)
            return result

        setattr(owner, name, wrapped)
        self._undo.append((owner, name, original))

    def __enter__(self) -> "Recorder":
        original = torch.randperm

        def randperm(*args, **kwargs):
            result = original(*args, **kwargs)
            self.randperm.append(result.clone())
            return result

        torch.randperm = randperm
        self._undo.append((torch, "randperm", original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def valid_flags(head, inputs: dict) -> list[torch.Tensor]:
    """Per image [M] bool over all anchors (levels concatenated): mmdet's valid flags (= inside flags
    with allowed_border -1)."""
    sizes = [torch.Size(s) for s in feature_sizes()]
    metas = [dict(img_shape=s, pad_shape=s, batch_input_shape=PAD_HW) for s in IMAGE_SIZES]
    _, flags = head.get_anchors(sizes, metas, device="cpu")
    return [torch.cat(f) for f in flags]


def summed(losses: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in losses.items():
        if isinstance(value, (list, tuple)):
            value = sum(value)
        if key.startswith("loss"):  # StandardRoIHead also returns the accuracy "acc", not a loss
            out[key] = value.detach().clone()
    return out


def sampling_record(result) -> dict:
    return {"pos_inds": result.pos_inds.clone(), "neg_inds": result.neg_inds.clone(),
            "pos_assigned_gt_inds": result.pos_assigned_gt_inds.clone(),
            "pos_gt_labels": result.pos_gt_labels.clone(), "pos_is_gt": result.pos_is_gt.bool().clone()}


# --------------------------------------------------------------------------------------------- RPN + RoI
def record_faster_rcnn(inputs: dict) -> dict:
    assert sum(w * h for w, h in feature_sizes()) * 9 < 2 ** 15, "randperm draws are stored as int16"
    rpn_train = ConfigDict(
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                      match_low_quality=True, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1, add_gt_as_proposals=False),
        allowed_border=-1, pos_weight=-1, debug=False)
    rpn_proposal = ConfigDict(nms_pre=4000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0)
    rcnn_train = ConfigDict(
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                      match_low_quality=False, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True),
        pos_weight=-1, debug=False)
    weights = {"loss_rpn_cls": 1.0 * RELEASED, "loss_rpn_bbox": 1.0 * RELEASED, "loss_cls": 1.0 * RELEASED,
               "loss_bbox": 10.0 * RELEASED}
    rpn = MODELS.build(dict(
        type="RPNHead", in_channels=CHANNELS, feat_channels=CHANNELS,
        anchor_generator=dict(type="AnchorGenerator", octave_base_scale=4, scales_per_octave=3,
                              ratios=[0.5, 1.0, 2.0], strides=STRIDES),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=weights["loss_rpn_cls"]),
        loss_bbox=dict(type="L1Loss", loss_weight=weights["loss_rpn_bbox"]),
        train_cfg=rpn_train, test_cfg=rpn_proposal))
    roi = MODELS.build(dict(
        type="StandardRoIHead",
        bbox_roi_extractor=dict(type="SingleRoIExtractor", roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
                                out_channels=CHANNELS, featmap_strides=STRIDES[:4], finest_scale=112),
        bbox_head=dict(type="Shared2FCBBoxHead", in_channels=CHANNELS, fc_out_channels=RCNN_FC, roi_feat_size=7,
                       num_classes=NUM_CLASSES,
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
                       reg_class_agnostic=False, reg_decoded_bbox=True,
                       loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=weights["loss_cls"]),
                       loss_bbox=dict(type="GIoULoss", loss_weight=weights["loss_bbox"])),
        train_cfg=rcnn_train, test_cfg=None))
    randomize(rpn, 1, {"rpn_reg": 0.5, "rpn_cls": 2.0})
    randomize(roi, 2, {"fc_reg": 0.3})

    maps = [m.clone() for m in inputs["maps"]]
    with Recorder() as rec:
        rec.wrap(rpn.sampler, "sample", "rpn_sample")
        rec.wrap(roi.bbox_sampler, "sample", "roi_sample")
        rec.wrap(roi.bbox_head, "loss_and_target", "roi_loss_and_target")
        rec.wrap(roi, "_bbox_forward", "roi_forward")
        # as Co-DETR's detector: the RPN sees every GT as class 0
        rpn_losses, proposals = rpn.loss_and_predict(maps, data_samples(inputs, class_agnostic=True),
                                                     proposal_cfg=rpn_proposal)
        proposal_boxes = [p.bboxes.clone() for p in proposals]
        proposal_scores = [p.scores.clone() for p in proposals]
        roi_losses = roi.loss(maps, copy.deepcopy(proposals), data_samples(inputs))

    flags = valid_flags(rpn, inputs)
    targets = rec.calls["roi_loss_and_target"][0]["bbox_targets"]  # (labels, label_weights, boxes, box_weights)
    roi_samples = [sampling_record(r) for r in rec.calls["roi_sample"]]
    counts = [len(r["pos_inds"]) + len(r["neg_inds"]) for r in roi_samples]
    # Co-DETR's content feature of an RoI query: the pooled 7 x 7 feature averaged over the grid
    features = rec.calls["roi_forward"][0]["bbox_feats"].detach().mean(dim=(2, 3)).split(counts)
    for record, result, labels, boxes, feats in zip(roi_samples, rec.calls["roi_sample"], targets[0].split(counts),
                                                    targets[2].split(counts), features):
        record.update(rois=result.priors.clone(), labels=labels.clone(), target_boxes=boxes.clone(),
                      features=feats.clone())
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "fc_channels": RCNN_FC, "num_convs": 1,
                   "rpn_strides": STRIDES, "roi_strides": STRIDES[:4], "finest_scale": 112.0,
                   "num_proposals": 1000, "nms_pre": 4000},
        "loss_weights": weights,
        "state_dict": {**{f"rpn_head.{k}": v.clone() for k, v in rpn.state_dict().items()},
                       **{f"roi_head.{k}": v.clone() for k, v in roi.state_dict().items()}},
        "inputs": inputs,
        "losses": {**summed(rpn_losses), **summed(roi_losses)},
        "assignment": {
            "rpn_valid": flags,
            "rpn": [sampling_record(r) for r in rec.calls["rpn_sample"]],
            "proposals": proposal_boxes,
            "proposal_scores": proposal_scores,
            "roi": roi_samples,
        },
        "randperm": [p.to(torch.int16) for p in rec.randperm],
    }


# --------------------------------------------------------------------------------------------------- GFL
def record_gfl(inputs: dict) -> dict:
    weights = {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_dfl": 0.25}
    head = MODELS.build(dict(
        type="GFLHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1, feat_channels=CHANNELS,
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=STRIDES),
        loss_cls=dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=weights["loss_cls"]),
        loss_dfl=dict(type="DistributionFocalLoss", loss_weight=weights["loss_dfl"]),
        loss_bbox=dict(type="GIoULoss", loss_weight=weights["loss_bbox"]),
        reg_max=16,
        train_cfg=ConfigDict(assigner=dict(type="ATSSAssigner", topk=9), allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=None))
    randomize(head, 3, {"gfl_reg": 1.0, "gfl_cls": 1.0})
    with torch.no_grad():
        head.gfl_cls.bias.add_(-2.0)  # most anchors are background: start the class scores low
    with Recorder() as rec:
        rec.wrap(head.assigner, "assign", "assign")
        losses = head.loss([m.clone() for m in inputs["maps"]], data_samples(inputs))
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "num_convs": 1, "strides": STRIDES,
                   "octave_base_scale": 8.0, "reg_max": 16, "topk": 9},
        "loss_weights": weights,
        "state_dict": {k: v.clone() for k, v in head.state_dict().items()},
        "inputs": inputs,
        "losses": summed(losses),
        # per image, over the valid anchors (levels concatenated): gt_inds 0 negative, k >= 1 -> GT k - 1
        "assignment": {"valid": valid_flags(head, inputs),
                       "gt_inds": [r.gt_inds.clone() for r in rec.calls["assign"]]},
        "randperm": [p.to(torch.int16) for p in rec.randperm],
    }


# --------------------------------------------------------------------------------------------------- PAA
def record_paa(inputs: dict) -> dict:
    weights = {"loss_cls": 1.0, "loss_bbox": 1.3, "loss_iou": 0.5}
    head = MODELS.build(dict(
        type="PAAHead", num_classes=NUM_CLASSES, in_channels=CHANNELS, stacked_convs=1, feat_channels=CHANNELS,
        reg_decoded_bbox=True, score_voting=True, topk=9,
        anchor_generator=dict(type="AnchorGenerator", ratios=[1.0], octave_base_scale=8, scales_per_octave=1,
                              strides=STRIDES),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[0.1, 0.1, 0.2, 0.2]),
        loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=weights["loss_cls"]),
        loss_bbox=dict(type="GIoULoss", loss_weight=weights["loss_bbox"]),
        loss_centerness=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=weights["loss_iou"]),
        train_cfg=ConfigDict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.1, neg_iou_thr=0.1, min_pos_iou=0,
                                           ignore_iof_thr=-1),
                             allowed_border=-1, pos_weight=-1, debug=False),
        test_cfg=None))
    randomize(head, 4, {"atss_reg": 0.5, "atss_cls": 1.0})
    with torch.no_grad():
        head.atss_cls.bias.add_(-2.0)
    with Recorder() as rec:
        rec.wrap(head.assigner, "assign", "assign")
        rec.wrap(head, "get_pos_loss", "pos_loss")
        rec.wrap(head, "paa_reassign", "reassign")
        losses = head.loss([m.clone() for m in inputs["maps"]], data_samples(inputs))
    flags = valid_flags(head, inputs)
    final = []
    for (labels, *_), valid, pre in zip(rec.calls["reassign"], flags, rec.calls["assign"]):
        # final labels over the valid anchors; a reassigned positive keeps no GT
        labels = labels[valid]
        gt_inds = torch.where(labels < NUM_CLASSES, pre.gt_inds, torch.zeros_like(pre.gt_inds))
        final.append(gt_inds.clone())
    return {
        "config": {"num_classes": NUM_CLASSES, "in_channels": CHANNELS, "num_convs": 1, "strides": STRIDES,
                   "octave_base_scale": 8.0, "topk": 9},
        "loss_weights": weights,
        "state_dict": {k: v.clone() for k, v in head.state_dict().items()},
        "inputs": inputs,
        "losses": summed(losses),
        # per image over the valid anchors: the MaxIoU pre-assignment, the score (loss) of each
        # pre-assigned positive in anchor order, and the final gt_inds after the GMM split
        "assignment": {"valid": flags,
                       "pre_gt_inds": [r.gt_inds.clone() for r in rec.calls["assign"]],
                       "pos_scores": [r[0].detach().clone() for r in rec.calls["pos_loss"]],
                       "gt_inds": final},
        "randperm": [p.to(torch.int16) for p in rec.randperm],
    }


def main() -> None:
    register_all_modules()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, record in (("faster_rcnn", record_faster_rcnn), ("gfl", record_gfl), ("paa", record_paa)):
        torch.manual_seed(0)  # the samplers' draws, so that a re-recording gives the same fixture
        fixture = record(make_inputs())
        # the same head and maps with image 1 left without ground truth (the released config trains on
        # such images: filter_empty_gt=False): losses, assignment and draws only
        variant = record(make_inputs(without_gt=(1,)))
        for roi in variant["assignment"].get("roi", []):
            del roi["features"]  # checked once, on the main inputs (keeps the fixture small)
        assert all(torch.equal(v, variant["state_dict"][k]) for k, v in fixture["state_dict"].items())
        fixture["image1_without_gt"] = {
            "gt_boxes": variant["inputs"]["gt_boxes"], "gt_labels": variant["inputs"]["gt_labels"],
            **{key: variant[key] for key in ("losses", "assignment", "randperm")},
        }
        path = OUT / f"head2_{name}.pt"
        torch.save(fixture, path)
        terms = ", ".join(f"{k}={float(v):.6f}" for k, v in fixture["losses"].items())
        print(f"{path.name}: {path.stat().st_size / 1e3:.0f} kB; {terms}")
        print("    image 1 without GT: " + ", ".join(f"{k}={float(v):.6f}" for k, v in variant["losses"].items()))


if __name__ == "__main__":
    main()
