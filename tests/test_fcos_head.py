"""FCOS auxiliary head: point targets against hand-worked numbers and a brute-force loop, losses against
torchvision.ops, and a smoke training run."""
import math

import pytest
import torch
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from codetr.models.co_detr.heads.fcos import (
    FCOSHead,
    centerness_targets,
    fcos_targets,
    level_points,
    point_boxes,
)
from tests.head_training import STRIDES, make_inputs

RANGES = [(-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, math.inf)]


def one_level(size: int, stride: int, low: float = -1.0, high: float = math.inf):
    points = level_points((size, size), stride)
    strides = torch.full((len(points),), float(stride))
    ranges = torch.tensor([low, high]).expand(len(points), 2)
    return points, strides, ranges


def positive_points(targets, points) -> set:
    return {tuple(p) for p in points[targets.labels != 80].tolist()}


def test_points_follow_mmdet_offset():
    # mmdet 2.x MlvlPointGenerator (offset 0.5) == x * stride + stride // 2 for even strides; row-major (y, x).
    points = level_points((2, 3), 16)
    expected = torch.tensor([[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]], dtype=torch.float32)
    assert torch.equal(points, expected)
    boxes = point_boxes(points[:1], torch.tensor([16.0]))
    assert torch.equal(boxes, torch.tensor([[8 - 64, 8 - 64, 8 + 64, 8 + 64]], dtype=torch.float32))


def test_targets_hand_worked():
    # stride 8, 4x4 points at {4, 12, 20, 28}; GT (2, 2, 26, 18), centre (14, 10); the 1.5 * 8 = 12 px
    # centre region covers the whole box, so the positives are the points strictly inside it:
    # x in {4, 12, 20}, y in {4, 12}.
    points, strides, ranges = one_level(4, 8, -1.0, 64.0)
    gt = torch.tensor([[2.0, 2.0, 26.0, 18.0]])
    targets = fcos_targets(points, strides, ranges, gt, torch.tensor([3]), num_classes=80)
    positive = targets.labels != 80
    assert positive_points(targets, points) == {(x, y) for x in (4.0, 12.0, 20.0) for y in (4.0, 12.0)}
    assert set(targets.labels[positive].tolist()) == {3}
    assert set(targets.gt_index.tolist()) == {0, -1}
    # (l, t, r, b) = (x - 2, y - 2, 26 - x, 18 - y), row-major order of the positives
    expected = torch.tensor([
        [2, 2, 22, 14], [10, 2, 14, 14], [18, 2, 6, 14],
        [2, 10, 22, 6], [10, 10, 14, 6], [18, 10, 6, 6],
    ], dtype=torch.float32)
    assert torch.equal(targets.distances[positive], expected)
    assert torch.equal(targets.distances[~positive], torch.zeros(10, 4))
    # centerness = sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b)); e.g. (12, 12): sqrt(10/14 * 6/10) = 0.65465
    expected_ctr = torch.tensor([
        math.sqrt(2 / 22 * 2 / 14), math.sqrt(10 / 14 * 2 / 14), math.sqrt(6 / 18 * 2 / 14),
        math.sqrt(2 / 22 * 6 / 10), math.sqrt(10 / 14 * 6 / 10), math.sqrt(6 / 18 * 6 / 10),
    ])
    torch.testing.assert_close(centerness_targets(targets.distances[positive]), expected_ctr, rtol=1e-6, atol=1e-7)
    # the regress range [low, high] (both ends inclusive) applies to the largest distance: with [14, 18],
    # (12, y) (max 14) and (20, y) (max 18) stay, (4, y) (max 22) goes
    narrow = fcos_targets(points, strides, torch.tensor([14.0, 18.0]).expand(16, 2), gt, torch.tensor([3]), 80)
    assert positive_points(narrow, points) == {(12.0, 4.0), (20.0, 4.0), (12.0, 12.0), (20.0, 12.0)}


@pytest.mark.parametrize(
    "stride, size, radius, expected_axis",
    [
        (8, 16, 1.5, (60.0, 68.0)),  # centre 64 +- 12 (strict): 52 and 76 are out
        (8, 16, 2.5, (52.0, 60.0, 68.0, 76.0)),  # 64 +- 20
        (16, 8, 1.5, (56.0, 72.0)),  # 64 +- 24: 40 and 88 are out
    ],
)
def test_center_sampling_radius(stride, size, radius, expected_axis):
    points, strides, ranges = one_level(size, stride)
    gt = torch.tensor([[0.0, 0.0, 128.0, 128.0]])
    targets = fcos_targets(points, strides, ranges, gt, torch.tensor([0]), 80, center_sampling=True, radius=radius)
    assert positive_points(targets, points) == {(x, y) for x in expected_axis for y in expected_axis}
    # without center sampling every point strictly inside the box is positive
    everything = fcos_targets(points, strides, ranges, gt, torch.tensor([0]), 80, center_sampling=False)
    assert int((everything.labels == 0).sum()) == size * size


