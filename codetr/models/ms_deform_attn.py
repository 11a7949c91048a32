"""Multi-scale deformable attention (Zhu et al., Deformable DETR, 2021) in pure PyTorch.

Each query attends to a few sampled points per head and per feature level: P points at learned
offsets around a reference point, read from the level's value map by bilinear interpolation and
combined with softmax attention weights. Two implementations give the same numbers (tests hold them to
float64 round-off and to the recorded mmcv outputs):
  - "grid_sample": ``F.grid_sample`` once per level, differentiated by autograd (mmcv's and HF's pure-PyTorch
    path); autograd keeps every level's [B*H, Dh, Lq, P] samples alive for backward.
  - "sparse": one sparse matrix product with a hand-written backward (``msda_sparse.py``) that keeps only its
    inputs. On an R50 encoder layer (800x1216, CPU) it takes the time grid_sample takes and keeps ~4x less for
    backward (an R50 training step's peak RSS -20 to -27%); on small calls its fixed costs make it slower.
"auto" picks "sparse" for large calls on the CPU (SPARSE_MIN_POINTS) and "grid_sample" otherwise, and on GPUs
until measured there (bench/gpu.sh).

Coordinates are normalised (x, y) in [0, 1]: (0, 0) is the top-left corner of the map and pixel
(i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H) (``grid_sample`` with
``align_corners=False``). Points outside the map read zeros.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.msda_sparse import sparse_deformable_attention

ATTENTION_IMPLS = ("auto", "grid_sample", "sparse")

# "auto" on the CPU: sparse from this many sampling points per call (B * Lq * H * L * P) on. Measured forward +
# backward on 2 cores: an R50 encoder layer (2.6M points) sparse 0.39 s / grid_sample 0.40 s, keeping 4x less for
# backward; a tiny-preset encoder layer (0.4M) 0.046 / 0.026 s; R50 decoder layers (<0.1M) 0.018-0.033 /
# 0.017-0.026 s.
SPARSE_MIN_POINTS = 1_000_000


def resolve_attention_impl(impl: str, device: torch.device, num_points: int = SPARSE_MIN_POINTS) -> str:
    """The implementation "auto" stands for on `device` for a call with `num_points` sampling points."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"deformable attention implementation must be one of {', '.join(ATTENTION_IMPLS)}, "
                         f"got {impl!r}")
    if impl == "auto":
        return "sparse" if device.type == "cpu" and num_points >= SPARSE_MIN_POINTS else "grid_sample"
    return impl


