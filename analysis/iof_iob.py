"""IoF-IoB curves: how well a per-pixel map separates the objects (foreground) from the background.

Encoder variant, the paper's feature discriminability: per encoder level j
(strides 8..64), F_j = L2 norm over channels of the encoder output (the transformer memory cut back
into its levels), divided by its per-image max over the valid (unpadded) cells, resized bilinearly to
the image; D = mean over levels, in [0, 1]. A level's cell (i, j) covers the pixels [i s, (i + 1) s) x
[j s, (j + 1) s) at stride s, so the valid cells are resized to (h_l s, w_l s) and cropped to the image:
the last row and column of cells may overhang it (ceil(h / s) cells), and are not squeezed onto it.

Decoder variant (the paper's Fig. 2 and Sec. 3.4 also draw IoF-IoB curves of the decoder's attention,
without saying how attention becomes a map; this construction is ours): where the one-to-one decoder
looks. The last decoder
layer's deformable cross-attention reads each sampling point bilinearly from up to 4 encoder tokens;
we spread each point's attention weight onto those tokens with exactly the bilinear weights
`grid_sample` uses (so a token gets the share of attention it contributes to the output), for the
`top_queries` highest-scoring queries, each weighted by its score (max sigmoid class probability).
Per level the token mass becomes a density (mass / cell area in pixels), is resized to the image and
summed over levels; D = that density divided by its per-image max. Mass that falls on padding is dropped
(padded values are zeroed by the model, so they contribute nothing).

Curves: foreground = union of the ground-truth boxes (pixel centres inside a box). For thresholds S
in [0, 1]: IoF(S) = sum(1[D > S] * fg) / sum(fg), IoB(S) = sum(1[D > S] * bg) / sum(bg): the ROC curve
of D as a foreground detector, so AUC = 0.5 is chance and 1 is perfect. The AUC is the trapezoid
over IoB in [0, 1], the curve closed by (0, 0) (S above every value) and (1, 1) (S below every value).

Aggregation over images, both computed, one chosen for plots and printed tables (`aggregate`):
  "pooled":    pixel counts summed over all images, then divided (large images weigh more);
  "per_image": IoF / IoB per image, then averaged over the images that have both foreground and
               background pixels (every image weighs the same).
Maps are computed at the network input's resolution (the test-time resized image, unpadded).
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import Tensor, nn

from analysis.eval_subset import check_num_images, first_val_images, gt_boxes_xyxy_abs, image_sizes_from_masks
from analysis.labels import checkpoint_labels
from codetr.data.collate import Batch
from codetr.errors import CheckpointError, ConfigError
from codetr.io import atomic_write_json, atomic_write_text
from codetr.models.ms_deform_attn import MSDeformAttn, sampling_locations_from_offsets

VARIANTS = ("encoder", "decoder")
AGGREGATES = ("pooled", "per_image")
DEFAULT_NUM_THRESHOLDS = 101  # thresholds reported per curve
DEFAULT_BINS = 100_000  # fine thresholds k / bins for the counts and the AUC
_NORM_EPS = 1e-12  # a map that is zero everywhere stays zero instead of dividing by 0


# -- the maps ------------------------------------------------------------------------------------


def _resize(grid: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """[h', w'] -> [h, w] bilinear (align_corners=False: cell centres at (i + 0.5) * h / h')."""
    return F.interpolate(grid[None, None], size=size_hw, mode="bilinear", align_corners=False)[0, 0]


def level_strides(num_levels: int) -> tuple[int, ...]:
    """The default encoder levels' strides in input pixels: 8, 16, 32, 64 (C3..C5 and the neck's extra level);
    a model's own are in FlatFeatures.strides (4..64 for DINO's 5 levels)."""
    return tuple(8 * 2**level for level in range(num_levels))


def _level_to_image(grid: Tensor, stride: int, size_hw: tuple[int, int]) -> Tensor:
    """A level's valid cells [h_l, w_l] at `stride` -> [h, w] image pixels: bilinear to (h_l s, w_l s),
    then cropped to the image (cells beyond it are the overhang of ceil(h / s) cells)."""
    height, width = size_hw
    full = _resize(grid, (max(grid.shape[0] * stride, height), max(grid.shape[1] * stride, width)))
    return full[:height, :width]


def _level_grids(flat: Tensor, spatial_shapes: Tensor, padding_mask: Tensor) -> list[Tensor]:
    """flat [S] per-token values, padding_mask [S] (True = pad) -> per level the valid cells [h_l, w_l]."""
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    sizes = [h * w for h, w in shapes]
    grids = []
    for (height, width), values, mask in zip(shapes, flat.split(sizes), padding_mask.split(sizes)):
        valid_h, valid_w = image_sizes_from_masks(mask.view(1, height, width))[0].tolist()
        if valid_h == 0 or valid_w == 0:
            raise ValueError(f"a {height}x{width} level has no valid (unpadded) cell")
        grids.append(values.view(height, width)[:valid_h, :valid_w])
    return grids


def encoder_discriminability(memory: Tensor, spatial_shapes: Tensor, padding_mask: Tensor,
                             image_sizes: Tensor, strides: Sequence[int] | None = None) -> list[Tensor]:
    """The paper's feature discriminability map D per image.

    memory [B, S, C] encoder output (levels flattened row-major and concatenated, see FlatFeatures);
    spatial_shapes [L, 2] (H_l, W_l); padding_mask [B, S] True = padding; image_sizes [B, 2] (h, w)
    valid size in input pixels; strides: per level, default level_strides(L). Returns B maps [h_i, w_i]
    float32 in [0, 1].
    """
    strides = strides or level_strides(len(spatial_shapes))
    norms = memory.float().norm(dim=-1)  # [B, S]: L2 over channels
    maps = []
    for image, (height, width) in enumerate(image_sizes.tolist()):
        levels = []
        for grid, stride in zip(_level_grids(norms[image], spatial_shapes, padding_mask[image]), strides):
            levels.append(_level_to_image(grid / grid.max().clamp_min(_NORM_EPS), stride, (height, width)))
        maps.append(torch.stack(levels).mean(0))
    return maps


def bilinear_splat(locations: Tensor, weights: Tensor, height: int, width: int) -> Tensor:
    """Spread weights at normalised points onto the cells `grid_sample` would read them from.

    locations [N, 2] (x, y) in [0, 1] of an H x W map, cell (i, j) centred at ((j + 0.5) / W,
    (i + 0.5) / H) (grid_sample, align_corners=False); weights [N]. Returns [H, W]: each cell gets
    sum_n weights[n] * its bilinear coefficient for point n; corners outside the map are dropped
    (grid_sample reads zeros there).
    """
    px = locations[:, 0].float() * width - 0.5
    py = locations[:, 1].float() * height - 0.5
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    mass = torch.zeros(height * width, dtype=torch.float32, device=locations.device)
    for dx, dy, coeff in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        cx, cy = (x0 + dx).long(), (y0 + dy).long()
        inside = (cx >= 0) & (cx < width) & (cy >= 0) & (cy < height)
        mass.index_add_(0, (cy * width + cx)[inside], (weights.float() * coeff)[inside])
    return mass.view(height, width)


def attention_token_mass(locations: Tensor, weights: Tensor, spatial_shapes: Tensor) -> Tensor:
    """Attention mass per encoder token, summed over queries, heads and points.

    locations [Q, M, L, P, 2] normalised (x, y) per level (MSDeformAttn's sampling locations, padded-
    map coordinates); weights [Q, M, L, P]; spatial_shapes [L, 2]. Returns [S] (levels concatenated).
    """
    masses = []
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        points = locations[:, :, level].reshape(-1, 2)
        masses.append(bilinear_splat(points, weights[:, :, level].reshape(-1), int(height), int(width)).flatten())
    return torch.cat(masses)


def attention_density(token_mass: Tensor, spatial_shapes: Tensor, padding_mask: Tensor,
                      image_size: tuple[int, int], strides: Sequence[int] | None = None) -> Tensor:
    """token_mass [S], padding_mask [S] True = pad -> D [h, w] in [0, 1]: the attention density per
    pixel (mass / cell area, resized and summed over levels), divided by its max. strides: per level,
    default level_strides(L)."""
    height, width = image_size
    density = torch.zeros(height, width, dtype=torch.float32, device=token_mass.device)
    strides = strides or level_strides(len(spatial_shapes))
    for grid, stride in zip(_level_grids(token_mass.float(), spatial_shapes, padding_mask), strides):
        density += _level_to_image(grid / stride**2, stride, (height, width))  # mass per pixel of the cell
    return density / density.max().clamp_min(_NORM_EPS)


def decoder_attention_maps(locations: Tensor, weights: Tensor, query_scores: Tensor, top_queries: int,
                           spatial_shapes: Tensor, padding_mask: Tensor, image_sizes: Tensor,
                           strides: Sequence[int] | None = None) -> list[Tensor]:
    """The decoder variant of D per image.

    locations [B, Q, M, L, P, 2], weights [B, Q, M, L, P]: the last decoder layer's cross-attention;
    query_scores [B, Q] (max sigmoid class probability); the `top_queries` best queries count, each
    weighted by its score; strides: per level, default level_strides(L). Returns B maps [h_i, w_i] in [0, 1].
    """
    maps = []
    for image, (height, width) in enumerate(image_sizes.tolist()):
        scores, index = query_scores[image].float().topk(min(top_queries, query_scores.shape[1]))
        weighted = weights[image, index].float() * scores[:, None, None, None]
        mass = attention_token_mass(locations[image, index], weighted, spatial_shapes)
        maps.append(attention_density(mass, spatial_shapes, padding_mask[image], (height, width), strides))
    return maps


class CrossAttentionRecorder:
    """Context manager: records one MSDeformAttn's sampling locations and attention weights.

    A forward hook recomputes them from the module's inputs with the module's own layers (the same
    three lines as MSDeformAttn.forward), so the model code stays untouched. After a forward,
    `locations` is [B, Q, M, L, P, 2] and `weights` [B, Q, M, L, P].
    """

    def __init__(self, module: MSDeformAttn) -> None:
        self.module = module
        self.locations: Tensor | None = None
        self.weights: Tensor | None = None
        self._handle = None

    def _hook(self, module: MSDeformAttn, inputs: tuple, output: Tensor) -> None:
        query, reference_points, _, spatial_shapes = inputs[:4]
        batch, num_queries, _ = query.shape
        heads, levels, points = module.num_heads, module.num_levels, module.num_points
        offsets = module.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = module.attention_weights(query).view(batch, num_queries, heads, levels * points).softmax(-1)
        self.weights = weights.view(batch, num_queries, heads, levels, points).detach()
        self.locations = sampling_locations_from_offsets(reference_points, offsets, spatial_shapes).detach()

    def __enter__(self) -> "CrossAttentionRecorder":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


@torch.no_grad()
def image_maps(model: nn.Module, batch: Batch, variants: Sequence[str] = VARIANTS,
               top_queries: int = 10) -> dict[str, list[Tensor]]:
    """Each variant's map D for every image of one batch: {variant: B maps [h_i, w_i] float32 in [0, 1]}.

    model: a DeformableDETR (or subclass), on the batch's device (call .eval() first; float32);
    batch: a Batch with images [B, 3, H, W] and masks [B, H, W] (True = pad). (h_i, w_i) is image i's
    unpadded input size (image_sizes_from_masks(batch.masks)). The decoder maps use the `top_queries`
    best-scoring queries of each image (see decoder_attention_maps). Keys follow `variants`' order.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}: expected some of {list(VARIANTS)}")
    with CrossAttentionRecorder(model.transformer.decoder.layers[-1].cross_attn) as recorder:
        out = model(batch.images, batch.masks)
    sizes = image_sizes_from_masks(batch.masks)
    shapes, padding = out.feats.spatial_shapes, out.feats.padding_mask
    maps = {}
    for variant in variants:
        if variant == "encoder":
            maps[variant] = encoder_discriminability(out.memory, shapes, padding, sizes, out.feats.strides)
        else:
            scores = out.pred_logits.float().sigmoid().amax(-1)  # [B, Q]
            maps[variant] = decoder_attention_maps(recorder.locations, recorder.weights, scores, top_queries,
                                                   shapes, padding, sizes, out.feats.strides)
    return maps


# -- the curves ----------------------------------------------------------------------------------


def foreground_mask(boxes_xyxy_abs: Tensor, height: int, width: int) -> Tensor:
    """[h, w] bool: pixels whose centre (j + 0.5, i + 0.5) lies in some box, x1 <= x < x2, y1 <= y < y2.

    boxes_xyxy_abs [N, 4] in pixels of the image (N may be 0: no foreground).
    """
    device = boxes_xyxy_abs.device
    xs = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    for x1, y1, x2, y2 in boxes_xyxy_abs.float().tolist():
        mask |= ((ys >= y1) & (ys < y2))[:, None] & ((xs >= x1) & (xs < x2))[None, :]
    return mask


def count_above(values: Tensor, thresholds: Tensor) -> Tensor:
    """values [N], thresholds [T] -> [T] float64: how many values are > each threshold (exact)."""
    ordered = values.flatten().double().sort().values
    at_most = torch.searchsorted(ordered, thresholds.to(ordered.device, torch.float64), right=True)
    return (ordered.numel() - at_most).double().cpu()


def threshold_counts(score_map: Tensor, fg_mask: Tensor, thresholds: Tensor) -> tuple[Tensor, int, Tensor, int]:
    """score_map [h, w], fg_mask [h, w] bool -> (foreground pixels above each threshold [T], foreground
    pixels, background pixels above each threshold [T], background pixels)."""
    if score_map.shape != fg_mask.shape:
        raise ValueError(f"score map {tuple(score_map.shape)} and foreground mask {tuple(fg_mask.shape)} differ")
    fg_values, bg_values = score_map[fg_mask], score_map[~fg_mask]
    return count_above(fg_values, thresholds), fg_values.numel(), count_above(bg_values, thresholds), bg_values.numel()


def iof_iob(score_map: Tensor, fg_mask: Tensor, thresholds: Tensor) -> tuple[Tensor, Tensor]:
    """One image's curve: (IoF [T], IoB [T]) float64; NaN where the image has no fg (or no bg) pixel."""
    fg_above, fg_total, bg_above, bg_total = threshold_counts(score_map, fg_mask, thresholds)
    nan = float("nan")
    return (fg_above / fg_total if fg_total else torch.full_like(fg_above, nan),
            bg_above / bg_total if bg_total else torch.full_like(bg_above, nan))


def curve_auc(iob: Sequence[float] | Tensor, iof: Sequence[float] | Tensor) -> float:
    """Area under IoF(IoB) by the trapezoid rule over IoB in [0, 1], the curve closed by (0, 0) and
    (1, 1); points are ordered by IoB, then IoF (a vertical run is a zero-width step)."""
    points = sorted(zip([0.0, *map(float, iob), 1.0], [0.0, *map(float, iof), 1.0]))
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))


