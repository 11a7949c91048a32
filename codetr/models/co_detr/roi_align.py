"""RoIAlign as two small matrix products, with the exact semantics of torchvision's / mmcv's kernel.

Why our own: on the CPU, torchvision's RoIAlign backward is a single-threaded scatter loop; for the
Faster-RCNN auxiliary head (512 RoIs per image) it took a quarter of a `co_tiny` training step.

The kernel, for one RoI (x1, y1, x2, y2) in input pixels, `spatial_scale` = 1 / stride, output S x S:
    start = (x1, y1) * spatial_scale - 0.5 (aligned=True; 0 otherwise), size = (x2 - x1, y2 - y1) * scale
    (without `aligned`, the size is at least 1); bin = size / S; per bin a grid of g_h x g_w samples,
    g = sampling_ratio if > 0 else ceil(size / S) (adaptive), sample (iy, ix) of bin (ph, pw) at
    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / g_h (likewise x), read bilinearly with the
    coordinate clamped to [0, H - 1] x [0, W - 1], or 0 when it lies outside [-1, H] x [-1, W];
    the bin's value is the sum of its samples divided by max(g_h * g_w, 1).
Everything in it is separable in y and x: bilinear weights, the outside test and the averaging. So the
output is Wy @ F @ Wx^T per channel, with Wy [S, H] holding for each output row the summed (and
averaged) interpolation weights of its samples on the map's rows, and Wx [S, W] likewise for columns.
Two matrix products replace the per-sample gathers, and autograd's backward is two more.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align as torchvision_roi_align

# Above this many cells per map the dense products cost more than the kernel's gathers (on the CPU);
# a `co_tiny` stride-8 map has about 1.2k cells, an R50 one at 800 x 1216 about 15k.
MAX_DENSE_CELLS = 4096


def roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float, sampling_ratio: int = 0,
              aligned: bool = True) -> Tensor:
    """features [B, C, H, W]; rois [K, 5] (batch index, x1, y1, x2, y2) in input pixels.

    Returns [K, C, output_size, output_size], equal to torchvision.ops.roi_align with the same arguments
    (which runs on CUDA, and on large CPU maps, where its kernel is the faster one).
    """
    height, width = features.shape[-2:]
    if features.is_cuda or height * width > MAX_DENSE_CELLS:
        return torchvision_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)
    # like torchvision's kernel under autocast: computed in the features' own precision (not bf16)
    with torch.autocast(features.device.type, enabled=False):
        return separable_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned)


def separable_roi_align(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                        sampling_ratio: int = 0, aligned: bool = True) -> Tensor:
    """RoIAlign as Wy @ F @ Wx^T (see the module docstring); any device, any map size."""
    channels, height, width = features.shape[1:]
    size = output_size
    if len(rois) == 0:
        return features.new_zeros(0, channels, size, size)
    dtype = torch.promote_types(features.dtype, torch.float32)  # bf16 would round pixel positions
    # no gradient w.r.t. the boxes, as with the kernel
    boxes = rois[:, 1:].detach().to(dtype) * spatial_scale - (0.5 if aligned else 0.0)
    start, extent = boxes[:, :2], boxes[:, 2:] - boxes[:, :2]  # (x, y) per RoI
    if not aligned:
        extent = extent.clamp(min=1.0)
    weights_x = axis_weights(start[:, 0], extent[:, 0], size, width, sampling_ratio)  # [K, S, W]
    weights_y = axis_weights(start[:, 1], extent[:, 1], size, height, sampling_ratio)  # [K, S, H]
    image = rois[:, 0].long()
    pooled_per_image, order = [], []
    for b in image.unique().tolist():
        index = (image == b).nonzero().squeeze(1)
        wx, wy = weights_x[index].to(features.dtype), weights_y[index].to(features.dtype)
        count = len(index)
        # rows first, as one matrix product: [K_b * S, H] @ [H, C * W] -> [K_b, S, C, W]
        rows = (wy.reshape(count * size, height) @ features[b].transpose(0, 1).reshape(height, channels * width))
        # then columns, per RoI: [K_b, S * C, W] @ [K_b, W, S] -> [K_b, S, C, S] -> [K_b, C, S, S]
        pooled = torch.bmm(rows.view(count, size * channels, width), wx.transpose(1, 2))
        pooled_per_image.append(pooled.view(count, size, channels, size).transpose(1, 2))
        order.append(index)
    pooled = torch.cat(pooled_per_image)
    if bool((image[1:] >= image[:-1]).all()):  # RoIs already grouped by image (the heads' order)
        return pooled
    # back to the RoIs' order; index_copy's backward is a gather (indexing's would be a scatter)
    return pooled.new_empty(pooled.shape).index_copy(0, torch.cat(order), pooled)


def axis_weights(start: Tensor, extent: Tensor, size: int, length: int, sampling_ratio: int) -> Tensor:
    """Per RoI the [size, length] matrix of summed bilinear weights of each output bin's samples along
    one axis (rows or columns of a map with `length` cells), divided by the number of samples.

    start, extent [K] in map pixels (RoI start and size after the half-pixel shift).
    """
    bin_size = extent / size
    if sampling_ratio > 0:
        samples = torch.full_like(extent, sampling_ratio, dtype=torch.long)
    else:
        samples = torch.ceil(extent / size).long().clamp(min=0)  # ceil(roi / S): adaptive
    most = max(int(samples.max()), 1)
    p = torch.arange(size, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(most, device=start.device, dtype=start.dtype)[None, None, :]
    per_sample = (bin_size / samples.clamp(min=1))[:, None, None]
    coord = start[:, None, None] + p * bin_size[:, None, None] + (i + 0.5) * per_sample  # [K, S, most]
    used = (i < samples[:, None, None]) & (coord >= -1.0) & (coord <= length)
    coord = coord.clamp(0, length - 1)
    low = coord.floor().clamp(max=length - 1)
    frac = coord - low
    high = (low + 1).clamp(max=length - 1)
    share = used.to(start.dtype) / samples.clamp(min=1)[:, None, None]
    weights = start.new_zeros(len(start), size, length)
    weights.scatter_add_(2, low.long(), (1 - frac) * share)
    weights.scatter_add_(2, high.long(), frac * share)
    return weights
