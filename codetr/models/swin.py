"""Swin Transformer backbone, numerically equal to mmdetection 3.3's `SwinTransformer` (and to Sense-X
Co-DETR's `SwinTransformerV1`, which computes the same function under other key names).

Built from torchvision's Swin pieces where they compute the same thing: `SwinTransformerBlock`
(pre-norm attention + MLP residuals, stochastic depth per sample), `PatchMerging` (2x2 neighbours
concatenated as x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2], bottom/right zero padding of
odd sizes, LayerNorm, bias-free linear) and `ShiftedWindowAttention`'s parameters. Written here, where
torchvision differs from mmdet:
  - the attention forward (`WindowAttention.forward`): torchvision drops the shift of a shifted block
    when the padded map fits in one window (pad_H <= window); mmdet always shifts by window // 2 and
    masks, so the last stages of small or wide images differ;
  - the patch embedding (`PatchEmbed`): mmdet zero-pads the image at the bottom/right to a multiple of
    the patch size; torchvision's strided convolution drops the remainder;
  - the multi-scale outputs: every stage in `out_indices` goes through its own LayerNorm (`out_norms`)
    before patch merging, and comes out as [B, C, H, W].
Checkpoint names and layouts: codetr/convert/swin_keys.py.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention, SwinTransformerBlock

from codetr.models.checkpointing import maybe_checkpoint

# The Co-DETR releases' backbones (Sense-X/Co-DETR projects/configs: co_deformable_detr_swin_{tiny,small,
# base,large}_1x_coco.py, co_dino_5scale_swin_large_*.py; mmdet 3.3 projects/CO-DETR codino configs).
# Their out_indices differ by detector (Co-Deformable-DETR (1, 2, 3), Co-DINO (0, 1, 2, 3)) and are left
# to the caller.
SWIN_SIZES: dict[str, dict] = {
    "swin_t": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "swin_s": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2),
    "swin_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12, drop_path_rate=0.2),
    "swin_l": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12, drop_path_rate=0.3),
}
MASKED = -100.0  # the attention logit added between tokens of different regions of a shifted window


def relative_position_index(window_size: int) -> Tensor:
    """[N * N] int64, N = window_size**2: for tokens p = (i1, j1), q = (i2, j2) of a window (row-major),
    the row (i1 - i2 + w - 1) * (2w - 1) + (j1 - j2 + w - 1) of the [(2w - 1)**2, heads] bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + (window_size - 1)  # [2, N, N], each in [0, 2w - 2]
    return (relative[0] * (2 * window_size - 1) + relative[1]).flatten()