THRESHOLD_SPACINGS = ("quantile", "uniform")


class CurveAccumulator:
    """Both aggregations of IoF / IoB over images, at the fine thresholds S_k = k / bins, k = 0..bins.

    Each image's map is histogrammed by ceil(D * bins) (bin 0 holds D <= 0, bin j holds
    (j - 1) / bins < D <= j / bins), so "D > S_k" is exactly "bin > k": the counts are exact at every
    S_k, and the AUC uses all bins + 1 of them. Why so fine: the encoder output is post-LayerNorm, so
    its per-token norms vary by ~1 % and the paper's D lies in about [0.99, 1] on our models; a coarse
    sweep of S over [0, 1] would see one step.
    """

    def __init__(self, bins: int = DEFAULT_BINS) -> None:
        if bins < 1:
            raise ValueError(f"CurveAccumulator: bins must be >= 1, got {bins}")
        self.bins = bins
        self.fg_hist = torch.zeros(bins + 1, dtype=torch.float64)  # pooled pixel counts per bin
        self.bg_hist = torch.zeros(bins + 1, dtype=torch.float64)
        self.iof_sum = torch.zeros(bins + 1, dtype=torch.float64)  # per-image ratios at each S_k, summed
        self.iob_sum = torch.zeros(bins + 1, dtype=torch.float64)
        self.images = 0
        self.images_with_fg_and_bg = 0

    @property
    def thresholds(self) -> Tensor:
        """[bins + 1] float64: S_k = k / bins."""
        return torch.arange(self.bins + 1, dtype=torch.float64) / self.bins

    def _histogram(self, values: Tensor) -> Tensor:
        index = torch.ceil(values.double() * self.bins).clamp(0, self.bins).long()
        return torch.bincount(index, minlength=self.bins + 1).double().cpu()

    @staticmethod
    def _above(hist: Tensor) -> Tensor:
        """[bins + 1] counts per bin -> [bins + 1] how many lie in a bin > k."""
        return hist.sum() - hist.cumsum(0)

    def add(self, score_map: Tensor, fg_mask: Tensor) -> None:
        """score_map [h, w] in [0, 1], fg_mask [h, w] bool."""
        if score_map.shape != fg_mask.shape:
            raise ValueError(f"score map {tuple(score_map.shape)} and foreground mask {tuple(fg_mask.shape)} differ")
        fg_hist, bg_hist = self._histogram(score_map[fg_mask]), self._histogram(score_map[~fg_mask])
        self.fg_hist += fg_hist
        self.bg_hist += bg_hist
        self.images += 1
        fg_total, bg_total = float(fg_hist.sum()), float(bg_hist.sum())
        if fg_total and bg_total:
            self.iof_sum += self._above(fg_hist) / fg_total
            self.iob_sum += self._above(bg_hist) / bg_total
            self.images_with_fg_and_bg += 1

    def curve(self, aggregate: str) -> tuple[Tensor, Tensor]:
        """(IoF, IoB), each [bins + 1] at S_k, pooled or averaged per image."""
        if aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate={aggregate!r}: expected one of {', '.join(AGGREGATES)}")
        if self.images_with_fg_and_bg == 0:
            raise ValueError("no image had both foreground and background pixels")
        if aggregate == "pooled":
            return self._above(self.fg_hist) / self.fg_hist.sum(), self._above(self.bg_hist) / self.bg_hist.sum()
        return self.iof_sum / self.images_with_fg_and_bg, self.iob_sum / self.images_with_fg_and_bg

    def display_indices(self, count: int, spacing: str = "quantile") -> Tensor:
        """Indices k of about `count` thresholds S_k to report, always with S = 0 and S = 1.

        "uniform": S evenly spaced over [0, 1] (the paper's sweep); "quantile": S at evenly spaced
        quantiles of all pixels' D (pooled), so the points spread along the curve whatever D's range.
        """
        if count < 2:
            raise ConfigError(f"--thresholds={count}: expected at least 2")
        if spacing not in THRESHOLD_SPACINGS:
            raise ConfigError(f"--spacing={spacing!r}: expected one of {', '.join(THRESHOLD_SPACINGS)}")
        if spacing == "uniform":
            chosen = torch.round(torch.linspace(0, 1, count, dtype=torch.float64) * self.bins).long()
        else:
            cdf = (self.fg_hist + self.bg_hist).cumsum(0)
            levels = torch.linspace(0, 1, count, dtype=torch.float64) * cdf[-1]
            chosen = torch.searchsorted(cdf, levels).clamp(max=self.bins)
        ends = torch.tensor([0, self.bins])
        return torch.unique(torch.cat((chosen, ends)))  # sorted


