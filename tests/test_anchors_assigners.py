"""Anchors, delta box coding, max-IoU / ATSS assignment and random sampling of the auxiliary heads.

References: torchvision's AnchorGenerator, BoxCoder and Matcher, hand-worked examples, brute force.
"""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from codetr.models.co_detr.anchors import (
    anchor_centre_valid,
    base_anchors,
    grid_anchors,
    multilevel_anchors,
    octave_scales,
)
from codetr.models.co_detr.assigners import ATSSAssigner, AssignResult, MaxIoUAssigner, RandomSampler
from codetr.models.co_detr.box_coder import DeltaXYWHCoder


def random_boxes(n: int, size: float = 100.0, min_wh: float = 4.0, max_wh: float = 40.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = min_wh + torch.rand(n, 2, generator=g) * (max_wh - min_wh)
    return torch.cat((xy, xy + wh), dim=1)


# ---------------------------------------------------------------- anchors


def test_base_anchors_order_and_shape():
    # ratio = h / w; ratios outer, scales inner; centred on 0 (exact up to float32 rounding, 1e-5)
    anchors = base_anchors(8.0, [1.0, 2.0], [0.5, 2.0])
    expected = []
    for ratio in (0.5, 2.0):
        for scale in (1.0, 2.0):
            w, h = 8.0 * scale / math.sqrt(ratio), 8.0 * scale * math.sqrt(ratio)
            expected.append([-w / 2, -h / 2, w / 2, h / 2])
    torch.testing.assert_close(anchors, torch.tensor(expected), rtol=0, atol=1e-5)


def test_octave_scales():
    assert octave_scales(4.0, 3) == pytest.approx([4.0, 4.0 * 2 ** (1 / 3), 4.0 * 2 ** (2 / 3)], abs=1e-12)
    assert octave_scales(8.0, 1) == [8.0]


def test_grid_anchors_match_torchvision():
    # torchvision also centres anchor (x, y) on (x * stride, y * stride) and uses the same order; its base
    # anchors are rounded to integers, ours are not. With sizes whose half-sides are integers the two
    # agree exactly; otherwise they differ by at most 0.5 px per coordinate (the rounding).
    sizes, image_hw = (32.0, 64.0), (64, 96)
    feature_sizes, strides = [(8, 12), (4, 6)], [8, 16]
    images = ImageList(torch.zeros(1, 3, *image_hw), [image_hw])
    feats = [torch.zeros(1, 4, h, w) for h, w in feature_sizes]

    exact_ratios = (0.25, 1.0, 4.0)
    reference = AnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=(exact_ratios,) * 2)(images, feats)[0]
    ours = torch.cat(multilevel_anchors(feature_sizes, strides, list(sizes), [1.0], exact_ratios))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)

    odd_ratios = (0.5, 1.0, 2.0)
    reference = AnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=(odd_ratios,) * 2)(images, feats)[0]
    ours = torch.cat(multilevel_anchors(feature_sizes, strides, list(sizes), [1.0], odd_ratios))
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 0.5 + 1e-5
    assert not torch.equal(ours, reference)  # the rounding difference is real


def test_grid_anchors_location_major():
    base = base_anchors(16.0, [1.0, 2.0], [1.0])
    anchors = grid_anchors(base, (2, 3), stride=8)
    assert anchors.shape == (2 * 3 * 2, 4)
    # row (y * W + x) * A + a == base[a] + (8x, 8y, 8x, 8y), exact
    for y in range(2):
        for x in range(3):
            for a in range(2):
                shift = torch.tensor([8.0 * x, 8.0 * y, 8.0 * x, 8.0 * y])
                assert torch.equal(anchors[(y * 3 + x) * 2 + a], base[a] + shift)


def test_anchor_centre_valid_equals_mmdet_valid_flags():
    # mmdet: location (x, y) at stride s is valid iff x < ceil(w / s) and y < ceil(h / s)
    stride, feat_hw = 16, (6, 7)
    anchors = grid_anchors(base_anchors(16.0, [4.0], [0.5, 1.0]), feat_hw, stride)
    for h, w in [(96, 112), (80, 100), (17, 33), (16, 32), (1, 1)]:
        valid = anchor_centre_valid(anchors, (h, w)).reshape(*feat_hw, 2)
        for y in range(feat_hw[0]):
            for x in range(feat_hw[1]):
                expected = x < math.ceil(w / stride) and y < math.ceil(h / stride)
                assert bool(valid[y, x, 0]) == expected and bool(valid[y, x, 1]) == expected
    # also takes a tensor size
    assert torch.equal(anchor_centre_valid(anchors, torch.tensor([80, 100])), anchor_centre_valid(anchors, (80, 100)))


