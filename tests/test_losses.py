"""codetr.models.losses against torchvision.ops (independent implementation)."""

import pytest
import torch
import torchvision.ops as tvops

from codetr.models.losses import sigmoid_focal_loss


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1.0, 2.0), (0.25, 0.0)])
def test_focal_loss_matches_torchvision(alpha: float, gamma: float) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 7, 5, generator=g, dtype=torch.float64) * 4
    targets = (torch.rand(6, 7, 5, generator=g, dtype=torch.float64) > 0.7).to(torch.float64)
    targets[0, 0] = 0.3  # soft targets are allowed too
    expected = tvops.sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none")
    # atol 1e-10 in float64: same formula, computed independently
    torch.testing.assert_close(sigmoid_focal_loss(logits, targets, alpha, gamma), expected, atol=1e-10, rtol=0)


def test_focal_loss_hand_checked() -> None:
    # logit 0 -> p = 0.5: positive loss = alpha * 0.5^2 * ln 2; negative = (1 - alpha) * 0.5^2 * ln 2
    loss = sigmoid_focal_loss(torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64))
    ln2 = torch.log(torch.tensor(2.0, dtype=torch.float64))
    expected = torch.stack((0.25 * 0.25 * ln2, 0.75 * 0.25 * ln2))
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_focal_loss_extreme_logits_finite(dtype: torch.dtype) -> None:
    logits = torch.tensor([50.0, -50.0, 50.0, -50.0, 0.0], dtype=dtype, requires_grad=True)
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0], dtype=dtype)
    loss = sigmoid_focal_loss(logits, targets)
    expected = tvops.sigmoid_focal_loss(logits.detach(), targets, reduction="none")
    assert torch.isfinite(loss).all()
    # confidently right -> ~0; confidently wrong -> ~alpha_t * 50
    assert loss[0] < 1e-12 and loss[1] < 1e-12
    torch.testing.assert_close(loss[2:4], torch.tensor([0.75 * 50, 0.25 * 50], dtype=dtype), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-6, atol=1e-6)
    loss.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_focal_loss_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        sigmoid_focal_loss(torch.zeros(2, 3), torch.zeros(2, 4))
