"""Faster-RCNN auxiliary head: RPN targets and losses, proposals, RoI level mapping / pooling / sampling,
RoI losses, and a smoke training run. References: hand-worked examples, torchvision.ops, brute force."""
import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou, nms, roi_align

from codetr.models.co_detr.anchors import base_anchors, grid_anchors
from codetr.models.co_detr.assigners import MaxIoUAssigner, RandomSampler
from codetr.models.co_detr.box_coder import DeltaXYWHCoder
from codetr.models.co_detr.heads.faster_rcnn import FasterRCNNHead
from codetr.models.co_detr.heads.roi_head import RoIHead, map_roi_levels, multilevel_roi_align
from codetr.models.co_detr.heads.rpn import RPNHead, proposals_single, rpn_losses, rpn_targets_single
from codetr.models.co_detr.types import AuxInputs
from tests.head_training import train_head

STRIDES = [8, 16, 32, 64, 128]


# --- RPN targets on a hand-worked example ----------------------------------------------------------
# One level, stride 16, one 32 x 32 anchor per location, a 4 x 4 grid: anchor (x, y) is centred on
# (16x, 16y) and has index 4y + x. Released RPN rules: MaxIoU 0.7 / 0.3, low-quality matches >= 0.3.


def square_anchors() -> torch.Tensor:
    return grid_anchors(base_anchors(16, [2.0], [1.0]), (4, 4), 16)  # [16, 4]


def rpn_rules(match_low_quality: bool = True):
    assigner = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=match_low_quality)
    sampler = RandomSampler(256, 0.5, add_gt_as_proposals=False)  # 256 > 16: every candidate is drawn
    return assigner, sampler, DeltaXYWHCoder()


def test_rpn_targets_hand_worked():
    anchors = square_anchors()
    # image 64 high, 48 wide: column x = 3 (centre 48) lies in the padding -> never sampled
    valid = (0.5 * (anchors[:, 0] + anchors[:, 2])) < 48
    gt = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    targets = rpn_targets_single(anchors, valid, gt, *rpn_rules())
    # IoU with the GT: anchor (1,1) = 1 -> positive; its 4-neighbours 512 / 1536 = 1/3 -> ignored;
    # diagonal neighbours 256 / 1792 = 0.14 and all others 0 -> negative.
    assert targets.positive.nonzero().flatten().tolist() == [5]
    assert targets.sampled.nonzero().flatten().tolist() == [0, 2, 5, 8, 10, 12, 13, 14]
    assert (targets.num_pos, targets.num_neg) == (1, 7)
    assert targets.objectness.nonzero().flatten().tolist() == [5]
    assert torch.equal(targets.deltas, torch.zeros(16, 4))  # the positive anchor is the GT box


def test_rpn_low_quality_match_hand_worked():
    anchors = square_anchors()
    valid = torch.ones(16, dtype=torch.bool)
    gt = torch.tensor([[36.0, 36.0, 60.0, 60.0]])  # best anchor (3,3) = [32,32,64,64]: IoU 576/1024 = 0.5625
    targets = rpn_targets_single(anchors, valid, gt, *rpn_rules(match_low_quality=True))
    assert targets.positive.nonzero().flatten().tolist() == [15]
    # same centre (48, 48); w = h = 24 vs 32 -> (0, 0, log 0.75, log 0.75); tolerance 1e-6
    expected = torch.tensor([0.0, 0.0, math.log(0.75), math.log(0.75)])
    torch.testing.assert_close(targets.deltas[15], expected, atol=1e-6, rtol=0)
    strict = rpn_targets_single(anchors, valid, gt, *rpn_rules(match_low_quality=False))
    assert strict.num_pos == 0  # 0.5625 < 0.7: only the low-quality rule makes it positive


def test_rpn_loss_normaliser_is_mmdet_sample_count():
    anchors = square_anchors()
    valid_48 = (0.5 * (anchors[:, 0] + anchors[:, 2])) < 48
    with_gt = rpn_targets_single(anchors, valid_48, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), *rpn_rules())
    empty = rpn_targets_single(anchors, torch.ones(16, dtype=torch.bool), torch.zeros(0, 4), *rpn_rules())
    assert (empty.num_pos, empty.num_neg) == (0, 16)
    logits = torch.zeros(2, 16)  # BCE = log 2 per sampled anchor
    deltas = torch.ones(2, 16, 4)  # L1 = 4 on the one positive (target 0)
    losses = rpn_losses(logits, deltas, [with_gt, empty])
    # avg factor = sum over images of max(pos, 1) + max(neg, 1) = (1 + 7) + (1 + 16) = 25; tolerance 1e-6
    torch.testing.assert_close(losses["loss_rpn_cls"], torch.tensor((8 + 16) * math.log(2) / 25), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses["loss_rpn_bbox"], torch.tensor(4 / 25), atol=1e-6, rtol=0)


