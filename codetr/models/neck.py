"""Channel mapper: backbone maps -> `d_model`-channel maps at strides 8, 16, 32, plus an extra stride-64 level."""
from __future__ import annotations

from torch import Tensor, nn


def conv_gn(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias)
    nn.init.xavier_uniform_(conv.weight)
    return nn.Sequential(conv, nn.GroupNorm(32, out_channels))


class ChannelMapper(nn.Module):
    """Per input a 1x1 conv (no bias) + GroupNorm(32); one extra level = 3x3 stride-2 conv on raw C5 + GN.

    forward([C3, C4, C5]) -> 4 maps [B, d_model, H_l, W_l] at strides 8, 16, 32, 64.
    """

    def __init__(self, in_channels: list[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(conv_gn(c, out_channels, 1) for c in in_channels)
        self.extra = conv_gn(in_channels[-1], out_channels, 3, stride=2)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        outputs = [layer(x) for layer, x in zip(self.lateral, features)]
        outputs.append(self.extra(features[-1]))
        return outputs
