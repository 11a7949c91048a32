"""Multi-scale deformable attention as one sparse matrix product, with a hand-written backward.

Every (image, query, head) reads L levels x P points x 4 bilinear corners = K values of its head. Written
as a matrix, the attention is out = A @ V with

    V: [B * Lv * H, Dh]  the value tensor [B, Lv, H, Dh] as it is laid out (no copy),
    A: [B * Lq * H, B * Lv * H], K non-zeros per row: attention weight x bilinear corner weight,
    out: [B * Lq * H, Dh]  = the result [B, Lq, H * Dh] as it is laid out.

A is a CSR matrix with exactly K entries per row, so torch's sparse kernels (MKL on CPU, cuSPARSE on CUDA)
do the gathering in one call instead of L grid_sample calls, each followed by a weighting pass over an
[B * H, Dh, Lq, P] tensor that autograd keeps alive for backward. The backward needs three things:
  - dL/dA at A's non-zeros: <G_row, V_col>, a sampled dense-dense product (``torch.sparse.sampled_addmm``),
    from which the chain rule gives the attention weights' and the sampling locations' gradients;
  - dL/dV = A^T @ G: A's entries re-sorted by the pixel they read (a CSR of A^T), then one more sparse product
    (``value_gradient``: the sort runs over the points' top-left corners only).
Only the inputs are kept for backward; the corner indices and weights are recomputed there.

The numbers equal ``F.grid_sample(..., mode="bilinear", padding_mode="zeros", align_corners=False)``'s
(see ``ms_deform_attn.py``): pixel (i, j) has its centre at ((j + 0.5) / W, (i + 0.5) / H), corners
outside the map read zero and carry no gradient.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

CORNERS = 4  # bilinear interpolation reads the four pixels around a sampling point

# torch's CSR tensors are stable for what is used here (construction, CSR @ dense, sampled_addmm).
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass
class BilinearTaps:
    """Where each sampling point reads and with what weight; all [B, Lq, H, L, P] unless stated."""

    columns: Tensor  # [B, Lq, H, L, P, 4] int32: row of V (= (b * Lv + pixel) * H + h) per corner
    x_weights: tuple[Tensor, Tensor]  # (1 - fx, fx), zeroed where that corner column is off the map
    y_weights: tuple[Tensor, Tensor]  # (1 - fy, fy), zeroed where that corner row is off the map
    x_valid: tuple[Tensor, Tensor]  # bool: corner column x0 / x0 + 1 on the map
    y_valid: tuple[Tensor, Tensor]  # bool: corner row y0 / y0 + 1 on the map
    x0: Tensor  # float: the top-left corner's pixel column (floor of x), unclamped
    y0: Tensor  # float: its pixel row


def bilinear_taps(locations: Tensor, shapes: list[tuple[int, int]], num_values: int) -> BilinearTaps:
    """Corner rows of V and separable bilinear weights for every sampling point.

    locations: [B, Lq, H, L, P, 2] normalised (x, y); shapes: (H_l, W_l) per level; num_values: Lv.
    """
    batch, num_queries, heads, levels, points, _ = locations.shape
    device, dtype = locations.device, locations.dtype
    widths = torch.tensor([w for _, w in shapes], device=device, dtype=dtype).view(levels, 1)
    heights = torch.tensor([h for h, _ in shapes], device=device, dtype=dtype).view(levels, 1)
    zero = torch.zeros((), device=device, dtype=dtype)

    # Pixel coordinates with pixel centres on integers (align_corners=False), rounded exactly as grid_sample on
    # the CPU computes them (grid = 2 * loc - 1, then (grid + 1) * size / 2 - 0.5): at a point exactly on a pixel
    # centre the corner pair, and so the one-sided location gradient, is then the same as grid_sample's.
    grid = 2 * locations - 1
    x = (grid[..., 0] + 1) * (widths / 2) - 0.5
    y = (grid[..., 1] + 1) * (heights / 2) - 0.5
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    # A corner is on the map where clamping leaves it unchanged; the clamped value is its index, and an
    # off-map corner's (unused: its weight is 0) index stays inside V.
    x_index = (x0.clamp(zero, widths - 1), (x0 + 1).clamp(zero, widths - 1))
    y_index = (y0.clamp(zero, heights - 1), (y0 + 1).clamp(zero, heights - 1))
    x_valid = (x_index[0] == x0, x_index[1] == x0 + 1)
    y_valid = (y_index[0] == y0, y_index[1] == y0 + 1)
    x_weights = ((1 - fx) * x_valid[0], fx * x_valid[1])
    y_weights = ((1 - fy) * y_valid[0], fy * y_valid[1])

    # V's row of pixel (row, col) of level l in image b, head h: (b * Lv + start_l + row * W_l + col) * H + h
    sizes = [h * w for h, w in shapes]
    starts = torch.tensor([sum(sizes[:level]) for level in range(levels)], device=device, dtype=torch.int32)
    image = torch.arange(batch, device=device, dtype=torch.int32).view(batch, 1, 1, 1, 1) * num_values
    head = torch.arange(heads, device=device, dtype=torch.int32).view(1, 1, heads, 1, 1)
    base = (image + starts.view(levels, 1)) * heads + head  # [B, 1, H, L, 1]
    row_stride = torch.tensor([w * heads for _, w in shapes], device=device, dtype=torch.int32).view(levels, 1)
    rows = [y_index[j].int() * row_stride + base for j in (0, 1)]
    cols = [x_index[i].int() * heads for i in (0, 1)]
    columns = torch.empty((batch, num_queries, heads, levels, points, CORNERS), device=device, dtype=torch.int32)
    for corner, (j, i) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        torch.add(rows[j], cols[i], out=columns[..., corner])
    return BilinearTaps(columns, x_weights, y_weights, x_valid, y_valid, x0, y0)


def corner_coefficients(taps: BilinearTaps, attention_weights: Tensor) -> Tensor:
    """A's non-zeros: attention weight x bilinear weight per corner, [B, Lq, H, L, P, 4] in corner order
    (x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)."""
    (wx0, wx1), (wy0, wy1) = taps.x_weights, taps.y_weights
    top, bottom = attention_weights * wy0, attention_weights * wy1
    coefficients = attention_weights.new_empty(taps.columns.shape)
    for corner, (row, column) in enumerate(((top, wx0), (top, wx1), (bottom, wx0), (bottom, wx1))):
        torch.mul(row, column, out=coefficients[..., corner])
    return coefficients


def csr(columns: Tensor, values: Tensor, num_rows: int, num_columns: int) -> Tensor:
    """A CSR matrix with the same number of entries (the last dimension of `columns`) in every row."""
    per_row = columns.shape[-1]
    rows = torch.arange(0, num_rows * per_row + 1, per_row, device=columns.device, dtype=torch.int32)
    return torch.sparse_csr_tensor(rows, columns.reshape(-1), values.reshape(-1), (num_rows, num_columns),
                                   check_invariants=False)


def value_gradient(taps: BilinearTaps, coefficients: Tensor, grad_rows: Tensor, shapes: list[tuple[int, int]],
                   num_values: int) -> Tensor:
    """dL/dV = A^T @ G, [B, Lv, H, Dh], from grad_rows G [B * Lq * H, Dh].

    A^T in CSR form needs A's entries sorted by the pixel they read. Sorting the L * P points by their top-left
    corner is enough (4x fewer keys than the entries): the other three corners are the same pixel shifted by one
    column and / or row. Each corner's products are gathered in a map one pixel larger on the top and left (a
    top-left corner lies in [-1, W_l - 1] x [-1, H_l - 1] whenever any corner is on the map), then shifted into
    place; corners off the map have weight 0, so where their padded index lands does not matter.
    """
    batch, num_queries, heads, levels, points, _ = taps.columns.shape
    device = grad_rows.device
    padded_sizes = [(h + 1) * (w + 1) for h, w in shapes]
    padded_starts = [sum(padded_sizes[:level]) for level in range(levels)]
    padded_len = sum(padded_sizes)
    num_padded_rows = batch * padded_len * heads

    # Top-left corner's row in the padded value layout: ((b * Lp + start_l + (y0 + 1) * (W_l + 1) + x0 + 1) * H + h
    widths = torch.tensor([w for _, w in shapes], device=device, dtype=taps.x0.dtype).view(levels, 1)
    heights = torch.tensor([h for h, _ in shapes], device=device, dtype=taps.x0.dtype).view(levels, 1)
    zero_or_less = torch.full((), -1.0, device=device, dtype=taps.x0.dtype)
    px = (taps.x0.clamp(zero_or_less, widths - 1) + 1).int()
    py = (taps.y0.clamp(zero_or_less, heights - 1) + 1).int()
    image = torch.arange(batch, device=device, dtype=torch.int32).view(batch, 1, 1, 1, 1) * padded_len
    starts = torch.tensor(padded_starts, device=device, dtype=torch.int32).view(levels, 1)
    head = torch.arange(heads, device=device, dtype=torch.int32).view(1, 1, heads, 1, 1)
    row_stride = torch.tensor([(w + 1) * heads for _, w in shapes], device=device, dtype=torch.int32).view(levels, 1)
    keys = (py * row_stride + ((image + starts) * heads + head) + px * heads).reshape(-1)

    # One CSR with the four corners' blocks stacked: [4 * padded rows, B * Lq * H]; block k holds corner k's weights
    order = keys.argsort()
    counts = torch.bincount(keys, minlength=num_padded_rows)
    crow_block = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    num_points = keys.numel()
    crow = torch.cat([crow_block[:-1] + k * num_points for k in range(CORNERS)]
                     + [crow_block.new_full((1,), CORNERS * num_points)]).int()
    points_per_row = levels * points
    shift = points_per_row.bit_length() - 1  # source row of each point; a shift where L * P is a power of two
    source_rows = (order >> shift if points_per_row == 1 << shift else order // points_per_row).int()
    values = coefficients.reshape(num_points, CORNERS).t()[:, order].reshape(-1)  # [4, N] -> corner blocks
    stacked = torch.sparse_csr_tensor(crow, source_rows.repeat(CORNERS), values,
                                      (CORNERS * num_padded_rows, grad_rows.shape[0]), check_invariants=False)
    padded = (stacked @ grad_rows).view(CORNERS, batch, padded_len, heads, -1)

    grad = grad_rows.new_zeros(batch, num_values, heads, grad_rows.shape[-1])
    start = 0
    for (height, width), padded_start, padded_size in zip(shapes, padded_starts, padded_sizes):
        level_grad = grad[:, start:start + height * width].view(batch, height, width, heads, -1)
        level_padded = padded[:, :, padded_start:padded_start + padded_size].view(
            CORNERS, batch, height + 1, width + 1, heads, -1)
        for corner, (dx, dy) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            # pixel (y, x) read as corner (dx, dy) by a point whose top-left corner is (y - dy, x - dx)
            level_grad += level_padded[corner, :, 1 - dy:1 - dy + height, 1 - dx:1 - dx + width]
        start += height * width
    return grad


class SparseDeformableAttention(torch.autograd.Function):
    """out [B, Lq, H * Dh] = A(locations, weights) @ value; see the module docstring."""

    @staticmethod
    def forward(ctx, value: Tensor, locations: Tensor, attention_weights: Tensor,
                shapes: list[tuple[int, int]]) -> Tensor:
        batch, num_values, heads, head_dim = value.shape
        num_queries = locations.shape[1]
        taps = bilinear_taps(locations, shapes, num_values)
        coefficients = corner_coefficients(taps, attention_weights)
        columns = taps.columns.flatten(3)  # [B, Lq, H, L * P * 4]
        matrix = csr(columns, coefficients, batch * num_queries * heads, batch * num_values * heads)
        out = matrix @ value.reshape(-1, head_dim)
        ctx.save_for_backward(value, locations, attention_weights)
        ctx.shapes = shapes
        return out.view(batch, num_queries, heads * head_dim)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, locations, attention_weights = ctx.saved_tensors
        batch, num_values, heads, head_dim = value.shape
        num_queries = locations.shape[1]
        num_rows, num_columns = batch * num_queries * heads, batch * num_values * heads
        taps = bilinear_taps(locations, ctx.shapes, num_values)
        columns = taps.columns.flatten(3)
        grad_rows = grad_out.reshape(num_rows, head_dim)
        values_flat = value.reshape(num_columns, head_dim)

        grad_value = grad_locations = grad_weights = None
        coefficients = corner_coefficients(taps, attention_weights)
        if ctx.needs_input_grad[0]:
            grad_value = value_gradient(taps, coefficients, grad_rows, ctx.shapes, num_values)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dL/dA at the non-zeros: <grad of the output row, the value row each corner reads> (beta=0: A's
            # values only give the pattern)
            pattern = csr(columns, coefficients, num_rows, num_columns)
            dots = torch.sparse.sampled_addmm(pattern, grad_rows, values_flat.t(), beta=0.0).values()
            d00, d10, d01, d11 = dots.view(*taps.columns.shape).unbind(-1)
            (wx0, wx1), (wy0, wy1) = taps.x_weights, taps.y_weights
            top = wx0 * d00 + wx1 * d10  # the top corner row, interpolated along x
            bottom = wx0 * d01 + wx1 * d11
            if ctx.needs_input_grad[2]:
                grad_weights = wy0 * top + wy1 * bottom
            if ctx.needs_input_grad[1]:
                # d(weight)/dx of the left corner is -1 and of the right +1 where on the map; x = loc * W - 0.5
                (vx0, vx1), (vy0, vy1) = taps.x_valid, taps.y_valid
                along_x = wy0 * (vx1 * d10 - vx0 * d00) + wy1 * (vx1 * d11 - vx0 * d01)
                along_y = wx0 * (vy1 * d01 - vy0 * d00) + wx1 * (vy1 * d11 - vy0 * d10)
                widths = torch.tensor([w for _, w in ctx.shapes], device=value.device, dtype=value.dtype)
                heights = torch.tensor([h for h, _ in ctx.shapes], device=value.device, dtype=value.dtype)
                grad_locations = torch.stack((along_x * widths.view(-1, 1), along_y * heights.view(-1, 1)), -1)
                grad_locations = grad_locations * attention_weights.unsqueeze(-1)
        return grad_value, grad_locations, grad_weights, None


def sparse_deformable_attention(value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """value [B, Lv, H, Dh], sampling_locations [B, Lq, H, L, P, 2], attention_weights [B, Lq, H, L, P] (one
    dtype) -> [B, Lq, H * Dh]. Sparse kernels run in float32 or float64: lower precisions are computed in
    float32 and cast back."""
    dtype = value.dtype
    compute = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    out = SparseDeformableAttention.apply(value.to(compute).contiguous(), sampling_locations.to(compute),
                                          attention_weights.to(compute), shapes)
    return out.to(dtype)
