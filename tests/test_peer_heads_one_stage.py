"""codetr's ATSS, FCOS and RetinaNet auxiliary heads against mmdetection 3.3's own heads.

The fixtures tests/fixtures/peer/head_{atss,fcos,retinanet}.pt were recorded by
tests/peer/record_heads_atss_fcos_retina.py in the peer venv (mmdet 3.3.0, mmcv 2.1.0): mmdet's head
with random weights (fixed seed) on a padded batch of two images (valid 128 x 160 and 96 x 120, maps at
strides 8..128, 32 channels, 3-4 GT boxes each from 8 x 10 to 130 x 90 px). Each test converts the mmdet
weights with codetr.convert.mmdet_heads_one_stage, runs codetr's head on the same inputs and requires:
  - every raw loss term (mmdet's term, summed over levels, divided by its recorded loss_weight) equal
    within rtol 1e-4, atol 1e-5 (float32, CPU);
  - the gradient of the sum of raw terms with respect to the five input maps equal within rtol 1e-3,
    atol 1e-4 x the largest |gradient| of the map (sums over thousands of anchors in another order);
  - the assignment identical: the same anchors / points, valid set, positive set, assigned GT index
    and label (exact), and, for RetinaNet, the same ignored set.

Differences from the stock mmdet heads, and how the comparison handles them:
  - ATSS is recorded with Co-DETR's released CoATSSHead config (anchors of octave scale 8 on strides
    8..128, GIoU, topk 9); its loss weights 12 / 24 / 12 fold num_dec_layer x lambda_2 = 12, which codetr
    applies in its total loss instead: codetr's head weights are the released ones / 12.
  - FCOS: mmdet's FCOSHead never looks at image sizes, so points in the batch padding are classification
    negatives; codetr leaves them out by default. The test sets FCOSHead(ignore_padding=False) (config:
    model.aux.fcos_ignore_padding=false), the
    peer's behaviour, and checks that the default only drops padded points (never a positive). The
    recording uses mmdet's "center-normbbox-centeronreg-giou" settings with the default conv_bias
    ("auto": no bias before GroupNorm); that config's conv_bias=True has no counterpart in codetr's towers
    and the converter rejects such keys (tested). Two tower convs, to exercise the tower mapping.
  - RetinaNet: Co-DETR's form (GroupNorm towers, GIoU on decoded boxes: mmdet's reg_decoded_bbox=True
    with GIoULoss), not stock RetinaNet's L1 on deltas without normalisation.
  - mmdet divides by avg_factor + float32 eps and adds eps 1e-6 to IoU unions; the effect (~1e-7
    relative) lies far inside the tolerances.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from codetr.convert.common import ConversionError
from codetr.convert.mmdet_heads_one_stage import convert_one_stage_head
from codetr.models.co_detr.heads.atss import ATSSHead
from codetr.models.co_detr.heads.fcos import FCOSHead
from codetr.models.co_detr.heads.retinanet import RetinaNetHead
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs, Candidates

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "peer"
KINDS = ["atss", "fcos", "retinanet"]
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL_FRACTION = 1e-3, 1e-4


def load_record(kind: str) -> dict:
    """The recorded fixture of one head; a missing fixture fails the test (fixtures are committed)."""
    path = FIXTURES / f"head_{kind}.pt"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run tests/peer/record_heads_atss_fcos_retina.py in the peer venv")
    return torch.load(path, weights_only=True)


def aux_inputs(record: dict) -> AuxInputs:
    """The recorded batch as codetr's AuxInputs; maps are fresh leaves that require grad."""
    inputs = record["inputs"]
    maps = [m.clone().requires_grad_() for m in inputs["maps"]]
    masks = []
    for m, stride in zip(maps, inputs["strides"]):
        height, width = m.shape[-2:]
        ys = torch.arange(height)[:, None] * stride
        xs = torch.arange(width)[None, :] * stride
        masks.append(torch.stack([(ys >= h) | (xs >= w) for h, w in inputs["image_sizes"].tolist()]))
    return AuxInputs(
        maps=maps, masks=masks, strides=list(inputs["strides"]), image_sizes=inputs["image_sizes"],
        gt_boxes=list(inputs["gt_boxes"]), gt_labels=list(inputs["gt_labels"]),
    )


