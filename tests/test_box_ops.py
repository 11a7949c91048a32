"""codetr.box_ops against torchvision.ops (independent implementation) on random boxes."""

import pytest
import torch
import torchvision.ops as tvops

from codetr import box_ops

ATOL = 1e-6  # float64 everywhere below; both sides compute the same formulas, so 1e-6 is loose


def _random_xyxy(n: int, generator: torch.Generator) -> torch.Tensor:
    """Valid xyxy boxes [n, 4] in [0, 1]^2 with positive width and height, float64."""
    top_left = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.7
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * 0.5 + 1e-3
    return torch.cat((top_left, top_left + wh), dim=1)


def test_conversions_match_torchvision_and_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    xyxy = _random_xyxy(50, g)
    cxcywh = box_ops.box_xyxy_to_cxcywh(xyxy)
    torch.testing.assert_close(cxcywh, tvops.box_convert(xyxy, "xyxy", "cxcywh"), atol=ATOL, rtol=0)
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-12, rtol=0)
    # any leading dims
    batched = cxcywh.view(5, 10, 4)
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(batched), xyxy.view(5, 10, 4), atol=1e-12, rtol=0)


def test_area_and_iou_match_torchvision() -> None:
    g = torch.Generator().manual_seed(1)
    a, b = _random_xyxy(17, g), _random_xyxy(23, g)
    torch.testing.assert_close(box_ops.box_area(a), tvops.box_area(a), atol=ATOL, rtol=0)
    iou, union = box_ops.box_iou(a, b)
    assert iou.shape == union.shape == (17, 23)
    torch.testing.assert_close(iou, tvops.box_iou(a, b), atol=ATOL, rtol=0)
    # union = area1 + area2 - intersection, with intersection = iou * union
    expected_union = tvops.box_area(a)[:, None] + tvops.box_area(b)[None, :] - iou * union
    torch.testing.assert_close(union, expected_union, atol=ATOL, rtol=0)


def test_generalized_iou_pairwise_and_elementwise_match_torchvision() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = _random_xyxy(31, g), _random_xyxy(19, g)
    expected = tvops.generalized_box_iou(a, b)
    torch.testing.assert_close(box_ops.generalized_box_iou(a, b), expected, atol=ATOL, rtol=0)
    c = _random_xyxy(19, g)
    paired = box_ops.elementwise_generalized_box_iou(b, c)
    torch.testing.assert_close(paired, tvops.generalized_box_iou(b, c).diagonal(), atol=ATOL, rtol=0)
    # identical boxes give exactly 1
    assert box_ops.generalized_box_iou(a, a).diagonal().sub(1).abs().max() < 1e-12


def test_elementwise_giou_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        box_ops.elementwise_generalized_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))


def test_degenerate_boxes_give_finite_values_and_gradients() -> None:
    # zero-size, identical points, inverted corners, and a normal box
    boxes1 = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [0.6, 0.6, 0.4, 0.4], [0.1, 0.1, 0.3, 0.3]],
        dtype=torch.float32,
        requires_grad=True,
    )
    boxes2 = torch.tensor(
        [[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3], [0.3, 0.3, 0.3, 0.3]],
        dtype=torch.float32,
    )
    pairwise = box_ops.generalized_box_iou(boxes1, boxes2)
    paired = box_ops.elementwise_generalized_box_iou(boxes1, boxes2)
    iou, _ = box_ops.box_iou(boxes1, boxes2)
    assert torch.isfinite(pairwise).all() and torch.isfinite(paired).all() and torch.isfinite(iou).all()
    assert (pairwise >= -1 - 1e-6).all() and (pairwise <= 1 + 1e-6).all()
    (pairwise.sum() + paired.sum() + iou.sum()).backward()
    assert torch.isfinite(boxes1.grad).all()
    # cxcywh with zero width/height (what a collapsed prediction looks like) through the conversion
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.3, 0.3, 0.2, 0.1]], requires_grad=True)
    giou = box_ops.elementwise_generalized_box_iou(
        box_ops.box_cxcywh_to_xyxy(pred), box_ops.box_cxcywh_to_xyxy(pred.detach().flip(0))
    )
    giou.sum().backward()
    assert torch.isfinite(giou).all() and torch.isfinite(pred.grad).all()


def test_giou_gradient_matches_finite_differences() -> None:
    g = torch.Generator().manual_seed(3)
    a = _random_xyxy(4, g).requires_grad_(True)
    b = _random_xyxy(4, g)
    assert torch.autograd.gradcheck(lambda x: box_ops.elementwise_generalized_box_iou(x, b), (a,))


def test_inverse_sigmoid_inverts_sigmoid_and_stays_finite_at_0_and_1() -> None:
    x = torch.linspace(-8, 8, 33, dtype=torch.float64)
    torch.testing.assert_close(box_ops.inverse_sigmoid(torch.sigmoid(x)), x, atol=1e-9, rtol=0)
    ends = box_ops.inverse_sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.isfinite(ends).all() and ends[0] < -11 and ends[1] > 11  # log(1e-5) ~ -11.5


def test_scale_boxes_hand_checked() -> None:
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.5, 0.5, 0.2]]])  # [1, 2, 4] cxcywh norm
    sizes_hw = torch.tensor([[100, 200]])  # height 100, width 200
    expected = torch.tensor([[[0.0, 0.0, 200.0, 100.0], [0.0, 40.0, 100.0, 60.0]]])
    torch.testing.assert_close(box_ops.scale_boxes(boxes, sizes_hw), expected, atol=1e-5, rtol=0)
