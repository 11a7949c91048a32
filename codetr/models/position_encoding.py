"""Sine position encodings: for feature maps (per pixel) and for boxes (per query)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _interleave_sin_cos(x: Tensor) -> Tensor:
    """[..., F] phases -> [..., F] with sin on even and cos on odd channels pairwise interleaved."""
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    index = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_feats)


def sine_position_encoding(
    mask: Tensor, num_feats: int = 128, temperature: float = 10000.0, offset: float = -0.5, scale: float = 2 * math.pi
) -> Tensor:
    """2-D normalised sine encoding of a padded feature map.

    mask: [B, H, W] bool, True = padding. Returns [B, 2 * num_feats, H, W] (y features first, then x).
    Coordinates are pixel counts over the valid region, shifted by `offset` and normalised to (0, scale].
    """
    not_mask = (~mask).float()
    y = not_mask.cumsum(1)
    x = not_mask.cumsum(2)
    eps = 1e-6
    y = (y + offset) / (y[:, -1:, :] + eps) * scale
    x = (x + offset) / (x[:, :, -1:] + eps) * scale
    freqs = _frequencies(num_feats, temperature, mask.device)
    pos_y = _interleave_sin_cos(y[..., None] / freqs)
    pos_x = _interleave_sin_cos(x[..., None] / freqs)
    return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of boxes (or points) given in [0, 1].

    boxes: [..., K] (K = 4 for cxcywh boxes). Returns [..., K * num_feats], coordinate by coordinate.
    """
    freqs = _frequencies(num_feats, temperature, boxes.device)
    phases = boxes[..., None] * (2 * math.pi) / freqs  # [..., K, num_feats]
    return _interleave_sin_cos(phases).flatten(-2)
