"""Batching: pad images of different sizes into one tensor with a padding mask."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """A padded batch.

    images:  float [B, 3, H, W], each image at the top-left, zero padding bottom / right.
    masks:   bool [B, H, W], True = padding, False = image pixel.
    targets: one dict per image (as produced by the transforms: "boxes" cxcywh normalised by the
             image's own unpadded size, "labels", "image_id", "orig_size", "size").
    """

    images: Tensor
    masks: Tensor
    targets: list[dict]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy on `device`; tensors inside the targets move too, other values are kept."""
        targets = [
            {k: v.to(device, non_blocking=non_blocking) if isinstance(v, Tensor) else v for k, v in t.items()}
            for t in self.targets
        ]
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     self.masks.to(device, non_blocking=non_blocking), targets)

    def __len__(self) -> int:
        return self.images.shape[0]


def collate(samples: list[tuple[Tensor, dict]], size_divisor: int = 1) -> Batch:
    """Stack (image [3, H_i, W_i], target) samples into a Batch.

    The padded H, W are the largest H_i, W_i rounded up to a multiple of `size_divisor`.
    """
    if len(samples) == 0:
        raise ValueError("collate needs at least one sample")
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    images = [image for image, _ in samples]
    channels = images[0].shape[0]
    height = math.ceil(max(img.shape[1] for img in images) / size_divisor) * size_divisor
    width = math.ceil(max(img.shape[2] for img in images) / size_divisor) * size_divisor
    batch = images[0].new_zeros((len(images), channels, height, width))
    masks = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]].copy_(img)
        masks[i, : img.shape[1], : img.shape[2]] = False
    return Batch(batch, masks, [target for _, target in samples])