def _level_shapes(spatial_shapes: Tensor, level_start_index: Tensor | None, num_values: int,
                  level_shapes: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """(H_l, W_l) per level as python ints, checked against the value length and start index. `level_shapes`,
    when given, are those ints already (the tensors' values are not read: torch.export cannot trace that)."""
    if level_shapes is not None:
        shapes = [tuple(hw) for hw in level_shapes]
        if sum(h * w for h, w in shapes) != num_values:
            raise ValueError(f"multi_scale_deformable_attention: value has {num_values} positions but level_shapes "
                             f"{shapes} sum to {sum(h * w for h, w in shapes)}")
        return shapes
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    sizes = [h * w for h, w in shapes]
    if sum(sizes) != num_values:
        raise ValueError(
            f"multi_scale_deformable_attention: value has {num_values} positions but spatial_shapes "
            f"{shapes} sum to {sum(sizes)}"
        )
    if level_start_index is not None:
        expected_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        if level_start_index.tolist() != expected_starts:
            raise ValueError(
                f"multi_scale_deformable_attention: level_start_index {level_start_index.tolist()} does not "
                f"match spatial_shapes {shapes} (expected {expected_starts})"
            )
    return shapes


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    level_start_index: Tensor | None = None,
    impl: str = "auto",
    level_shapes: Sequence[tuple[int, int]] | None = None,
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    value: [B, Lv, H, Dh], the L levels flattened row-major and concatenated along Lv.
    spatial_shapes: [L, 2] int64, (H_l, W_l) per level.
    sampling_locations: [B, Lq, H, L, P, 2], normalised (x, y), see the module docstring.
    attention_weights: [B, Lq, H, L, P] (normally a softmax over L*P per head).
    level_start_index: [L], optional; if given it must equal the cumulative level sizes.
    impl: one of ATTENTION_IMPLS.
    level_shapes: optional, spatial_shapes' values as Python ints (then the tensor's values are not read).
    Returns [B, Lq, H*Dh] (heads concatenated), in the promoted dtype of the three inputs.
    """
    num_values, num_levels = value.shape[1], sampling_locations.shape[3]
    shapes = _level_shapes(spatial_shapes, level_start_index, num_values, level_shapes)
    if len(shapes) != num_levels:
        raise ValueError(
            f"multi_scale_deformable_attention: spatial_shapes has {len(shapes)} levels but "
            f"sampling_locations has {num_levels}"
        )
    dtype = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype), attention_weights.dtype)
    value, sampling_locations, attention_weights = (t.to(dtype) for t in (value, sampling_locations, attention_weights))
    num_points = sampling_locations[..., 0].numel()
    if resolve_attention_impl(impl, value.device, num_points) == "sparse":
        return sparse_deformable_attention(value, shapes, sampling_locations, attention_weights)
    return grid_sample_deformable_attention(value, shapes, sampling_locations, attention_weights)


def grid_sample_deformable_attention(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                                     attention_weights: Tensor) -> Tensor:
    """The "grid_sample" implementation: arguments as multi_scale_deformable_attention's, shapes as a list of
    (H_l, W_l), one dtype."""
    batch, num_values, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    dtype = value.dtype
    n = batch * num_heads  # grid_sample batch: one map per (image, head)

    # Level-major layouts so that each level's slice is contiguous (explicitly: with one image the reshapes
    # below are strided views, and grid_sample and the weighting over them ran 2x slower); unbind (not
    # indexing) keeps the backward to one stack instead of a full-size zero tensor per level.
    # [B, Lq, H, L, P, 2] -> [L, B*H, Lq, P, 2], rescaled from [0, 1] to grid_sample's [-1, 1]
    grids = (2 * sampling_locations.to(dtype) - 1).permute(3, 0, 2, 1, 4, 5)
    grids = grids.reshape(num_levels, n, num_queries, num_points, 2).contiguous().unbind(0)
    # [B, Lq, H, L, P] -> [L, B*H, 1, Lq, P], broadcast over Dh
    weights = attention_weights.to(dtype).permute(3, 0, 2, 1, 4)
    weights = weights.reshape(num_levels, n, 1, num_queries, num_points).contiguous().unbind(0)

    value_levels = value.split([h * w for h, w in shapes], dim=1)
    out = None
    for (height, width), value_l, grid_l, weight_l in zip(shapes, value_levels, grids, weights):
        # [B, HW_l, H, Dh] -> memory [B*H, H_l, W_l, Dh], seen as [B*H, Dh, H_l, W_l] (channels
        # last): the copy moves whole Dh rows, and grid_sample then reads each corner's channels
        # contiguously (grid_sample itself ran ~1.9x faster on CPU than with channels-first).
        value_l = value_l.transpose(1, 2).reshape(n, height, width, head_dim).permute(0, 3, 1, 2)
        sampled = F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled [B*H, Dh, Lq, P] -> weighted sum over points -> [B*H, Dh, Lq]
        level_out = (sampled * weight_l).sum(-1)
        out = level_out if out is None else out + level_out
    # [B*H, Dh, Lq] -> [B, H*Dh, Lq] -> [B, Lq, H*Dh]
    return out.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


def sampling_locations_from_offsets(reference_points: Tensor, offsets: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Absolute sampling locations [B, Lq, H, L, P, 2] (normalised x, y) from predicted offsets.

    offsets: [B, Lq, H, L, P, 2], (dx, dy).
    reference_points: [B, Lq, L, 2] normalised (x, y): location = ref + offset / (W_l, H_l), so an
    offset is measured in pixels of level l.
    reference_points: [B, Lq, L, 4] normalised (cx, cy, w, h): location = ref_xy + offset / P *
    ref_wh / 2, so offsets of magnitude up to P stay inside the box.
    """
    num_points = offsets.shape[-2]
    ref = reference_points[:, :, None, :, None, :]  # [B, Lq, 1, L, 1, 2 or 4]
    if reference_points.shape[-1] == 2:
        size_wh = spatial_shapes.flip(-1).to(offsets.dtype)  # [L, 2], (W_l, H_l)
        return ref + offsets / size_wh[:, None, :]
    if reference_points.shape[-1] == 4:
        return ref[..., :2] + offsets / num_points * ref[..., 2:] * 0.5
    raise ValueError(
        f"MSDeformAttn: reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape "
        f"{tuple(reference_points.shape)}"
    )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention with its projections (encoder self-attn and decoder cross-attn).

    Submodule names follow Deformable DETR (``sampling_offsets``, ``attention_weights``,
    ``value_proj``, ``output_proj``); the optimizer keys its lr multiplier on "sampling_offsets".
    Unlike mmcv's MultiScaleDeformableAttention this module adds no residual and no dropout.
    """

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        resolve_attention_impl(impl, torch.device("cpu"))  # validates the name
        self.impl = impl
        if embed_dim % num_heads != 0:
            raise ValueError(f"MSDeformAttn: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        # Head h looks in direction 2*pi*h/H; (cos, sin) scaled so the larger component is 1, so
        # the first point lands on a neighbouring pixel; point p goes p+1 times as far.
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack((angles.cos(), angles.sin()), dim=-1)  # [H, 2]
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        bias = directions.view(self.num_heads, 1, 1, 2).expand(-1, self.num_levels, self.num_points, -1) * steps
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for proj in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(proj.weight)
            nn.init.zeros_(proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor | None = None,
        value_padding_mask: Tensor | None = None,
        level_shapes: Sequence[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Attend from queries to the multi-scale value maps.

        query: [B, Lq, C] (with positional embedding already added).
        reference_points: [B, Lq, L, 2] normalised (x, y), or [B, Lq, L, 4] normalised (cx, cy, w, h).
        value: [B, Lv, C], levels flattened and concatenated; spatial_shapes: [L, 2] (H_l, W_l);
        level_start_index: [L] optional. value_padding_mask: [B, Lv] bool, True = padding, or None.
        level_shapes: optional, spatial_shapes' values as Python ints (FlatFeatures.level_shapes).
        Returns [B, Lq, C].
        """
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if reference_points.shape[2] != levels or spatial_shapes.shape[0] != levels:
            raise ValueError(
                f"MSDeformAttn: built for {levels} levels, got reference_points {tuple(reference_points.shape)} "
                f"and spatial_shapes {tuple(spatial_shapes.shape)}"
            )

        value = self.value_proj(value)
        if value_padding_mask is not None:
            # padded positions must not leak into bilinear samples near the valid border
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, heads, self.embed_dim // heads)

        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        locations = sampling_locations_from_offsets(reference_points, offsets, spatial_shapes)

        out = multi_scale_deformable_attention(value, spatial_shapes, locations, weights, level_start_index, self.impl,
                                               level_shapes)
        return self.output_proj(out)


def use_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Set the deformable attention implementation (one of ATTENTION_IMPLS) of every MSDeformAttn in `model`."""
    resolve_attention_impl(impl, torch.device("cpu"))
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.impl = impl
    return model
