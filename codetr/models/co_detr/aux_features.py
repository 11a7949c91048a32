"""The auxiliary heads' input: the encoder output as feature maps, plus one coarser level.

Co-DETR runs its one-to-many heads on the ENCODER OUTPUT (not on the neck): the memory [B, S, C] is cut
back into its levels (strides 8, 16, 32, 64; Co-DINO 4..64) and a 3x3 stride-2 conv + GroupNorm adds
stride 128.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.neck import conv_gn
from codetr.models.transformer import FlatFeatures


def memory_to_maps(memory: Tensor, feats: FlatFeatures) -> tuple[list[Tensor], list[Tensor]]:
    """memory [B, S, C] -> per level maps [B, C, H_l, W_l] and padding masks [B, H_l, W_l] (True = pad)."""
    batch, _, channels = memory.shape
    shapes = [tuple(s) for s in feats.spatial_shapes.tolist()]
    sizes = [h * w for h, w in shapes]
    maps = [m.transpose(1, 2).reshape(batch, channels, h, w) for m, (h, w) in zip(memory.split(sizes, 1), shapes)]
    masks = [m.reshape(batch, h, w) for m, (h, w) in zip(feats.padding_mask.split(sizes, 1), shapes)]
    return maps, masks


class AuxFeatureMaps(nn.Module):
    """Encoder memory -> its levels' maps plus one at twice the last stride (a 3x3 stride-2 conv + GN):
    strides 8..128 for 4 encoder levels, 4..128 for 5."""

    def __init__(self, d_model: int, level_strides: tuple[int, ...] = (8, 16, 32, 64)) -> None:
        super().__init__()
        self.strides = [*level_strides, 2 * level_strides[-1]]
        # The released downsample is a plain nn.Conv2d, with a bias (GroupNorm does not cancel it).
        self.downsample = conv_gn(d_model, d_model, 3, stride=2, bias=True)

    def forward(self, memory: Tensor, feats: FlatFeatures) -> tuple[list[Tensor], list[Tensor]]:
        maps, masks = memory_to_maps(memory, feats)
        maps.append(self.downsample(maps[-1]))
        masks.append(F.interpolate(masks[-1][None].float(), size=maps[-1].shape[-2:])[0].bool())
        return maps, masks
