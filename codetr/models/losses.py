"""Elementwise loss functions shared by the DETR head and the auxiliary heads."""

import torch.nn.functional as F
from torch import Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss (Lin et al. 2017) for independent sigmoid classifiers, without reduction.

    logits: any shape, pre-sigmoid scores. targets: same shape, float in [0, 1] (1 = positive).
    Returns a tensor of the same shape. ``alpha`` weights positives (1 - alpha weights negatives);
    a negative ``alpha`` disables the weighting. The cross-entropy comes from
    ``binary_cross_entropy_with_logits`` (log-sum-exp form), so logits of +-50 stay finite.
    """
    if logits.shape != targets.shape:
        raise ValueError(
            f"sigmoid_focal_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} "
            "must have the same shape"
        )
    targets = targets.to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    # 1 - p_t: the probability mass the classifier puts on the wrong answer
    miss = prob * (1 - targets) + (1 - prob) * targets
    loss = ce * miss.pow(gamma)
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss
