"""ATSS auxiliary head: hand-worked assignment and centerness, losses against torchvision, training smoke test."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from codetr.models.co_detr.heads.atss import ATSSHead, centerness_targets
from codetr.models.co_detr.types import AuxInputs
from tests.head_training import train_head

STRIDES = [8, 16, 32, 64, 128]


def small_inputs(channels: int = 32, seed: int = 0) -> AuxInputs:
    """Two images on a 64 x 64 canvas, maps at strides 16 and 32 (4 x 4 and 2 x 2 locations).

    Image 0: 64 x 64 valid, one GT [4, 6, 36, 22] of class 1. Image 1: 40 x 40 valid, no GT.
    """
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, channels, 4, 4, generator=g), torch.randn(2, channels, 2, 2, generator=g)]
    return AuxInputs(
        maps=[m.requires_grad_() for m in maps],
        masks=[],
        strides=[16, 32],
        image_sizes=torch.tensor([[64, 64], [40, 40]]),
        gt_boxes=[torch.tensor([[4.0, 6.0, 36.0, 22.0]]), torch.zeros(0, 4)],
        gt_labels=[torch.tensor([1]), torch.zeros(0, dtype=torch.long)],
    )


def small_head(num_convs: int = 1) -> ATSSHead:
    # anchors of side = stride (octave base scale 1) so the example can be worked by hand; topk 2
    return ATSSHead(3, 32, num_convs=num_convs, strides=(16, 32), octave_base_scale=1.0, topk=2)


def test_centerness_targets_hand_computed():
    anchors = torch.tensor([[8.0, 8.0, 24.0, 24.0], [10.0, 0.0, 30.0, 20.0], [0.0, 0.0, 10.0, 10.0]])
    gts = torch.tensor([[4.0, 6.0, 36.0, 22.0], [0.0, 0.0, 40.0, 20.0], [0.0, 0.0, 40.0, 10.0]])
    # centre (16, 16): l 12, r 20, t 10, b 6 -> sqrt(12/20 * 6/10) = 0.6
    # centre (20, 10) is the GT's centre -> 1
    # centre (5, 5): l 5, r 35, t 5, b 5 -> sqrt(1/7)
    expected = torch.tensor([0.6, 1.0, math.sqrt(1 / 7)])
    torch.testing.assert_close(centerness_targets(anchors, gts), expected, rtol=1e-6, atol=1e-6)


def test_hand_worked_assignment_and_candidates():
    # Level 0 (stride 16): 16 x 16 anchors centred on (16x, 16y); level 1 (stride 32): 32 x 32 anchors.
    # GT [4, 6, 36, 22], centre (20, 14). Two nearest per level: (16, 16), (32, 16) | (32, 0), (32, 32)
    # with IoUs 224/544, 168/600 | 200/1336, 120/1416: mean 0.231553, unbiased std 0.145001,
    # threshold 0.376554 -> only the anchor centred on (16, 16) (row 1 * 4 + 1 = 5), centre inside.
    head = small_head()
    inputs = small_inputs()
    out = head(inputs)
    first, second = out.candidates
    assert first.labels.tolist() == [3] * 5 + [1] + [3] * 14  # 16 + 4 anchors, background = 3
    torch.testing.assert_close(first.boxes[5], torch.tensor([8.0, 8.0, 24.0, 24.0]))
    torch.testing.assert_close(first.target_boxes[5], torch.tensor([4.0, 6.0, 36.0, 22.0]))
    assert first.num_gt == 1 and first.num_positives == 1
    # the candidate's feature is the input map's feature at its location, with grad
    torch.testing.assert_close(first.features_of(torch.tensor([5]))[0], inputs.maps[0][0, :, 1, 1])
    torch.testing.assert_close(first.features_of(torch.tensor([17]))[0], inputs.maps[1][0, :, 0, 1])
    assert first.features.requires_grad
    # image 1 is valid on 40 x 40: level 0 centres 0, 16, 32 per axis (9), level 1 centres 0, 32 (4). As
    # mmdet's unmap returns them, the other 7 anchors are candidates too: zero boxes, background.
    valid1 = [y * 4 + x for y in range(3) for x in range(3)] + [16, 17, 18, 19]
    invalid1 = [i for i in range(20) if i not in valid1]
    assert len(second.labels) == 20 and second.num_positives == 0 and second.num_gt == 0
    assert second.labels.tolist() == [3] * 20 and torch.equal(second.boxes[invalid1], torch.zeros(7, 4))
    torch.testing.assert_close(second.boxes[valid1], head.anchors(inputs.maps)[0][valid1])
    torch.testing.assert_close(second.features_of(torch.tensor(valid1[:9])), inputs.maps[0][1, :, :3, :3].flatten(1).t())


def test_losses_match_independent_reference():
    head = small_head()
    inputs = small_inputs()
    out = head(inputs)
    logits, deltas, centerness = head.predict(inputs.maps)
    anchors, _ = head.anchors(inputs.maps)
    # targets from the hand-worked example: anchor 5 of image 0 is class 1; image 1 keeps 13 anchors
    valid1 = [y * 4 + x for y in range(3) for x in range(3)] + [16, 17, 18, 19]
    targets0 = torch.zeros(20, 3)
    targets0[5, 1] = 1.0
    num_pos = 2.0  # max(1, 1) + max(0, 1): every image counts at least one positive
    cls = (sigmoid_focal_loss(logits[0], targets0, reduction="sum")
           + sigmoid_focal_loss(logits[1, valid1], torch.zeros(13, 3), reduction="sum")) / num_pos
    decoded = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0)).decode_single(deltas[0, 5:6], anchors[5:6])
    gt = torch.tensor([[4.0, 6.0, 36.0, 22.0]])
    # weighted by centerness 0.6 and divided by the centerness sum clamped >= 1
    bbox = generalized_box_iou_loss(decoded, gt, reduction="sum") * 0.6 / max(0.6, 1.0)
    ctr = F.binary_cross_entropy_with_logits(centerness[0, 5:6], torch.tensor([0.6]), reduction="sum") / num_pos
    # tolerance: float32 round-off of differently ordered sums
    torch.testing.assert_close(out.losses["loss_cls"], cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_bbox"], bbox, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_centerness"], ctr, rtol=1e-5, atol=1e-6)
    assert set(out.losses) == set(head.loss_weights) == {"loss_cls", "loss_bbox", "loss_centerness"}


def test_default_anchors_one_square_of_eight_strides():
    head = ATSSHead(4, 32)
    maps = [torch.zeros(1, 32, 2, 3) for _ in STRIDES]
    anchors, counts = head.anchors(maps)
    assert counts == [6] * 5
    for level, stride in enumerate(STRIDES):
        first = anchors[6 * level]
        torch.testing.assert_close(first, torch.tensor([-4.0, -4.0, 4.0, 4.0]) * stride)


@pytest.mark.parametrize("num_convs", [0, 2])
def test_no_gt_images_and_tower_depths(num_convs):
    head = ATSSHead(3, 32, num_convs=num_convs, strides=(16, 32), octave_base_scale=1.0)
    inputs = small_inputs()
    inputs.gt_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    inputs.gt_labels = [torch.zeros(0, dtype=torch.long)] * 2
    out = head(inputs)
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert out.losses["loss_bbox"].item() == 0.0 and out.losses["loss_centerness"].item() == 0.0
    assert [c.num_positives for c in out.candidates] == [0, 0] and [len(c.labels) for c in out.candidates] == [20, 20]
    assert out.candidates[1].boxes.abs().sum(-1).eq(0).sum() == 7  # the anchors outside image 1, as zero boxes
    sum(out.losses.values()).backward()
    assert inputs.maps[0].grad is not None and torch.isfinite(inputs.maps[0].grad).all()


def test_wrong_strides_raise():
    with pytest.raises(ValueError, match="strides"):
        ATSSHead(3, 32)(small_inputs())


def smoke_inputs(channels: int = 32) -> AuxInputs:
    """2 images on a 128 x 128 canvas (the second 100 x 120 valid), maps at strides 8..128."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, channels, max(128 // s, 1), max(128 // s, 1), generator=g).requires_grad_() for s in STRIDES]
    return AuxInputs(
        maps=maps,
        masks=[torch.zeros(2, m.shape[2], m.shape[3], dtype=torch.bool) for m in maps],
        strides=STRIDES,
        image_sizes=torch.tensor([[128, 128], [100, 120]]),
        gt_boxes=[torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 100.0]]), torch.tensor([[5.0, 5.0, 30.0, 30.0]])],
        gt_labels=[torch.tensor([1, 2]), torch.tensor([0])],
    )


def test_smoke_training_decreases_loss_and_reaches_inputs():
    torch.manual_seed(0)
    history, out = train_head(ATSSHead(3, 32, num_convs=1), inputs := smoke_inputs())
    # GroupNorm(32) on 32 channels zeroes the 1x1 stride-128 map inside the tower (no gradient there)
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in inputs.maps[:4])
    assert history[-1] < 0.5 * history[0], history
    # every GT got positives; image 1's valid anchors are those centred in its 100 x 120 region:
    # 15 x 13 + 8 x 7 + 4 x 4 + 2 x 2 + 1 at strides 8..128; the others are zero-box candidates
    assert all(c.num_positives > 0 for c in out.candidates)
    assert [len(c.labels) for c in out.candidates] == [256 + 64 + 16 + 4 + 1] * 2
    assert int((out.candidates[1].boxes.abs().sum(-1) > 0).sum()) == 195 + 56 + 16 + 4 + 1


def test_autocast_bfloat16():
    head = small_head()
    inputs = small_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(inputs)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    assert out.candidates[0].labels.tolist()[5] == 1
