"""Swin backbone state dicts (mmdet 3.3 `SwinTransformer`, Sense-X `SwinTransformerV1`) -> codetr's
`SwinBackbone` (codetr/models/swin.py).

The two sources compute the same function but name and lay out their tensors differently:

    mmdet 3.3 (mmdet3 zoo)                 Sense-X (SwinTransformerV1)      codetr SwinBackbone
    patch_embed.projection.*               patch_embed.proj.*               patch_embed.proj.*
    patch_embed.norm.*                     patch_embed.norm.*               patch_embed.norm.*
    stages.s.blocks.b.norm{1,2}.*          layers.s.blocks.b.norm{1,2}.*    stages.s.b.norm{1,2}.*
    stages.s.blocks.b.attn.w_msa.X         layers.s.blocks.b.attn.X         stages.s.b.attn.X
      X = relative_position_bias_table [(2w-1)^2, heads], relative_position_index [N, N] (ours [N * N]),
          qkv.{weight,bias}, proj.{weight,bias}
    stages.s.blocks.b.ffn.layers.0.0.*     layers.s.blocks.b.mlp.fc1.*      stages.s.b.mlp.0.*
    stages.s.blocks.b.ffn.layers.1.*       layers.s.blocks.b.mlp.fc2.*      stages.s.b.mlp.3.*
    stages.s.downsample.{reduction,norm}   layers.s.downsample.{...}        downsamples.s.{reduction,norm}
    norm{i}.*                              norm{i}.*                        out_norms.{i}.*

Patch merging's 4C channels: mmdet gathers the 2x2 neighbours with nn.Unfold, channel-major
(c * 4 + 2 * dh + dw); the original Swin, Sense-X and torchvision (ours) concatenate neighbour-major in
the order (dh, dw) = (0, 0), (1, 0), (0, 1), (1, 1) (k * C + c). mmdet's own `swin_converter` permutes
original checkpoints into its order when it loads them (`convert_weights=True`), so mmdet state dicts
hold the unfold order: `downsample.reduction.weight` columns and `downsample.norm.*` are permuted back
here. Sense-X tensors are copied as they are.

relative_position_index is a function of the window size: the checkpoint's value is checked against
`relative_position_index(w)` and the recomputed one is emitted (`recomputed_keys` lists those keys).
"""
from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from codetr.convert.common import ConversionError
from codetr.models.swin import SwinBackbone, relative_position_index

_BLOCK_ATTN = r"(relative_position_bias_table|relative_position_index|(?:qkv|proj)\.(?:weight|bias))"
_MMDET_RULES = [  # (pattern after the prefix, our key from its groups)
    (r"patch_embed\.projection\.(weight|bias)", "patch_embed.proj.{0}"),
    (r"patch_embed\.norm\.(weight|bias)", "patch_embed.norm.{0}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(norm[12]\.(?:weight|bias))", "stages.{0}.{1}.{2}"),
    (rf"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.{_BLOCK_ATTN}", "stages.{0}.{1}.attn.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", "stages.{0}.{1}.mlp.0.{2}"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)", "stages.{0}.{1}.mlp.3.{2}"),
    (r"stages\.(\d+)\.downsample\.(reduction\.weight|norm\.(?:weight|bias))", "downsamples.{0}.{1}"),
    (r"norm(\d+)\.(weight|bias)", "out_norms.{0}.{1}"),
]
_SENSEX_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", "patch_embed.proj.{0}"),
    (r"patch_embed\.norm\.(weight|bias)", "patch_embed.norm.{0}"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.(norm[12]\.(?:weight|bias))", "stages.{0}.{1}.{2}"),
    (rf"layers\.(\d+)\.blocks\.(\d+)\.attn\.{_BLOCK_ATTN}", "stages.{0}.{1}.attn.{2}"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", "stages.{0}.{1}.mlp.0.{2}"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.(weight|bias)", "stages.{0}.{1}.mlp.3.{2}"),
    (r"layers\.(\d+)\.downsample\.(reduction\.weight|norm\.(?:weight|bias))", "downsamples.{0}.{1}"),
    (r"norm(\d+)\.(weight|bias)", "out_norms.{0}.{1}"),
]
_UNFOLD_TO_CONCAT = [0, 2, 1, 3]  # concat neighbour k = (dh, dw) in (0,0), (1,0), (0,1), (1,1) -> unfold 2dh + dw


def unfold_to_concat(value: Tensor) -> Tensor:
    """Patch merging's 4C axis (the last) from unfold order (c * 4 + 2dh + dw) to concat order (k * C + c):
    reduction.weight [2C, 4C] columns, norm.{weight,bias} [4C]."""
    channels = value.shape[-1] // 4
    grouped = value.reshape(*value.shape[:-1], channels, 4)[..., _UNFOLD_TO_CONCAT]  # [..., C, k]
    return grouped.transpose(-1, -2).reshape(value.shape)