def build_head(kind: str, record: dict, **options) -> torch.nn.Module:
    """codetr's head with the recorded dimensions, loaded (strictly) with the converted mmdet weights."""
    cfg, strides = record["config"], record["inputs"]["strides"]
    common = dict(num_classes=cfg["num_classes"], in_channels=cfg["in_channels"], num_convs=cfg["num_convs"],
                  feat_channels=cfg["feat_channels"], strides=strides)
    if kind == "atss":
        head = ATSSHead(**common, octave_base_scale=cfg["octave_base_scale"],
                        scales_per_octave=cfg["scales_per_octave"], ratios=cfg["ratios"], topk=cfg["topk"],
                        target_stds=cfg["target_stds"], **options)
    elif kind == "retinanet":
        head = RetinaNetHead(**common, octave_base_scale=cfg["octave_base_scale"],
                             scales_per_octave=cfg["scales_per_octave"], ratios=cfg["ratios"],
                             pos_iou_thr=cfg["pos_iou_thr"], neg_iou_thr=cfg["neg_iou_thr"],
                             min_pos_iou=cfg["min_pos_iou"], target_stds=cfg["target_stds"], **options)
    else:
        options = {"ignore_padding": False, **options}  # mmdet's FCOSHead: padded points are negatives
        head = FCOSHead(**common, regress_ranges=[tuple(r) for r in cfg["regress_ranges"]],
                        center_sampling=cfg["center_sampling"], center_sample_radius=cfg["center_sample_radius"],
                        **options)
    head.load_state_dict(convert_one_stage_head(kind, record["state_dict"]), strict=True)
    return head.train()


def run(kind: str, **options) -> tuple[dict, AuxInputs, AuxHeadOutput]:
    record = load_record(kind)
    inputs = aux_inputs(record)
    return record, inputs, build_head(kind, record, **options)(inputs)


def assigned_gt_index(candidates: Candidates, gt_boxes: Tensor) -> Tensor:
    """[M] index of the GT box each positive candidate's target box is (exactly), -1 for the rest."""
    index = torch.full((len(candidates.labels),), -1, dtype=torch.int64)
    pos = candidates.positive
    same = (candidates.target_boxes[pos][:, None, :] == gt_boxes[None, :, :]).all(-1)  # [P, N]
    assert bool((same.sum(1) == 1).all()), "a positive's target box is not exactly one GT box"
    index[pos] = same.int().argmax(1)
    return index