def shifted_window_mask(pad_h: int, pad_w: int, window: int, shift: int, device: torch.device,
                        dtype: torch.dtype) -> Tensor:
    """[num_windows, N, N] additive attention mask of a map rolled by (-shift, -shift): 0 between tokens
    of the same region (rows and columns split at pad - window and pad - shift), MASKED otherwise.
    Windows in row-major order, as `WindowAttention` partitions them."""
    def band(size: int) -> Tensor:
        # rolled positions [0, size - window), [size - window, size - shift), [size - shift, size)
        position = torch.arange(size, device=device)
        return (position >= size - window).long() + (position >= size - shift).long()

    region = band(pad_h)[:, None] * 3 + band(pad_w)[None, :]  # [pad_h, pad_w]
    region = region.view(pad_h // window, window, pad_w // window, window).transpose(1, 2).reshape(-1, window * window)
    different = region[:, :, None] != region[:, None, :]
    return torch.zeros(different.shape, device=device, dtype=dtype).masked_fill_(different, MASKED)


class WindowAttention(ShiftedWindowAttention):
    """torchvision's window attention parameters (qkv, proj, relative_position_bias_table and the
    relative_position_index buffer), with mmdet's forward: pad to a multiple of the window, roll by
    (-shift, -shift) whenever shift > 0, mask across regions, attend per window, undo.

    forward(x [B, H, W, C]) -> [B, H, W, C]. Padded tokens (zeros) take part in the attention as keys,
    exactly as in mmdet; they are cut away afterwards.
    """

    def define_relative_position_index(self) -> None:
        if self.window_size[0] != self.window_size[1]:
            raise ValueError(f"square windows only, got {self.window_size}")
        self.register_buffer("relative_position_index", relative_position_index(self.window_size[0]))

    def forward(self, x: Tensor) -> Tensor:
        batch, height, width, channels = x.shape
        window, shift, heads = self.window_size[0], self.shift_size[0], self.num_heads
        tokens = window * window
        x = F.pad(x, (0, 0, 0, (-width) % window, 0, (-height) % window))  # zeros at the bottom / right
        pad_h, pad_w = x.shape[1], x.shape[2]
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        # [B, pad_h, pad_w, C] -> [B * nW, N, C], windows row-major within each image
        x = x.view(batch, pad_h // window, window, pad_w // window, window, channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, tokens, channels)

        qkv = self.qkv(x).reshape(x.shape[0], tokens, 3, heads, channels // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B * nW, heads, N, C / heads]
        attn = (q * (channels // heads) ** -0.5) @ k.transpose(-2, -1)
        attn = attn + self.get_relative_position_bias()  # [1, heads, N, N]
        if shift > 0:
            mask = shifted_window_mask(pad_h, pad_w, window, shift, attn.device, attn.dtype)  # [nW, N, N]
            attn = (attn.view(batch, mask.shape[0], heads, tokens, tokens) + mask[None, :, None]).flatten(0, 1)
        attn = F.dropout(attn.softmax(dim=-1), p=self.attention_dropout, training=self.training)
        x = (attn @ v).transpose(1, 2).reshape(-1, tokens, channels)
        x = F.dropout(self.proj(x), p=self.dropout, training=self.training)

        x = x.view(batch, pad_h // window, pad_w // window, window, window, channels)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, pad_h, pad_w, channels)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :height, :width, :]


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size convolution + LayerNorm; the image is zero-padded at the
    bottom / right to a multiple of patch_size first (mmdet's "corner" AdaptivePadding).

    forward(images [B, 3, H, W]) -> [B, ceil(H / p), ceil(W / p), C] (channels last).
    """

    def __init__(self, embed_dim: int, patch_size: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        images = F.pad(images, (0, (-width) % self.patch_size, 0, (-height) % self.patch_size))
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class SwinBackbone(nn.Module):
    """Swin Transformer (v1) returning the maps of the stages in `out_indices`, each LayerNorm-ed.

    Stage s has embed_dim * 2**s channels at stride patch_size * 2**s (4, 8, 16, 32); its blocks
    alternate plain (even) and shifted (odd, shift window_size // 2) windows; a PatchMerging halves the
    resolution (ceil) between stages. Stochastic depth grows linearly from 0 to drop_path_rate over all
    blocks (training only). Any H, W: sizes that are not multiples of the patch, 2 or the window are
    zero-padded at the bottom / right, as in mmdet.

    forward(images [B, 3, H, W]) -> [B, out_channels[i], ceil(H / out_strides[i]), ceil(W / out_strides[i])]
    for each i, in out_indices order; the maps are channels-last in memory (a permuted NHWC tensor).
    Submodules: patch_embed.{proj,norm}, stages.{s}.{b} (torchvision SwinTransformerBlock: norm1,
    attn.{qkv,proj,relative_position_bias_table,relative_position_index}, norm2, mlp.{0,3}),
    downsamples.{s} (torchvision PatchMerging: norm, reduction), out_norms.{s}.
    """

    def __init__(
        self,
        embed_dim: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.3,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        patch_size: int = 4,
    ) -> None:
        super().__init__()
        self.activation_checkpointing = False  # see codetr/models/checkpointing.py
        if len(depths) != len(num_heads):
            raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
        increasing = list(out_indices) == sorted(set(out_indices))
        if not out_indices or not increasing or not 0 <= out_indices[0] <= out_indices[-1] < len(depths):
            raise ValueError(f"out_indices {tuple(out_indices)} must be increasing stage indices < {len(depths)}")
        dims = [embed_dim * 2**stage for stage in range(len(depths))]
        drop_path = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # mmdet's rule
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.stages = nn.ModuleList()
        for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
            first = sum(depths[:stage])
            self.stages.append(nn.Sequential(*[
                SwinTransformerBlock(
                    dims[stage], heads, window_size=[window_size] * 2,
                    shift_size=[0, 0] if block % 2 == 0 else [window_size // 2] * 2,
                    mlp_ratio=mlp_ratio, stochastic_depth_prob=drop_path[first + block],
                    norm_layer=nn.LayerNorm, attn_layer=WindowAttention,
                )
                for block in range(depth)
            ]))
        self.downsamples = nn.ModuleList(PatchMerging(dims[stage]) for stage in range(len(depths) - 1))
        self.out_norms = nn.ModuleDict({str(stage): nn.LayerNorm(dims[stage]) for stage in out_indices})
        self.out_indices: list[int] = list(out_indices)
        self.out_channels: list[int] = [dims[stage] for stage in out_indices]
        self.out_strides: list[int] = [patch_size * 2**stage for stage in out_indices]

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed(images)  # [B, H / 4, W / 4, C], channels last throughout
        outputs = []
        for stage, blocks in enumerate(self.stages):
            x = maybe_checkpoint(self.activation_checkpointing, blocks, x)
            if stage in self.out_indices:
                outputs.append(self.out_norms[str(stage)](x).permute(0, 3, 1, 2))  # [B, C_s, H_s, W_s]
            if stage == self.out_indices[-1]:
                break  # later stages feed no output
            x = self.downsamples[stage](x)
        return outputs
