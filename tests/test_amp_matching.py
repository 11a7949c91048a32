"""Matching and assignment under bf16 autocast decide in float32 (mmdet's fp16 matcher is a known failure mode):
bf16 predictions give exactly the costs / IoUs of the same values cast to float32 outside autocast."""
import torch

from codetr.box_ops import box_iou
from codetr.models.co_detr.assigners import ATSSAssigner, MaxIoUAssigner
from codetr.models.matcher import HungarianMatcher


def random_boxes_xyxy(generator: torch.Generator, count: int, size: float = 200.0) -> torch.Tensor:
    corner = torch.rand(count, 2, generator=generator) * size
    extent = torch.rand(count, 2, generator=generator) * size / 2 + 4
    return torch.cat((corner, corner + extent), 1)


def test_hungarian_costs_are_float32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 30, 7, generator=g) * 3).bfloat16()
    boxes = (torch.rand(2, 30, 4, generator=g) * 0.5 + 0.25).bfloat16()
    targets = [{"labels": torch.randint(7, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.3}
               for n in (4, 6)]
    matcher = HungarianMatcher()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cost = matcher.batch_cost(logits, boxes, targets)
        matches = matcher(logits, boxes, targets)
    reference = matcher.batch_cost(logits.float(), boxes.float(), targets)
    assert cost.dtype == torch.float32
    torch.testing.assert_close(cost, reference, atol=0, rtol=0)  # exact: the same float32 computation
    for (queries, gts), (ref_queries, ref_gts) in zip(matches, matcher(logits.float(), boxes.float(), targets)):
        assert torch.equal(queries, ref_queries) and torch.equal(gts, ref_gts)
    # the comparison is not vacuous: the same costs computed in bf16 differ
    assert (matcher._class_cost(logits.flatten(0, 1), torch.tensor([1, 2])).float()
            - matcher._class_cost(logits.flatten(0, 1).float(), torch.tensor([1, 2]))).abs().max() > 1e-3


def test_assigners_decide_in_float32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    gts = random_boxes_xyxy(g, 5)
    boxes = (gts.repeat(40, 1) + torch.randn(200, 4, generator=g) * 25).bfloat16()
    labels = torch.randint(3, (5,), generator=g)
    maxiou = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4, min_pos_iou=0.0)
    atss = ATSSAssigner(topk=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = (maxiou.assign(boxes, gts, labels), atss.assign(boxes, [120, 80], gts, labels))
    references = (maxiou.assign(boxes.float(), gts, labels), atss.assign(boxes.float(), [120, 80], gts, labels))
    for result, reference in zip(results, references):
        assert result.max_overlaps.dtype == torch.float32
        torch.testing.assert_close(result.max_overlaps, reference.max_overlaps, atol=0, rtol=0)
        assert torch.equal(result.gt_inds, reference.gt_inds)
    assert (results[0].gt_inds > 0).any() and (results[0].gt_inds == 0).any()  # both decisions occur
    # not vacuous: IoUs computed in bf16 differ from float32 ones by more than the decisions can absorb
    assert (box_iou(boxes, gts.bfloat16())[0].float() - box_iou(boxes.float(), gts)[0]).abs().max() > 1e-3
