"""RetinaNet auxiliary head: default anchors, hand-worked targets, losses against torchvision, smoke training."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from codetr.models.co_detr.heads.retinanet import RetinaNetHead
from codetr.models.co_detr.types import AuxInputs
from tests.head_training import train_head

STRIDES = [8, 16, 32, 64, 128]
GTS = torch.tensor([[16.0, 16.0, 48.0, 48.0], [0.0, 0.0, 20.0, 32.0], [44.0, 44.0, 64.0, 64.0]])


def small_head(**kwargs) -> RetinaNetHead:
    # one square anchor of side 2 * stride per location, so the example can be worked by hand
    return RetinaNetHead(3, 32, strides=(16, 32), octave_base_scale=2.0, scales_per_octave=1, ratios=(1.0,), **kwargs)


def small_inputs(channels: int = 32) -> AuxInputs:
    """Two images on a 64 x 64 canvas; maps at strides 16 (4 x 4) and 32 (2 x 2).

    Image 0: 64 x 64 valid with GTS (classes 2, 0, 1). Image 1: 30 high x 40 wide valid, no GT.
    """
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, channels, 4, 4, generator=g), torch.randn(2, channels, 2, 2, generator=g)]
    return AuxInputs(
        maps=[m.requires_grad_() for m in maps],
        masks=[],
        strides=[16, 32],
        image_sizes=torch.tensor([[64, 64], [30, 40]]),
        gt_boxes=[GTS.clone(), torch.zeros(0, 4)],
        gt_labels=[torch.tensor([2, 0, 1]), torch.zeros(0, dtype=torch.long)],
    )


# Anchors (32 x 32 at stride 16, centres 16 * (x, y); 64 x 64 at stride 32), row-major per level:
#   #10 = [16, 16, 48, 48] is GT 0 itself: IoU 1 -> positive, class 2
#   #5  = [0, 0, 32, 32] vs GT 1 [0, 0, 20, 32]: 640 / 1024 = 0.625 -> positive, class 0
#   #4  = [-16, 0, 16, 32] vs GT 1: 512 / 1152 = 0.444 -> ignored (between 0.4 and 0.5)
#   #15 = [32, 32, 64, 64] vs GT 2 [44, 44, 64, 64]: 400 / 1024 = 0.391 < 0.4, but it is GT 2's best
#         anchor -> low-quality positive, class 1
#   every other anchor's best IoU is <= 1/3 -> negative.
POSITIVES = {10: (0, 2), 5: (1, 0), 15: (2, 1)}
IGNORED = 4
# image 1 (30 x 40 valid): level 0 centres x in {0, 16, 32}, y in {0, 16}; level 1 centres (0, 0), (32, 0)
VALID_IMAGE1 = [0, 1, 2, 4, 5, 6, 16, 17]


def test_default_anchors():
    head = RetinaNetHead(4, 32)
    maps = [torch.zeros(1, 32, 2, 2) for _ in STRIDES]
    anchors = head.anchors(maps)
    assert anchors.shape == (5 * 4 * 9, 4) and head.num_anchors == 9
    for level, stride in enumerate(STRIDES):
        block = anchors[level * 36: level * 36 + 9]  # location (0, 0): ratios outer, scales inner
        for r, ratio in enumerate((0.5, 1.0, 2.0)):
            for s in range(3):
                size = stride * 4 * 2 ** (s / 3)
                w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
                torch.testing.assert_close(block[3 * r + s], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]), rtol=1e-6, atol=1e-4)
        # location (x=1, y=0) is shifted by one stride in x (exact)
        torch.testing.assert_close(anchors[level * 36 + 9], block[0] + torch.tensor([stride, 0, stride, 0.0]))


def test_hand_worked_targets():
    out = small_head()(small_inputs())
    first, second = out.candidates
    kept = [i for i in range(20) if i != IGNORED]  # ignored anchors are no candidates
    expected_labels = [POSITIVES[i][1] if i in POSITIVES else 3 for i in kept]
    assert first.labels.tolist() == expected_labels
    for i, (gt, _) in POSITIVES.items():
        row = kept.index(i)
        torch.testing.assert_close(first.target_boxes[row], GTS[gt])
    assert first.num_positives == 3 and first.num_gt == 3
    assert len(second.labels) == len(VALID_IMAGE1) and second.num_positives == 0
    # features: the map's feature at the anchor's location (anchor 17 = level 1, x 1, y 0)
    inputs = small_inputs()
    out = small_head()(inputs)
    torch.testing.assert_close(out.candidates[1].features_of(torch.tensor([len(out.candidates[1].labels) - 1]))[0], inputs.maps[1][1, :, 0, 1])
    torch.testing.assert_close(out.candidates[0].features_of(torch.tensor([kept.index(10)]))[0], inputs.maps[0][0, :, 2, 2])


def test_ignored_as_candidates_option():
    out = small_head(ignored_as_candidates=True)(small_inputs())
    assert len(out.candidates[0].labels) == 20 and out.candidates[0].labels[IGNORED].item() == 3


def test_losses_match_independent_reference():
    head = small_head()
    inputs = small_inputs()
    out = head(inputs)
    logits, deltas = head.predict(inputs.maps)
    anchors = head.anchors(inputs.maps)
    kept = [i for i in range(20) if i != IGNORED]
    targets0 = torch.zeros(20, 3)
    for i, (_, label) in POSITIVES.items():
        targets0[i, label] = 1.0
    num_pos = 4.0  # 3 + max(0, 1): every image counts at least one positive
    cls = (sigmoid_focal_loss(logits[0, kept], targets0[kept], reduction="sum")
           + sigmoid_focal_loss(logits[1, VALID_IMAGE1], torch.zeros(8, 3), reduction="sum")) / num_pos
    rows = list(POSITIVES)
    decoded = BoxCoder(weights=(1.0, 1.0, 1.0, 1.0)).decode_single(deltas[0, rows], anchors[rows])
    bbox = generalized_box_iou_loss(decoded, GTS[[POSITIVES[i][0] for i in rows]], reduction="sum") / num_pos
    # tolerance: float32 round-off of differently ordered sums
    torch.testing.assert_close(out.losses["loss_cls"], cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_bbox"], bbox, rtol=1e-5, atol=1e-6)
    assert set(out.losses) == set(head.loss_weights) == {"loss_cls", "loss_bbox"}


@pytest.mark.parametrize("num_convs", [0, 2])
def test_no_gt_images_and_tower_depths(num_convs):
    head = RetinaNetHead(3, 32, num_convs=num_convs, strides=(16, 32))
    inputs = small_inputs()
    inputs.gt_boxes = [torch.zeros(0, 4), torch.zeros(0, 4)]
    inputs.gt_labels = [torch.zeros(0, dtype=torch.long)] * 2
    out = head(inputs)
    assert all(torch.isfinite(v) for v in out.losses.values()) and out.losses["loss_bbox"].item() == 0.0
    assert [len(c.labels) for c in out.candidates] == [20 * 9, 8 * 9]
    sum(out.losses.values()).backward()
    assert inputs.maps[0].grad is not None and torch.isfinite(inputs.maps[0].grad).all()


def test_wrong_strides_raise():
    with pytest.raises(ValueError, match="strides"):
        RetinaNetHead(3, 32)(small_inputs())


def test_smoke_training_decreases_loss_and_reaches_inputs():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 32, max(128 // s, 1), max(128 // s, 1), generator=g) for s in STRIDES]
    inputs = AuxInputs(
        maps=maps,
        masks=[torch.zeros(2, m.shape[2], m.shape[3], dtype=torch.bool) for m in maps],
        strides=STRIDES,
        image_sizes=torch.tensor([[128, 128], [100, 120]]),
        gt_boxes=[torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 100.0]]), torch.tensor([[5.0, 5.0, 30.0, 30.0]])],
        gt_labels=[torch.tensor([1, 2]), torch.tensor([0])],
    )
    history, out = train_head(RetinaNetHead(3, 32, num_convs=1), inputs)
    # GroupNorm(32) on 32 channels zeroes the 1x1 stride-128 map inside the tower (no gradient there)
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in inputs.maps[:4])
    assert history[-1] < 0.5 * history[0], history
    assert all(c.num_positives > 0 for c in out.candidates)


def test_autocast_bfloat16():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = small_head()(small_inputs())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())
    assert out.candidates[0].num_positives == 3