# ---------------------------------------------------------------- box coder


def test_delta_coder_matches_torchvision_and_round_trips():
    stds = (0.1, 0.1, 0.2, 0.2)
    boxes, gt = random_boxes(50, seed=1), random_boxes(50, seed=2)
    coder = DeltaXYWHCoder(stds=stds)
    reference = BoxCoder(weights=tuple(1.0 / s for s in stds))
    deltas = coder.encode(boxes, gt)
    torch.testing.assert_close(deltas, reference.encode_single(gt, boxes), rtol=1e-5, atol=1e-5)
    # decode: identical to torchvision while dw, dh stay below the clip
    torch.testing.assert_close(coder.decode(boxes, deltas), reference.decode_single(deltas, boxes), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(coder.decode(boxes, deltas), gt, rtol=1e-5, atol=1e-4)


def test_delta_coder_means_clip_and_max_shape():
    coder = DeltaXYWHCoder(means=(0.5, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[10.0, 10.0, 30.0, 50.0]])  # centre (20, 30), w 20, h 40
    # stored dx = 0 -> real dx = mean 0.5 -> centre moves by 0.5 * w = 10 px (exact)
    torch.testing.assert_close(coder.decode(box, torch.zeros(1, 4)), torch.tensor([[20.0, 10.0, 40.0, 50.0]]))
    # dw, dh are clamped to +-log(1000 / 16) on both sides (torchvision clamps only above)
    clip = math.log(1000.0 / 16.0)
    out = DeltaXYWHCoder().decode(box, torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    w, h = out[0, 2] - out[0, 0], out[0, 3] - out[0, 1]
    assert float(w) == pytest.approx(20.0 * math.exp(clip), rel=1e-5)
    assert float(h) == pytest.approx(40.0 * math.exp(-clip), rel=1e-5)
    # max_shape (h, w) clips x to [0, w] and y to [0, h]
    out = DeltaXYWHCoder().decode(box, torch.tensor([[0.0, 0.0, 2.0, 2.0]]), max_shape_hw=(45, 60))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 60.0, 45.0]]))


# ---------------------------------------------------------------- max-IoU assigner


def mmdet_max_iou_reference(iou: torch.Tensor, pos: float, neg: float, min_pos: float, assign_all: bool) -> list[int]:
    """Brute force of mmdet's rules, box by box and GT by GT (iou [M, N])."""
    num_boxes, num_gts = iou.shape
    result = []
    for j in range(num_boxes):
        best = max(range(num_gts), key=lambda i: (float(iou[j, i]), -i))  # first max, as argmax
        value = float(iou[j, best])
        result.append(best + 1 if value >= pos else (0 if value < neg else -1))
    for i in range(num_gts):  # sequential low-quality override
        gt_best = float(iou[:, i].max())
        if gt_best < min_pos:
            continue
        claims = [j for j in range(num_boxes) if float(iou[j, i]) == gt_best]
        for j in claims if assign_all else claims[:1]:
            result[j] = i + 1
    return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_max_iou_assigner_brute_force_and_torchvision(seed):
    boxes = random_boxes(300, seed=seed)
    gts = random_boxes(8, min_wh=6.0, max_wh=30.0, seed=100 + seed)
    labels = torch.arange(8) * 3
    result = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0).assign(boxes, gts, labels)
    iou = box_iou(boxes, gts)
    assert result.gt_inds.tolist() == mmdet_max_iou_reference(iou, 0.5, 0.4, 0.0, True)
    torch.testing.assert_close(result.max_overlaps, iou.max(dim=1).values, rtol=0, atol=1e-6)
    pos = result.gt_inds > 0
    assert torch.equal(result.labels[pos], labels[result.gt_inds[pos] - 1])
    assert (result.labels[~pos] == -1).all()

    # torchvision's Matcher (gt x boxes orientation): -1 below low, -2 between, k = gt k. It differs on
    # exactly one point: a low-quality box keeps ITS OWN best GT there, while mmdet gives it to the
    # (last) GT that claims it. Everywhere else the two must agree.
    matches = Matcher(0.5, 0.4, allow_low_quality_matches=True)(iou.t())
    ours = result.gt_inds - 1  # -1 negative, -2 ignored, k = gt k
    differ = (ours != matches).nonzero().flatten()
    gt_best = iou.max(dim=0).values
    for j in differ.tolist():
        claimers = (iou[j] == gt_best).nonzero().flatten()
        assert len(claimers) > 0 and int(ours[j]) == int(claimers.max()) and int(matches[j]) == int(iou[j].argmax())
    assert len(differ) < len(boxes) // 10