def recomputed_keys(keys) -> list[str]:
    """Those of our state-dict keys whose value is recomputed from the architecture, not taken from the
    checkpoint (the converters check the checkpoint's value and emit the recomputed one)."""
    return [k for k in keys if k.endswith("attn.relative_position_index")]


def swin_architecture(state: dict[str, Tensor]) -> dict:
    """SwinBackbone's structural keyword arguments read off a converted (our names) state dict:
    embed_dim, depths, num_heads, window_size, mlp_ratio, out_indices, patch_size. drop_path_rate is a
    training setting and not stored: pass it separately."""
    def need(key: str) -> Tensor:
        if key not in state:
            raise ConversionError(f"swin: the checkpoint has no tensor for {key} (our name)")
        return state[key]

    proj = need("patch_embed.proj.weight")  # [C, 3, p, p]
    depths = []
    while any(k.startswith(f"stages.{len(depths)}.") for k in state):
        depths.append(len({int(m.group(1)) for k in state if (m := re.match(rf"stages\.{len(depths)}\.(\d+)\.", k))}))
    if not depths:
        raise ConversionError("swin: the checkpoint has no transformer blocks")
    table = need("stages.0.0.attn.relative_position_bias_table")  # [(2w - 1)**2, heads]
    window = (math.isqrt(table.shape[0]) + 1) // 2
    if (2 * window - 1) ** 2 != table.shape[0]:
        raise ConversionError(f"swin: stages.0.0.attn.relative_position_bias_table has {table.shape[0]} rows, "
                              "not (2 * window - 1)**2")
    return dict(
        embed_dim=proj.shape[0],
        depths=tuple(depths),
        num_heads=tuple(need(f"stages.{s}.0.attn.relative_position_bias_table").shape[1] for s in range(len(depths))),
        window_size=window,
        mlp_ratio=need("stages.0.0.mlp.0.weight").shape[0] / proj.shape[0],
        out_indices=tuple(sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"out_norms\.(\d+)\.weight", k)))),
        patch_size=proj.shape[-1],
    )


def _listed(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _convert(state: dict[str, Tensor], prefix: str, source: str, rules: list, unfold_order: bool) -> dict[str, Tensor]:
    compiled = [(re.compile(re.escape(prefix) + pattern), template) for pattern, template in rules]
    converted: dict[str, Tensor] = {}
    unmapped = []
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        found = next(((m, t) for p, t in compiled if (m := p.fullmatch(key))), None)
        if found is None:
            unmapped.append(key)
            continue
        ours = found[1].format(*found[0].groups())
        if unfold_order and ours.startswith("downsamples.") and value.shape[-1] % 4 == 0:
            value = unfold_to_concat(value)
        converted[ours] = value
    if unmapped:
        raise ConversionError(f"{source} swin: {len(unmapped)} keys have no codetr counterpart: {_listed(unmapped)}")
    if not converted:
        raise ConversionError(f"{source} swin: no key starts with {prefix!r}")

    arch = swin_architecture(converted)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: v.shape for k, v in SwinBackbone(**arch).state_dict().items()}
    index = relative_position_index(arch["window_size"])  # [N * N]; checkpoints hold it as [N, N]
    recomputed = set(recomputed_keys(expected))
    problems = [f"{k} {list(v.shape)} (expected {list(expected[k])})" for k, v in converted.items()
                if k in expected and k not in recomputed and v.shape != expected[k]]
    problems += [f"{k} (not in a Swin with depths {arch['depths']})" for k in converted if k not in expected]
    problems += [f"{k} missing" for k in expected if k not in converted and k not in recomputed]
    for key in sorted(recomputed & set(converted)):
        value = converted[key]
        same = value.numel() == index.numel() and (
            value.device.type == "meta" or torch.equal(value.flatten().to("cpu", torch.int64), index))
        if not same:
            problems.append(f"{key} {list(value.shape)} is not the relative position index of a "
                            f"{arch['window_size']}-window")
    if problems:
        raise ConversionError(f"{source} swin: {len(problems)} mismatches against SwinBackbone{arch}: {_listed(problems)}")
    for key in recomputed:
        converted[key] = index.clone()
    return converted


def convert_mmdet_swin(state: dict[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
    """mmdet 3.3 SwinTransformer tensors (the keys of `state` starting with `prefix`; others are ignored)
    -> SwinBackbone's state dict (keys without prefix), patch merging permuted to concat order.

    Strict: raises ConversionError (a CheckpointError), in one line, naming every key under `prefix`
    that no rule places, every shape that does not fit the architecture read off the checkpoint, every
    SwinBackbone key left unfilled, and a relative_position_index that is not the window's.
    """
    return _convert(state, prefix, "mmdet", _MMDET_RULES, unfold_order=True)


def convert_sensex_swin(state: dict[str, Tensor], prefix: str = "backbone.") -> dict[str, Tensor]:
    """Sense-X Co-DETR SwinTransformerV1 (= original Swin repo names) -> SwinBackbone's state dict;
    tensors copied as they are. Strict in the same way as `convert_mmdet_swin`."""
    return _convert(state, prefix, "sensex", _SENSEX_RULES, unfold_order=False)