@pytest.mark.parametrize("kind", KINDS)
def test_loss_terms_equal_mmdet(kind: str) -> None:
    record, _, out = run(kind)
    weights = record["loss_weights"]
    assert set(out.losses) == set(record["losses"])
    for key, mmdet_weighted in record["losses"].items():
        expected = mmdet_weighted / weights[key]
        torch.testing.assert_close(out.losses[key].detach(), expected, rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   msg=lambda m, key=key: f"{kind} {key}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_relative_loss_weights_equal_mmdet(kind: str) -> None:
    """codetr's per-head weights are mmdet's loss weights without the folded factor (12 for Co-DETR's ATSS)."""
    record = load_record(kind)
    head = build_head(kind, record)
    expected = {k: w / record["loss_weight_fold"] for k, w in record["loss_weights"].items()}
    assert head.loss_weights == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_input_gradients_equal_mmdet(kind: str) -> None:
    record, inputs, out = run(kind)
    sum(out.losses.values()).backward()
    for level, (ours, theirs) in enumerate(zip(inputs.maps, record["input_grads"])):
        assert float(theirs.abs().max()) > 0
        torch.testing.assert_close(ours.grad, theirs, rtol=GRAD_RTOL, atol=GRAD_ATOL_FRACTION * float(theirs.abs().max()),
                                   msg=lambda m, level=level: f"{kind} level {level}: {m}")


@pytest.mark.parametrize("kind", ["atss", "retinanet"])
def test_anchor_assignment_identical(kind: str) -> None:
    record, inputs, out = run(kind)
    recorded = record["assignment"]
    head = build_head(kind, record)
    anchors = head.anchors(inputs.maps)
    anchors = anchors[0] if isinstance(anchors, tuple) else anchors
    torch.testing.assert_close(anchors, recorded["anchors"], rtol=0, atol=1e-4)
    num_classes = record["config"]["num_classes"]
    total_pos = 0
    for image, cand in enumerate(out.candidates):
        valid = recorded["valid"][image]
        gt_inds = recorded["gt_inds"][image]  # over the valid anchors: 0 negative, -1 ignored, k -> GT k - 1
        # RetinaNet leaves ignored anchors out of its candidates; ATSS ignores none and, as mmdet's unmap,
        # returns every anchor: the invalid ones as zero boxes labelled background
        kept = gt_inds >= 0
        if kind == "atss":
            assert bool(kept.all())
            assert torch.equal(cand.boxes[~valid], torch.zeros(int((~valid).sum()), 4))
            assert bool((cand.labels[~valid] == num_classes).all())
            cand = Candidates(cand.boxes[valid], cand.labels[valid], cand.target_boxes[valid], None, cand.num_gt,
                              cand.num_classes)
        torch.testing.assert_close(cand.boxes, recorded["anchors"][valid][kept], rtol=0, atol=1e-4)
        expected_pos = gt_inds[kept] > 0
        assert torch.equal(cand.positive, expected_pos)
        expected_gt = torch.where(expected_pos, gt_inds[kept] - 1, torch.full_like(gt_inds[kept], -1))
        assert torch.equal(assigned_gt_index(cand, inputs.gt_boxes[image]), expected_gt)
        expected_labels = torch.where(expected_pos, recorded["labels"][image][kept],
                                      torch.full_like(gt_inds[kept], num_classes))
        assert torch.equal(cand.labels, expected_labels)
        total_pos += int(expected_pos.sum())
    assert total_pos > 0


def test_fcos_assignment_identical() -> None:
    record, inputs, out = run("fcos")
    recorded = record["assignment"]
    num_classes = record["config"]["num_classes"]
    for image, cand in enumerate(out.candidates):
        centres = 0.5 * (cand.boxes[:, :2] + cand.boxes[:, 2:])
        torch.testing.assert_close(centres, recorded["points"], rtol=0, atol=1e-4)
        assert torch.equal(cand.labels, recorded["labels"][image])
        assert torch.equal(assigned_gt_index(cand, inputs.gt_boxes[image]), recorded["gt_index"][image])
        assert int((recorded["labels"][image] < num_classes).sum()) > 0


def test_fcos_default_drops_only_padded_points() -> None:
    """codetr's default (ignore_padding=True) keeps mmdet's assignment on the valid points, positives all."""
    record, inputs, out = run("fcos", ignore_padding=True)
    recorded = record["assignment"]
    for image, cand in enumerate(out.candidates):
        h, w = inputs.image_sizes[image].tolist()
        points = recorded["points"]
        valid = (points[:, 0] < w) & (points[:, 1] < h)
        assert len(cand.labels) == int(valid.sum()) < len(points)
        assert torch.equal(cand.labels, recorded["labels"][image][valid])
        assert cand.num_positives == int((recorded["labels"][image] < record["config"]["num_classes"]).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_converter_rejects_unmapped_and_incomplete_keys(kind: str) -> None:
    state = dict(load_record(kind)["state_dict"])
    extra = {"cls_convs.0.conv.bias": torch.zeros(1), "something.else": torch.zeros(1)}
    with pytest.raises(ConversionError, match=r"2 key\(s\).*cls_convs\.0\.conv\.bias, something\.else"):
        convert_one_stage_head(kind, {**state, **extra})
    incomplete = {k: v for k, v in state.items() if k != "reg_convs.0.gn.bias"}
    with pytest.raises(ConversionError, match=r"reg_convs\.0\.gn\.bias"):
        convert_one_stage_head(kind, incomplete)
    with pytest.raises(ConversionError, match="unknown head kind 'gfl2'"):
        convert_one_stage_head("gfl2", state)


def test_converter_keys_are_kind_specific() -> None:
    """ATSS weights are not RetinaNet's: the predictor names differ, so the error lists them."""
    with pytest.raises(ConversionError, match="atss_cls.weight"):
        convert_one_stage_head("retinanet", load_record("atss")["state_dict"])