def test_max_iou_assigner_hand_worked_thresholds_and_ties():
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],    # IoU 1 with gt 0 -> positive
        [0.0, 0.0, 10.0, 18.0],    # IoU 100/180 = 0.556 -> positive
        [0.0, 0.0, 10.0, 22.0],    # IoU 100/220 = 0.455 -> ignored (between 0.4 and 0.5)
        [0.0, 0.0, 10.0, 30.0],    # IoU 100/300 = 0.333 -> negative
        [100.0, 100.0, 110.0, 130.0],  # IoU 1/3 with gt 1, its best -> low-quality positive
        [100.0, 100.0, 110.0, 130.0],  # exact tie: also assigned when gt_max_assign_all
    ])
    labels = torch.tensor([4, 7])
    result = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.0).assign(boxes, gts, labels)
    assert result.gt_inds.tolist() == [1, 1, -1, 0, 2, 2]
    assert result.labels.tolist() == [4, 4, -1, -1, 7, 7]
    # only one of the tied boxes without gt_max_assign_all
    single = MaxIoUAssigner(0.5, 0.4, gt_max_assign_all=False).assign(boxes, gts, labels)
    assert single.gt_inds[:4].tolist() == [1, 1, -1, 0] and sorted(single.gt_inds[4:].tolist()) == [0, 2]
    # min_pos_iou above the best IoU (1/3) of gt 1: no low-quality match
    strict = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.4).assign(boxes, gts, labels)
    assert strict.gt_inds.tolist() == [1, 1, -1, 0, 0, 0]
    # match_low_quality off
    assert MaxIoUAssigner(0.5, 0.4, match_low_quality=False).assign(boxes, gts, labels).gt_inds.tolist() == [1, 1, -1, 0, 0, 0]


def test_max_iou_assigner_later_gt_wins_a_shared_low_quality_box():
    # box 0 is the best box of both GTs (IoU 0.25 and 0.30): mmdet's sequential loop leaves it to gt 1.
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [50.0, 50.0, 60.0, 60.0]])
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 6.0]])  # IoU 100/400, 120/400
    result = MaxIoUAssigner(0.5, 0.4).assign(boxes, gts, torch.tensor([1, 2]))
    assert result.gt_inds.tolist() == [2, 0]
    boxes_swapped_gts = MaxIoUAssigner(0.5, 0.4).assign(boxes, gts.flip(0), torch.tensor([2, 1]))
    assert boxes_swapped_gts.gt_inds.tolist() == [2, 0]  # now gt 1 is the former gt 0: the later one wins


def test_max_iou_assigner_low_quality_differs_from_torchvision_as_documented():
    # box 0 is gt 1's best box (IoU 100/400 = 0.25) but its own best GT is gt 0 (IoU 120/400 = 0.3);
    # gt 0's best box is box 1 (IoU 100/120). mmdet gives box 0 to the claiming gt 1; torchvision's
    # Matcher restores box 0's own best match (gt 0).
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 15.0, 20.0, 20.0]])
    gts = torch.tensor([[0.0, 14.0, 20.0, 20.0], [0.0, 0.0, 10.0, 10.0]])
    ours = MaxIoUAssigner(0.5, 0.4).assign(boxes, gts, torch.tensor([0, 1])).gt_inds
    assert ours.tolist() == [2, 1]
    assert Matcher(0.5, 0.4, allow_low_quality_matches=True)(box_iou(gts, boxes)).tolist() == [0, 0]


def test_assigners_without_gt_or_boxes():
    boxes = random_boxes(5)
    no_gt = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    for result in (MaxIoUAssigner(0.5, 0.4).assign(boxes, *no_gt), ATSSAssigner().assign(boxes, [5], *no_gt)):
        assert result.gt_inds.tolist() == [0] * 5 and result.labels.tolist() == [-1] * 5 and result.num_gts == 0
    empty = MaxIoUAssigner(0.5, 0.4).assign(torch.zeros(0, 4), random_boxes(2), torch.tensor([0, 1]))
    assert empty.gt_inds.shape == (0,)