# -- running it on checkpoints --------------------------------------------------------------------


@dataclass
class Curve:
    iof: list[float]
    iob: list[float]
    auc: float


@dataclass
class IoFIoBResult:
    """One checkpoint's curves for one variant, both aggregations."""

    checkpoint: str  # a short label (unique among the checkpoints of one run)
    path: str
    variant: str  # "encoder" or "decoder"
    thresholds: list[float]
    curves: dict[str, Curve]  # by aggregate: "pooled", "per_image"
    num_images: int
    images_with_fg_and_bg: int


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)


@torch.no_grad()
def accumulate_curves(model: nn.Module, loader, device: torch.device, variants: Sequence[str] = VARIANTS,
                      top_queries: int = 10, bins: int = DEFAULT_BINS,
                      on_batch: Callable[[int], None] | None = None) -> dict[str, CurveAccumulator]:
    """Run the one-to-one detector (float32, eval mode) over `loader` (Batches) and accumulate each
    variant's counts. model: a DeformableDETR (or subclass); on_batch(num_images) after each batch."""
    accumulators = {variant: CurveAccumulator(bins) for variant in variants}
    model.eval()
    for batch in loader:
        batch = batch.to(device)
        maps = image_maps(model, batch, variants, top_queries)
        sizes = image_sizes_from_masks(batch.masks)
        for image, boxes in enumerate(gt_boxes_xyxy_abs(batch.targets, sizes)):
            height, width = sizes[image].tolist()
            fg = foreground_mask(boxes, height, width)
            for variant, per_image in maps.items():
                accumulators[variant].add(per_image[image], fg)
        if on_batch is not None:
            on_batch(len(batch))
    return accumulators


