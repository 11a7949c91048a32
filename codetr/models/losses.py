"""Elementwise loss functions shared by the DETR head and the auxiliary heads."""

import torch
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


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """Quality focal loss (Li et al. 2020, GFL) for sigmoid classifiers, summed over classes, per sample.

    logits [N, K] pre-sigmoid; labels [N] int64 in 0..K (K = background); quality [N] in [0, 1], the soft
    target of each positive's own class (the IoU of its predicted box with its ground truth); ignored for
    background. Every class of every sample is a binary cross-entropy against its target (0, or the quality
    for a positive's class), scaled by |target - sigmoid(logit)|^beta. Returns [N].
    As in mmdet's quality_focal_loss, the scale factor is not detached.
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or quality.shape != labels.shape:
        raise ValueError(f"quality_focal_loss: logits [N, K], labels [N] and quality [N] expected, got "
                         f"{tuple(logits.shape)}, {tuple(labels.shape)}, {tuple(quality.shape)}")
    num_classes = logits.shape[1]
    positive = labels < num_classes
    targets = torch.zeros_like(logits)
    targets[positive, labels[positive]] = quality[positive].to(logits.dtype)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return (ce * (targets - prob).abs().pow(beta)).sum(-1)