# ---------------------------------------------------------------- ATSS assigner


def strip(x1: float, x2: float) -> list[float]:
    """A box spanning y in [0, 20]: with all boxes on the same rows, IoU = 1-D overlap / 1-D union in x."""
    return [x1, 0.0, x2, 20.0]


def test_atss_assigner_hand_worked():
    # Three levels of anchors, all with y in [0, 20] (so IoU reduces to x intervals):
    #   level 0: width 10, centres 5, 15, ..., 75  (indices 0..7)
    #   level 1: width 20, centres 10, 30, 50, 70  (indices 8..11)
    #   level 2: width 40, centres 20, 60          (indices 12, 13)
    anchors = torch.tensor(
        [strip(c - 5, c + 5) for c in range(5, 80, 10)]
        + [strip(c - 10, c + 10) for c in range(10, 80, 20)]
        + [strip(c - 20, c + 20) for c in (20, 60)]
    )
    gts = torch.tensor([strip(6, 26), strip(8, 14)])
    # GT 0, x in [6, 26], centre 16. Nearest 3 per level: #1 (15), #2 (25), #0 (5) | #8 (10), #9 (30),
    # #10 (50) | #12, #13. IoUs: #1 10/20, #2 6/24, #0 4/26, #8 14/26, #9 6/34, #10 0, #12 20/40, #13 0.
    # mean 0.264847, unbiased std 0.222357 -> threshold 0.487204: #1 (0.5), #8 (0.538), #12 (0.5),
    # all with centres inside [6, 26].
    # GT 1, x in [8, 14], centre 11. Candidates #1, #0, #2 | #8, #9, #10 | #12, #13 with IoUs 4/12,
    # 2/14, 0 | 6/20, 0, 0 | 6/40, 0: mean 0.115774, std 0.139791 -> threshold 0.255565: #1 (1/3, but
    # its centre 15 is outside [8, 14] -> rejected) and #8 (0.3, centre 10 inside).
    # #8 is positive for both GTs: it goes to GT 0 (IoU 0.538 > 0.3). GT 1 ends with no positive.
    result = ATSSAssigner(topk=3).assign(anchors, [8, 4, 2], gts, torch.tensor([5, 9]))
    expected = [0] * 14
    expected[1] = expected[8] = expected[12] = 1
    assert result.gt_inds.tolist() == expected
    assert result.labels.tolist() == [5 if v else -1 for v in expected]


def test_atss_assigner_uses_unbiased_std():
    # One level, topk 2: two candidates with IoUs a > b. Threshold with the unbiased std is
    # (a + b) / 2 + (a - b) / sqrt(2) > a, so no anchor is positive (with the biased std it would be a).
    anchors = torch.tensor([strip(0, 10), strip(10, 20), strip(40, 50)])
    gts = torch.tensor([strip(2, 14)])  # IoUs 8/12 and 4/18
    result = ATSSAssigner(topk=2).assign(anchors, [3], gts, torch.tensor([0]))
    assert result.gt_inds.tolist() == [0, 0, 0]