def test_center_region_is_clipped_to_the_box():
    # thin box x in (58, 66): the 12 px region around cx = 62 is cut to the box, so only x = 60 qualifies
    # (uncut it would also admit x = 52 and 68); y: 64 +- 12 -> 60, 68
    points, strides, ranges = one_level(16, 8)
    gt = torch.tensor([[58.0, 0.0, 66.0, 128.0]])
    targets = fcos_targets(points, strides, ranges, gt, torch.tensor([5]), 80)
    assert positive_points(targets, points) == {(60.0, 60.0), (60.0, 68.0)}


def test_smallest_area_wins_and_equal_areas_go_to_lower_index():
    points, strides, ranges = one_level(4, 8)
    big = [0.0, 0.0, 32.0, 32.0]  # area 1024, contains everything
    small = [8.0, 8.0, 24.0, 24.0]  # area 256, centre (16, 16)
    targets = fcos_targets(points, strides, ranges, torch.tensor([big, small]), torch.tensor([1, 2]), 80,
                           center_sampling=False)
    inner = {(12.0, 12.0), (12.0, 20.0), (20.0, 12.0), (20.0, 20.0)}
    for (x, y), label, index in zip(points.tolist(), targets.labels.tolist(), targets.gt_index.tolist()):
        assert (label, index) == ((2, 1) if (x, y) in inner else (1, 0))
    # the same when the big box comes second: the area decides, not the order
    swapped = fcos_targets(points, strides, ranges, torch.tensor([small, big]), torch.tensor([2, 1]), 80,
                           center_sampling=False)
    assert torch.equal(swapped.labels, targets.labels)
    # two boxes of equal area (1024) covering the point (16, 16)-region: the lower index wins
    left, right = [0.0, 0.0, 32.0, 32.0], [4.0, 0.0, 36.0, 32.0]
    tie = fcos_targets(points, strides, ranges, torch.tensor([right, left]), torch.tensor([7, 9]), 80,
                       center_sampling=False)
    both = (points[:, 0] > 4) & (points[:, 0] < 32)
    assert set(tie.gt_index[both].tolist()) == {0}
    assert set(tie.labels[both].tolist()) == {7}


def brute_force_targets(points, strides, ranges, gt_boxes, gt_labels, num_classes, radius):
    """Point-by-point Python loop over the FCOS rules (reference for the vectorised version)."""
    labels, indices = [], []
    for (x, y), s, (low, high) in zip(points.tolist(), strides.tolist(), ranges.tolist()):
        best, best_area = -1, math.inf
        for k, (x1, y1, x2, y2) in enumerate(gt_boxes.tolist()):
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            rx1, ry1 = max(cx - radius * s, x1), max(cy - radius * s, y1)
            rx2, ry2 = min(cx + radius * s, x2), min(cy + radius * s, y2)
            inside = min(x - rx1, y - ry1, rx2 - x, ry2 - y) > 0
            reach = max(x - x1, y - y1, x2 - x, y2 - y)
            area = (x2 - x1) * (y2 - y1)
            if inside and low <= reach <= high and area < best_area:
                best, best_area = k, area
        indices.append(best)
        labels.append(int(gt_labels[best]) if best >= 0 else num_classes)
    return torch.tensor(labels), torch.tensor(indices)