# --- proposals: per-level NMS ------------------------------------------------------------------------


def brute_force_proposals(logits, deltas, anchors, size_hw, coder, nms_pre, iou, max_num):
    """Per level: top-k, decode + clip, drop empty boxes, torchvision nms; then merge by score."""
    boxes, scores = [], []
    for level_logits, level_deltas, level_anchors in zip(logits, deltas, anchors):
        top = level_logits.sigmoid().topk(min(nms_pre, len(level_logits)))
        decoded = coder.decode(level_anchors[top.indices], level_deltas[top.indices], size_hw)
        wide = ((decoded[:, 2] - decoded[:, 0]) > 0) & ((decoded[:, 3] - decoded[:, 1]) > 0)
        decoded, level_scores = decoded[wide], top.values[wide]
        keep = nms(decoded, level_scores, iou)
        boxes.append(decoded[keep])
        scores.append(level_scores[keep])
    boxes, scores = torch.cat(boxes), torch.cat(scores)
    order = scores.argsort(descending=True)[:max_num]
    return boxes[order], scores[order]


def test_proposals_match_per_level_nms_brute_force():
    generator = torch.Generator().manual_seed(0)
    rpn = RPNHead(in_channels=8, feat_channels=8, strides=(8, 16, 32))
    maps = [torch.zeros(1, 8, 96 // s, 128 // s) for s in (8, 16, 32)]
    anchors = rpn.anchors(maps)
    logits = [torch.randn(len(a), generator=generator) for a in anchors]
    deltas = [0.5 * torch.randn(len(a), 4, generator=generator) for a in anchors]
    size_hw = (90, 120)  # some anchors lie in the padding and decode partly outside: clipped
    args = (rpn.coder, 150, 0.7, 200)
    boxes, scores = proposals_single(logits, deltas, anchors, size_hw, *args)
    ref_boxes, ref_scores = brute_force_proposals(logits, deltas, anchors, size_hw, *args)
    torch.testing.assert_close(boxes, ref_boxes, atol=0, rtol=0)  # the same ops: exact
    torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)
    assert len(boxes) == 200 and (boxes[:, 0::2] <= 120).all() and (boxes[:, 1::2] <= 90).all()
    # the example tells per-level from global NMS: some kept boxes (of different levels) overlap > 0.7
    assert (box_iou(boxes, boxes).fill_diagonal_(0) > 0.7).any()


# --- RoI level mapping and pooling --------------------------------------------------------------------


@pytest.mark.parametrize(
    "finest_scale, expected",
    [(56.0, [0, 0, 0, 1, 1, 2, 3, 3]), (112.0, [0, 0, 0, 0, 0, 1, 2, 3])],
)
def test_roi_level_mapping_hand_values(finest_scale, expected):
    # square RoIs: sqrt(w * h) = side; level = floor(log2(side / finest + 1e-6)) clamped to 0..3
    sides = torch.tensor([10.0, 56.0, 111.9, 112.0, 223.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack((torch.zeros(8), torch.zeros(8), sides, sides), dim=1) + 5.0
    assert map_roi_levels(boxes, 4, finest_scale).tolist() == expected


def test_multilevel_roi_align_matches_torchvision_per_roi():
    generator = torch.Generator().manual_seed(1)
    strides = [8, 16, 32, 64]
    maps = [torch.randn(2, 4, 512 // s, 512 // s, generator=generator) for s in strides]
    xy = torch.rand(40, 2, generator=generator) * 300
    wh = torch.empty(40, 1).uniform_(math.log(8), math.log(700), generator=generator).exp().expand(40, 2)
    rois = torch.cat((torch.randint(0, 2, (40, 1), generator=generator).float(), xy, xy + wh), 1)
    pooled = multilevel_roi_align(maps, rois, strides, 7, finest_scale=56.0)
    levels = map_roi_levels(rois[:, 1:], 4, 56.0)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level is exercised
    for k in range(len(rois)):
        level = int(levels[k])
        ref = roi_align(maps[level], rois[k:k + 1], 7, 1.0 / strides[level], sampling_ratio=0, aligned=True)
        torch.testing.assert_close(pooled[k:k + 1], ref, atol=1e-6, rtol=0)


def test_roi_align_is_half_pixel_aligned():
    # map value = column index; RoI [8, 40] at stride 8 covers feature columns [1, 5] - 0.5 (aligned=True,
    # as mmcv's RoIAlign), so its mean is 2.5 (it would be 3.0 without the half-pixel shift); tol 1e-5
    columns = torch.arange(16.0).expand(1, 1, 16, 16)
    maps = [columns] + [torch.zeros(1, 1, 16 // 2 ** i, 16 // 2 ** i) for i in range(1, 4)]
    pooled = multilevel_roi_align(maps, torch.tensor([[0.0, 8.0, 8.0, 40.0, 40.0]]), [8, 16, 32, 64])
    assert abs(float(pooled.mean()) - 2.5) < 1e-5


# --- RoI sampling and losses ---------------------------------------------------------------------------


def roi_maps(channels: int = 8, size: int = 256, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, channels, size // s, size // s, generator=generator) for s in (8, 16, 32, 64)]


def test_roi_sampling_counts_and_gt_as_proposals():
    torch.manual_seed(0)
    head = RoIHead(num_classes=3, in_channels=8, fc_channels=32)
    gt = torch.tensor([[20.0, 30.0, 120.0, 110.0], [140.0, 100.0, 230.0, 240.0]])
    labels = torch.tensor([2, 0])
    maps = roi_maps()
    # many jittered copies of the GT (IoU mostly >= 0.5) and far background boxes
    jitter = gt.repeat(200, 1) + 4 * torch.randn(400, 4)
    background = torch.tensor([[0.0, 200.0, 40.0, 250.0]]).repeat(800, 1) + torch.rand(800, 4)
    out = head(maps, [torch.cat((jitter, background))], [gt], [labels])
    cand = out.candidates[0]
    assert len(cand.labels) == 512 and cand.num_positives == 128  # 25 % of 512, plenty of each kind
    assert cand.positive[:128].all() and not cand.positive[128:].any()  # positives first

    # few positive proposals: only the GT boxes (added as proposals) are positive
    out = head(maps, [background], [gt], [labels])
    cand = out.candidates[0]
    assert len(cand.labels) == 512 and cand.num_positives == 2 and cand.num_gt == 2
    pos = cand.positive
    assert torch.equal(cand.boxes[pos], cand.target_boxes[pos])  # each GT is its own target
    assert sorted(cand.labels[pos].tolist()) == [0, 2]
    assert torch.equal(cand.target_boxes[~pos], torch.zeros(510, 4))  # negatives: zero targets
    assert (cand.labels[~pos] == 3).all()
    # content feature = RoI-aligned 7x7 feature averaged over the grid; tolerance 1e-6
    rois = torch.cat((torch.zeros(512, 1), cand.boxes), 1)
    expected = multilevel_roi_align(maps, rois, [8, 16, 32, 64], 7, 112.0).mean(dim=(2, 3))
    torch.testing.assert_close(cand.features, expected, atol=1e-6, rtol=0)


def test_roi_losses_normalised_like_mmdet():
    torch.manual_seed(0)
    head = RoIHead(num_classes=3, in_channels=8, fc_channels=32)
    for fc in (head.bbox_head.cls, head.bbox_head.reg):  # constant outputs: logits 0, deltas = reg bias
        torch.nn.init.zeros_(fc.weight)
    with torch.no_grad():  # class k predicts dx = 0.5 k (x std 0.1): the box moves right by 0.05 k widths
        head.bbox_head.reg.bias.view(3, 4)[:, 0] = 0.5 * torch.arange(3.0)
    gt = [torch.tensor([[20.0, 30.0, 120.0, 110.0]]), torch.tensor([[50.0, 50.0, 200.0, 150.0]])]
    labels = [torch.tensor([1]), torch.tensor([2])]
    far = torch.tensor([[200.0, 200.0, 250.0, 250.0]]) + torch.rand(20, 4)  # negatives
    proposals = [torch.cat((g.repeat(30, 1) + 8 * torch.randn(30, 4), far)) for g in gt]
    maps = [torch.cat((m, m)) for m in roi_maps()]
    out = head(maps, proposals, gt, labels)
    num_rois = sum(len(c.labels) for c in out.candidates)
    assert sum(c.num_positives for c in out.candidates) < num_rois  # both kinds present
    # CE of uniform logits = log(C + 1), averaged over the sampled RoIs; tolerance 1e-6
    torch.testing.assert_close(out.losses["loss_cls"], torch.tensor(math.log(4)), atol=1e-6, rtol=0)
    # GIoU term: sum over positives of 1 - GIoU(box of the GT class's deltas, GT), divided by ALL
    # sampled RoIs (mmdet's avg_factor = bbox_targets.size(0)); tolerance 1e-5
    total = 0.0
    for cand in out.candidates:
        pos = cand.positive
        rois = cand.boxes[pos]
        shift = 0.05 * cand.labels[pos] * (rois[:, 2] - rois[:, 0])
        predicted = rois + torch.stack((shift, torch.zeros_like(shift)), 1).repeat(1, 2)
        total += (1 - generalized_box_iou(predicted, cand.target_boxes[pos]).diagonal()).sum()
    torch.testing.assert_close(out.losses["loss_bbox"], total / num_rois, atol=1e-5, rtol=0)


@pytest.fixture
def one_thread():
    """Tiny convs run faster on one thread, and far faster than two threads on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_roi_box_regression_learns(one_thread):
    # fixed proposals near two GT boxes (all of them sampled): the GIoU term alone must go down,
    # which fails if the class-specific deltas were picked or decoded wrongly
    torch.manual_seed(0)
    head = RoIHead(num_classes=3, in_channels=8, fc_channels=64)
    generator = torch.Generator().manual_seed(0)
    gt = torch.tensor([[20.0, 30.0, 120.0, 110.0], [140.0, 100.0, 230.0, 240.0]])
    proposals = gt.repeat(50, 1) + 10 * torch.randn(100, 4, generator=generator)
    maps = roi_maps()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.2, momentum=0.9)
    history = []
    for _ in range(40):
        loss = head(maps, [proposals], [gt], [torch.tensor([2, 0])]).losses["loss_bbox"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    assert sum(history[-5:]) / 5 < 0.5 * history[0], history


# --- the whole head --------------------------------------------------------------------------------------


def aux_inputs(seed: int = 0, channels: int = 32, empty_second: bool = False) -> AuxInputs:
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(2, channels, 128 // s, 128 // s, generator=generator).requires_grad_() for s in STRIDES]
    masks = [torch.zeros(2, 128 // s, 128 // s, dtype=torch.bool) for s in STRIDES]
    gt_boxes = [
        torch.tensor([[10.0, 12.0, 60.0, 70.0], [64.0, 40.0, 120.0, 100.0]]),
        torch.tensor([[20.0, 20.0, 90.0, 80.0]]),
    ]
    gt_labels = [torch.tensor([0, 2]), torch.tensor([1])]
    if empty_second:
        gt_boxes[1], gt_labels[1] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    image_sizes = torch.tensor([[128, 128], [100, 112]])  # the second image is padded
    return AuxInputs(maps, masks, STRIDES, image_sizes, gt_boxes, gt_labels)


def test_head_interface_and_empty_gt_image():
    torch.manual_seed(0)
    head = FasterRCNNHead(num_classes=3, in_channels=32)
    assert head.kind == "faster_rcnn"
    out = head(aux_inputs(empty_second=True))
    assert set(out.losses) == set(head.loss_weights)
    assert all(torch.isfinite(v) for v in out.losses.values())
    first, second = out.candidates
    assert second.num_gt == 0 and second.num_positives == 0 and len(second.labels) > 0
    assert 0 < first.num_positives <= 128 and len(first.labels) <= 512
    assert first.features.shape == (len(first.labels), 32) and first.features.requires_grad
    # proposals are clipped to each image's valid size, so the padded image's RoIs stay inside it
    assert (second.boxes[:, 0::2] <= 112).all() and (second.boxes[:, 1::2] <= 100).all()


def test_head_runs_under_autocast():
    torch.manual_seed(0)
    head = FasterRCNNHead(num_classes=3, in_channels=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(aux_inputs())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


def test_smoke_training_loss_decreases_and_gradients_reach_maps(one_thread):
    torch.manual_seed(0)
    inputs = aux_inputs(seed=1)
    totals, _ = train_head(FasterRCNNHead(num_classes=3, in_channels=32, fc_channels=256), inputs, lr=0.02)
    assert sum(totals[-5:]) / 5 < 0.7 * sum(totals[:5]) / 5, totals
    # every level feeds the RPN (and the first four the RoI head): gradients reach all five maps
    for level, x in enumerate(inputs.maps):
        assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient at level {level}"