def test_atss_assigner_brute_force_random():
    torch.manual_seed(0)
    levels = [grid_anchors(base_anchors(s, [8.0], [1.0]), (64 // s, 64 // s), s) for s in (8, 16, 32)]
    anchors = torch.cat(levels)
    gts = random_boxes(4, size=48.0, min_wh=8.0, max_wh=40.0, seed=5)
    result = ATSSAssigner(topk=9).assign(anchors, [len(a) for a in levels], gts, torch.arange(4))
    iou = box_iou(anchors, gts)
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = {}
    for i, gt in enumerate(gts):
        gt_centre = (gt[:2] + gt[2:]) / 2
        cand, start = [], 0
        for level in levels:
            dist = ((centres[start:start + len(level)] - gt_centre) ** 2).sum(-1).sqrt()
            cand += (dist.argsort()[:9] + start).tolist()
            start += len(level)
        values = iou[cand, i]
        thr = float(values.mean() + values.std())
        for j in cand:
            cx, cy = centres[j].tolist()
            inside = min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > 0.01
            if float(iou[j, i]) >= thr and inside and float(iou[j, i]) > best.get(j, (-1.0, -1))[0]:
                best[j] = (float(iou[j, i]), i)
    expected = [best[j][1] + 1 if j in best else 0 for j in range(len(anchors))]
    assert result.gt_inds.tolist() == expected
    assert sum(v > 0 for v in expected) >= 4  # the example has positives to compare


# ---------------------------------------------------------------- random sampler


def make_assign(gt_inds: list[int], gt_labels: torch.Tensor) -> AssignResult:
    inds = torch.tensor(gt_inds)
    labels = torch.full_like(inds, -1)
    labels[inds > 0] = gt_labels[inds[inds > 0] - 1]
    return AssignResult(len(gt_labels), inds, torch.rand(len(inds)), labels)


def test_random_sampler_adds_gt_and_respects_counts():
    gts, gt_labels = random_boxes(2, seed=7), torch.tensor([3, 8])
    gt_inds = [1] * 10 + [2] * 5 + [-1] * 5 + [0] * 30
    boxes = random_boxes(len(gt_inds), seed=8)
    sampler = RandomSampler(num=16, pos_fraction=0.25, add_gt_as_proposals=True)
    torch.manual_seed(0)
    res = sampler.sample(make_assign(gt_inds, gt_labels), boxes, gts, gt_labels)
    assert torch.equal(res.boxes[:2], gts) and torch.equal(res.boxes[2:], boxes)
    assert res.assign.gt_inds[:2].tolist() == [1, 2] and res.assign.labels[:2].tolist() == [3, 8]
    assert len(res.pos_inds) == 4 and len(res.neg_inds) == 12  # int(16 * 0.25) positives of 17
    assert (res.assign.gt_inds[res.pos_inds] > 0).all() and (res.assign.gt_inds[res.neg_inds] == 0).all()
    assert torch.equal(res.pos_boxes, res.boxes[res.pos_inds]) and torch.equal(res.neg_boxes, res.boxes[res.neg_inds])
    assert torch.equal(res.pos_gt_boxes, gts[res.pos_assigned_gt_inds])
    assert torch.equal(res.pos_gt_labels, gt_labels[res.pos_assigned_gt_inds])
    assert torch.equal(res.pos_is_gt, res.pos_inds < 2)
    assert res.pos_inds.tolist() == sorted(res.pos_inds.tolist())
    # reproducible from torch's global seed
    torch.manual_seed(0)
    again = sampler.sample(make_assign(gt_inds, gt_labels), boxes, gts, gt_labels)
    assert torch.equal(again.pos_inds, res.pos_inds) and torch.equal(again.neg_inds, res.neg_inds)


def test_random_sampler_few_positives_neg_pos_ub_and_no_gt():
    gt_labels = torch.tensor([1])
    gt_inds = [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, -1]
    boxes, gts = random_boxes(11), random_boxes(1, seed=3)
    res = RandomSampler(8, 0.5, add_gt_as_proposals=False).sample(make_assign(gt_inds, gt_labels), boxes, gts, gt_labels)
    assert res.pos_inds.tolist() == [0, 1] and len(res.neg_inds) == 6 and 10 not in res.neg_inds.tolist()
    capped = RandomSampler(8, 0.5, neg_pos_ub=2, add_gt_as_proposals=False).sample(
        make_assign(gt_inds, gt_labels), boxes, gts, gt_labels)
    assert len(capped.neg_inds) == 4  # 2 * 2 positives
    empty_gt = RandomSampler(8, 0.5).sample(
        make_assign([0] * 11, torch.zeros(0, dtype=torch.long)), boxes, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert len(empty_gt.pos_inds) == 0 and len(empty_gt.neg_inds) == 8 and empty_gt.pos_gt_boxes.shape == (0, 4)


def test_random_sampler_is_uniform():
    # 12 positives, 3 drawn per call: each is drawn with probability 1/4. Over 800 draws the count of
    # every index is Binomial(800, 0.25): mean 200, sd 12.2; allow 5 sd.
    gt_labels = torch.tensor([0])
    assign = make_assign([1] * 12 + [0] * 20, gt_labels)
    boxes, gts = random_boxes(32), random_boxes(1)
    sampler = RandomSampler(12, 0.25, add_gt_as_proposals=False)
    torch.manual_seed(1)
    counts = torch.zeros(12)
    for _ in range(800):
        counts[sampler.sample(assign, boxes, gts, gt_labels).pos_inds] += 1
    assert ((counts - 200).abs() < 5 * 12.25).all()