def test_multilevel_targets_match_brute_force():
    generator = torch.Generator().manual_seed(0)
    points, strides, ranges = [], [], []
    for stride, (low, high) in zip(STRIDES, RANGES):
        p, s, r = one_level(256 // stride, stride, low, high)
        points.append(p), strides.append(s), ranges.append(r)
    points, strides, ranges = torch.cat(points), torch.cat(strides), torch.cat(ranges)
    xy = torch.rand(12, 2, generator=generator) * 200
    wh = torch.rand(12, 2, generator=generator) * 180 + 4
    gt_boxes = torch.cat((xy, xy + wh), -1).round()
    gt_labels = torch.randint(0, 5, (12,), generator=generator)
    targets = fcos_targets(points, strides, ranges, gt_boxes, gt_labels, 5)
    labels, indices = brute_force_targets(points, strides, ranges, gt_boxes, gt_labels, 5, 1.5)
    assert int((labels < 5).sum()) > 20  # the example does exercise several levels and boxes
    assert torch.equal(targets.labels, labels)
    assert torch.equal(targets.gt_index, indices)


def test_candidates_and_losses_against_torchvision():
    torch.manual_seed(0)
    head = FCOSHead(num_classes=4, in_channels=32, num_convs=1)
    # second image: valid region 100 (h) x 60 (w), the rest is padding
    inputs = make_inputs(image_sizes=torch.tensor([[128, 128], [100, 60]]),
                         boxes=[torch.tensor([[10.0, 12.0, 60.0, 50.0], [40.0, 30.0, 120.0, 126.0]]),
                                torch.tensor([[5.0, 5.0, 50.0, 90.0]])],
                         labels=[torch.tensor([1, 3]), torch.tensor([2])])
    out = head(inputs)
    assert set(out.losses) == set(head.loss_weights) == {"loss_cls", "loss_bbox", "loss_centerness"}

    cls_logits, distances, ctr_logits = head.predict(inputs.maps)
    points, strides, ranges = head.priors(inputs.maps)
    features = torch.cat([m.flatten(2).transpose(1, 2) for m in inputs.maps], 1)
    cls_sum, num_pos, giou_terms, ctr_terms, weights = 0.0, 0, [], [], []
    for image, cand in enumerate(out.candidates):
        h, w = inputs.image_sizes[image].tolist()
        valid = (points[:, 0] < w) & (points[:, 1] < h)
        assert len(cand.labels) == int(valid.sum())
        torch.testing.assert_close(cand.boxes, point_boxes(points[valid], strides[valid]))  # 8 * stride squares
        torch.testing.assert_close(cand.features, features[image][valid])
        targets = fcos_targets(points[valid], strides[valid], ranges[valid], inputs.gt_boxes[image],
                               inputs.gt_labels[image], 4)
        assert torch.equal(cand.labels, targets.labels)
        pos = cand.positive
        assert torch.equal(cand.target_boxes[pos], inputs.gt_boxes[image][targets.gt_index[pos]])
        assert torch.equal(cand.target_boxes[~pos], torch.zeros(int((~pos).sum()), 4))
        onehot = torch.nn.functional.one_hot(targets.labels, 5)[:, :4].float()
        cls_sum = cls_sum + sigmoid_focal_loss(cls_logits[image][valid], onehot, alpha=0.25, gamma=2.0,
                                               reduction="sum")
        num_pos += int(pos.sum())
        p, d = points[valid][pos], distances[image][valid][pos] * strides[valid][pos, None]
        pred = torch.cat((p - d[:, :2], p + d[:, 2:]), -1)
        giou_terms.append(1 - torch.diag(generalized_box_iou(pred, cand.target_boxes[pos])))
        weight = centerness_targets(targets.distances[pos])
        weights.append(weight)
        ctr_terms.append(torch.nn.functional.binary_cross_entropy_with_logits(
            ctr_logits[image][valid][pos], weight, reduction="none"))
    assert num_pos > 0
    weights = torch.cat(weights)
    # tolerance: float32 sums over ~400 points
    torch.testing.assert_close(out.losses["loss_cls"], cls_sum / num_pos, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_bbox"], (torch.cat(giou_terms) * weights).sum() / weights.sum(),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_centerness"], torch.cat(ctr_terms).sum() / num_pos,
                               rtol=1e-5, atol=1e-6)


def test_image_without_boxes_and_no_tower():
    head = FCOSHead(num_classes=3, in_channels=32, num_convs=0)
    inputs = make_inputs(boxes=[torch.zeros(0, 4), torch.zeros(0, 4)],
                         labels=[torch.zeros(0, dtype=torch.int64)] * 2)
    for m in inputs.maps:
        m.requires_grad_(True)
    out = head(inputs)
    assert all(c.num_positives == 0 and c.num_gt == 0 for c in out.candidates)
    assert out.losses["loss_bbox"].item() == 0.0 and out.losses["loss_centerness"].item() == 0.0
    assert torch.isfinite(out.losses["loss_cls"]) and out.losses["loss_cls"].item() > 0
    sum(out.losses.values()).backward()
    assert inputs.maps[0].grad is not None
