"""GFL auxiliary head: QFL / DFL / integral against hand computations and torchvision, the head's losses
against an independent recomputation, and a smoke training run."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from codetr.models.co_detr.assigners import ATSSAssigner
from codetr.models.co_detr.heads.gfl import (
    GFLHead,
    boxes_to_distances,
    distances_to_boxes,
    distribution_focal_loss,
    integral_distances,
    quality_focal_loss,
)
from tests.head_training import make_inputs



def test_qfl_hand_computed():
    # x = 0 (p = 0.5), y = 0.8: BCE = ln 2, factor |0.8 - 0.5|^2 = 0.09
    # x = 1 (p = sigmoid(1)), y = 0: BCE = ln(1 + e), factor p^2
    # x = -2, y = 0.3: BCE = -(0.3 ln p + 0.7 ln(1 - p)), factor |0.3 - p|^2
    logits = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64)
    targets = torch.tensor([[0.8, 0.0, 0.3]], dtype=torch.float64)
    p1, p2 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(2.0))
    expected = torch.tensor([[
        math.log(2) * 0.09,
        math.log(1 + math.e) * p1 ** 2,
        -(0.3 * math.log(p2) + 0.7 * math.log(1 - p2)) * (0.3 - p2) ** 2,
    ]], dtype=torch.float64)
    torch.testing.assert_close(quality_focal_loss(logits, targets, beta=2.0), expected, rtol=1e-12, atol=1e-12)
    # beta changes the modulating exponent only: beta = 1 -> |y - p|
    torch.testing.assert_close(quality_focal_loss(logits[:, :1], targets[:, :1], beta=1.0),
                               torch.tensor([[math.log(2) * 0.3]], dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_qfl_with_hard_targets_is_focal_loss_without_alpha():
    # Relation tested: for y in {0, 1}, |y - p|^beta = (1 - p_t)^gamma with gamma = beta, and QFL has no
    # alpha weighting, so QFL(x, y; beta) == torchvision sigmoid_focal_loss(x, y, alpha=-1, gamma=beta).
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=generator) * 4
    targets = (torch.rand(64, 7, generator=generator) > 0.7).float()
    for beta in (2.0, 1.5):
        reference = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=beta, reduction="none")
        torch.testing.assert_close(quality_focal_loss(logits, targets, beta), reference, rtol=1e-5, atol=1e-7)
    # and with soft targets it is not (the relation really depends on y being 0 or 1)
    soft = targets * 0.6
    assert not torch.allclose(quality_focal_loss(logits, soft), sigmoid_focal_loss(logits, soft, alpha=-1))


def test_dfl_hand_computed():
    # bins 0..4, logits [0, 1, 2, 1, 0]; y = 1.25 -> 0.75 * CE(bin 1) + 0.25 * CE(bin 2),
    # CE(k) = logsumexp - logit_k, logsumexp = ln(2 + 2e + e^2)
    logits = torch.tensor([[0.0, 1.0, 2.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    lse = math.log(2 + 2 * math.e + math.e ** 2)
    expected = [0.75 * (lse - 1.0) + 0.25 * (lse - 2.0), lse - 2.0]  # y = 1.25 and y = 2.0 (one bin)
    got = distribution_focal_loss(logits, torch.tensor([1.25, 2.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_dfl_is_minimal_at_the_two_bin_split():
    # DFL is a cross-entropy with the soft target (0.75 on bin 1, 0.25 on bin 2): its gradient vanishes
    # when the softmax equals that split (up to the tiny mass left on the other bins).
    probs = torch.tensor([1e-9, 0.75, 0.25, 1e-9, 1e-9], dtype=torch.float64)
    logits = probs.log()[None].requires_grad_(True)
    distribution_focal_loss(logits, torch.tensor([1.25], dtype=torch.float64)).sum().backward()
    assert logits.grad.abs().max() < 1e-8
    # and its mean is the target distance, which is what the integral reads out
    torch.testing.assert_close(integral_distances(logits.detach().repeat(1, 4), 4),
                               torch.full((1, 4), 1.25, dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_integral_decoding():
    reg_max = 16
    logits = torch.full((2, 4, reg_max + 1), -1e4)
    logits[0, 0, 3] = 0.0  # all mass on bin 3 -> 3
    logits[0, 1] = 0.0  # uniform over 0..16 -> 8
    logits[0, 2, 2] = logits[0, 2, 5] = 0.0  # half on 2, half on 5 -> 3.5
    logits[0, 3, 16] = 0.0  # upper end -> 16
    logits[1, :, 0] = 0.0  # zero distance
    logits[1, 0, 1] = math.log(3.0)  # 1/4 on 0, 3/4 on 1 -> 0.75
    got = integral_distances(logits.reshape(2, -1), reg_max)
    expected = torch.tensor([[3.0, 8.0, 3.5, 16.0], [0.75, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # decoding: centre (10, 20) at stride 8 with (l, t, r, b) = (3, 8, 3.5, 16) stride units
    box = distances_to_boxes(torch.tensor([[10.0, 20.0]]) / 8, got[:1]) * 8
    torch.testing.assert_close(box, torch.tensor([[10 - 24.0, 20 - 64.0, 10 + 28.0, 20 + 128.0]]), rtol=0, atol=1e-4)


def test_distance_targets_are_clamped_below_reg_max():
    centres = torch.tensor([[5.0, 5.0], [5.0, 5.0]])
    boxes = torch.tensor([[2.0, 4.5, 30.0, 6.0], [6.0, 0.0, 7.0, 10.0]])  # second: centre left of the box
    got = boxes_to_distances(centres, boxes, 16)
    torch.testing.assert_close(got, torch.tensor([[3.0, 0.5, 15.9, 1.0], [0.0, 5.0, 2.0, 5.0]]))


def test_anchors_are_8_stride_squares_on_the_grid():
    head = GFLHead(num_classes=3, in_channels=32)
    maps = make_inputs().maps
    anchors, counts, strides = head.anchors(maps)
    assert counts == [256, 64, 16, 4, 1]
    # level 1 (stride 16), cell (x=2, y=1) -> row 8 + 2 of that level; mmdet centre offset 0
    row = 256 + 1 * 8 + 2
    torch.testing.assert_close(anchors[row], torch.tensor([32 - 64.0, 16 - 64.0, 32 + 64.0, 16 + 64.0]))
    assert strides[row].item() == 16.0


def test_losses_and_candidates_against_recomputation():
    torch.manual_seed(0)
    head = GFLHead(num_classes=4, in_channels=32, num_convs=1)
    # image 1 is padded to 100 (h) x 60 (w); image 2 has no boxes (it still counts 1 in num_pos)
    inputs = make_inputs(batch=3, image_sizes=torch.tensor([[128, 128], [100, 60], [128, 128]]),
                         boxes=[torch.tensor([[10.0, 12.0, 60.0, 50.0], [40.0, 30.0, 120.0, 126.0]]),
                                torch.tensor([[5.0, 5.0, 50.0, 90.0]]), torch.zeros(0, 4)],
                         labels=[torch.tensor([1, 3]), torch.tensor([2]), torch.zeros(0, dtype=torch.int64)])
    out = head(inputs)
    assert set(out.losses) == set(head.loss_weights) == {"loss_cls", "loss_bbox", "loss_dfl"}
    assert head.loss_weights == {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_dfl": 0.25}

    logits, distributions = head.predict(inputs.maps)
    anchors, counts, strides = head.anchors(inputs.maps)
    features = torch.cat([m.flatten(2).transpose(1, 2) for m in inputs.maps], 1)
    assigner = ATSSAssigner(9)
    qfl_sum, num_pos_clamped, giou_terms, dfl_terms, weights = 0.0, 0, [], [], []
    for image, cand in enumerate(out.candidates):
        h, w = inputs.image_sizes[image].tolist()
        centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
        valid = (centres[:, 0] < w) & (centres[:, 1] < h)
        torch.testing.assert_close(cand.boxes, anchors[valid])
        torch.testing.assert_close(cand.features, features[image][valid])
        level_valid = [int(v.sum()) for v in valid.split(counts)]
        assign = assigner.assign(anchors[valid], level_valid, inputs.gt_boxes[image], inputs.gt_labels[image])
        pos = assign.gt_inds > 0
        assert torch.equal(cand.positive, pos) and pos.any() == (image < 2)
        gt_index = assign.gt_inds[pos] - 1
        assert torch.equal(cand.labels[pos], inputs.gt_labels[image][gt_index])
        assert torch.equal(cand.target_boxes[pos], inputs.gt_boxes[image][gt_index])

        # decode the positives in pixels: centre +- integral distance * stride
        s = strides[valid][pos, None]
        dist_logits = distributions[image][valid][pos].reshape(-1, 4, 17)
        mean_dist = (dist_logits.softmax(-1) * torch.arange(17.0)).sum(-1) * s
        c = centres[valid][pos]
        pred = torch.cat((c - mean_dist[:, :2], c + mean_dist[:, 2:]), -1)
        gt = cand.target_boxes[pos]
        iou = torch.diag(box_iou(pred.detach(), gt))
        soft = torch.zeros(int(valid.sum()), 4)
        soft[pos, cand.labels[pos]] = iou
        cls_logits = logits[image][valid]
        prob = cls_logits.sigmoid()
        qfl_sum = qfl_sum + (F.binary_cross_entropy_with_logits(cls_logits, soft, reduction="none")
                             * (soft - prob).abs() ** 2).sum()
        num_pos_clamped += max(int(pos.sum()), 1)
        weight = prob[pos].max(-1).values.detach()
        weights.append(weight)
        giou_terms.append(1 - torch.diag(generalized_box_iou(pred, gt)))
        target_dist = torch.cat((c - gt[:, :2], gt[:, 2:] - c), -1) / s
        target_dist = target_dist.clamp(0, 16 - 0.1)
        lo = target_dist.floor()
        ce = -dist_logits.log_softmax(-1)
        dfl = (ce.gather(-1, lo.long()[..., None])[..., 0] * (lo + 1 - target_dist)
               + ce.gather(-1, lo.long()[..., None] + 1)[..., 0] * (target_dist - lo))
        dfl_terms.append(dfl.sum(-1))  # [P]
    weights = torch.cat(weights)
    # tolerance: float32 sums over a few hundred anchors
    torch.testing.assert_close(out.losses["loss_cls"], qfl_sum / num_pos_clamped, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_bbox"], (torch.cat(giou_terms) * weights).sum() / max(weights.sum(), 1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.losses["loss_dfl"], (torch.cat(dfl_terms) * weights).sum() / 4 / max(weights.sum(), 1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_convs", [0, 2])
def test_image_without_boxes(num_convs):
    head = GFLHead(num_classes=3, in_channels=32, num_convs=num_convs)
    inputs = make_inputs(boxes=[torch.zeros(0, 4), torch.tensor([[20.0, 20.0, 70.0, 90.0]])],
                         labels=[torch.zeros(0, dtype=torch.int64), torch.tensor([2])])
    for m in inputs.maps:
        m.requires_grad_(True)
    out = head(inputs)
    assert out.candidates[0].num_positives == 0 and out.candidates[0].num_gt == 0
    assert out.candidates[1].num_positives > 0
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    assert inputs.maps[0].grad is not None
    # no boxes anywhere: box terms are exact zeros, classification still pushes every score down
    empty = head(make_inputs(boxes=[torch.zeros(0, 4)] * 2, labels=[torch.zeros(0, dtype=torch.int64)] * 2))
    assert empty.losses["loss_bbox"].item() == 0.0 and empty.losses["loss_dfl"].item() == 0.0
    assert empty.losses["loss_cls"].item() > 0
