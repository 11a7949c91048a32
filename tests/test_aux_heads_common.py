"""Behaviour every one-stage auxiliary head shares, checked on FCOS, GFL and PAA with the same inputs
(ATSS, RetinaNet and Faster-RCNN have their own versions in their files, on their own inputs)."""
import pytest
import torch

from codetr.models.co_detr.heads.fcos import FCOSHead
from codetr.models.co_detr.heads.gfl import GFLHead
from codetr.models.co_detr.heads.paa import PAAHead
from tests.head_training import make_inputs, train_head

HEADS = [FCOSHead, GFLHead, PAAHead]


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.kind)
def test_out_of_range_label_is_rejected(head_class):
    head = head_class(num_classes=3, in_channels=32)
    with pytest.raises(ValueError, match=r"image 0 has gt label\(s\) \[1, 3\] outside \[0, 3\)"):
        head(make_inputs())  # labels [1, 3] and [0]


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.kind)
def test_autocast_runs_in_bfloat16(head_class):
    head = head_class(num_classes=4, in_channels=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(make_inputs())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.losses.values())


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.kind)
def test_smoke_training(head_class):
    torch.manual_seed(0)
    inputs = make_inputs()
    history, out = train_head(head_class(num_classes=4, in_channels=32, num_convs=1), inputs)
    assert all(m.grad is not None for m in inputs.maps)
    # GroupNorm(32) on 32 channels zeroes the 1x1 stride-128 map inside the tower (no gradient there)
    assert all(m.grad.abs().sum() > 0 for m in inputs.maps[:4])
    assert all(c.num_positives > 0 for c in out.candidates)
    assert history[-1] < 0.7 * history[0], history