def run_iof_iob(ckpts: Sequence[Path], data: Path | None = None, num_images: int = 64,
                device: str | torch.device = "cpu", variants: Sequence[str] = VARIANTS, top_queries: int = 10,
                num_thresholds: int = DEFAULT_NUM_THRESHOLDS, spacing: str = "quantile", bins: int = DEFAULT_BINS,
                progress: bool = True, labels: Sequence[str] | None = None) -> list[IoFIoBResult]:
    """IoF-IoB curves of each checkpoint on the first `num_images` validation images of its data
    (or of `data`, a COCO-layout folder). The EMA weights are used when the checkpoint has them.

    Each curve is reported at about `num_thresholds` thresholds (`spacing`, see
    CurveAccumulator.display_indices); its AUC uses all bins + 1 fine thresholds. `labels` name the
    checkpoints in the results (legends, CSV rows; e.g. a grid's point labels), one each and distinct;
    default: their shortest unique path suffixes (analysis.labels.checkpoint_labels).
    """
    from codetr.config import apply_overrides
    from codetr.engine.inference import load_detector

    check_num_images(num_images)
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ConfigError(f"--variant {', '.join(bad) or '(none)'}: expected one or more of {', '.join(VARIANTS)}")
    if top_queries < 1:
        raise ConfigError(f"--top-queries={top_queries}: expected at least 1")
    missing = [str(p) for p in ckpts if not Path(p).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint not found: {', '.join(missing)}")
    if num_thresholds < 2:
        raise ConfigError(f"--thresholds={num_thresholds}: expected at least 2")
    if spacing not in THRESHOLD_SPACINGS:
        raise ConfigError(f"--spacing={spacing!r}: expected one of {', '.join(THRESHOLD_SPACINGS)}")
    labels = checkpoint_labels(ckpts) if labels is None else list(labels)
    if len(labels) != len(ckpts) or len(set(labels)) != len(labels):
        raise ConfigError(f"labels {labels}: expected {len(ckpts)} distinct names, one per checkpoint")
    device = torch.device(device)
    results = []
    with _progress(progress) as bar:
        for label, path in zip(labels, ckpts):
            detector = load_detector(path, device, use_ema=True, deploy=True)
            data_cfg = apply_overrides(detector.cfg, [f"data.root={data}"] if data is not None else []).data
            loader, _, count = first_val_images(data_cfg, num_images)
            task = bar.add_task(label, total=count)
            accumulators = accumulate_curves(detector.model, loader, device, variants, top_queries, bins,
                                             on_batch=lambda n: bar.advance(task, n))
            for variant, acc in accumulators.items():
                shown = acc.display_indices(num_thresholds, spacing)
                curves = {}
                for aggregate in AGGREGATES:
                    iof, iob = acc.curve(aggregate)
                    curves[aggregate] = Curve(iof[shown].tolist(), iob[shown].tolist(), curve_auc(iob, iof))
                results.append(IoFIoBResult(label, str(path), variant, acc.thresholds[shown].tolist(), curves,
                                            acc.images, acc.images_with_fg_and_bg))
    return results


# -- writing ---------------------------------------------------------------------------------------


def _csv_text(header: Sequence[str], rows: list[Sequence]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_iof_iob(out_dir: Path, results: list[IoFIoBResult], aggregate: str = "pooled") -> dict[str, Path]:
    """Atomically write curves.csv (every threshold of every curve), auc.csv, iof_iob.json (all of it)
    and iof_iob.png (the `aggregate` curves, one per checkpoint). Returns {kind: path}."""
    from analysis.figures import save_figure
    from analysis.iof_iob_plots import plot_iof_iob

    if aggregate not in AGGREGATES:
        raise ConfigError(f"--aggregate={aggregate!r}: expected one of {', '.join(AGGREGATES)}")
    out_dir = Path(out_dir)
    curve_rows, auc_rows = [], []
    for r in results:
        for agg, curve in r.curves.items():
            curve_rows += [(r.checkpoint, r.variant, agg, f"{s:.6g}", f"{f:.6f}", f"{b:.6f}")
                           for s, f, b in zip(r.thresholds, curve.iof, curve.iob)]
            auc_rows.append((r.checkpoint, r.variant, agg, f"{curve.auc:.6f}", r.num_images, r.images_with_fg_and_bg,
                             r.path))
    paths = {"curves": out_dir / "curves.csv", "auc": out_dir / "auc.csv", "json": out_dir / "iof_iob.json",
             "png": out_dir / "iof_iob.png"}
    curve_header = ("checkpoint", "variant", "aggregate", "threshold", "iof", "iob")
    atomic_write_text(paths["curves"], _csv_text(curve_header, curve_rows))
    atomic_write_text(paths["auc"], _csv_text(("checkpoint", "variant", "aggregate", "auc", "images",
                                               "images_with_fg_and_bg", "path"), auc_rows))
    atomic_write_json(paths["json"], {"aggregate_plotted": aggregate, "results": [asdict(r) for r in results]})
    save_figure(plot_iof_iob(results, aggregate), paths["png"], dpi=120)
    return paths
