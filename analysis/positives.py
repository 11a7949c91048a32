"""Positive-query ratio: positives of each auxiliary head's one-to-many assignment per ground-truth box.

The paper reports it on COCO as Faster-RCNN 18.7 and ATSS 8.8 (PAPER_COCO_RATIOS). The counts are those
of `AuxBranchOutput.assignment_counts()` (training logs the same numbers as `stats.<head>.positives` /
`.gts`): per image, before the positive queries' cap clamp(max positives, 9, 300). A positive is
  - ATSS, GFL, RetinaNet, PAA: an anchor assigned to a ground-truth box; FCOS: a point;
  - Faster-RCNN: a sampled RoI assigned to a ground-truth box (IoU >= 0.5, at most 128 of the 512
    sampled per image; the ground-truth boxes themselves are added to the proposals).
Two aggregations over images: sum(positives) / sum(gt boxes) ("pooled"), and the mean over the images
that have at least one box of positives_i / gt_i ("mean per image").

Which weights: ATSS, GFL, RetinaNet and FCOS assign from anchors / points and the boxes alone, so
their counts do not depend on the weights. Faster-RCNN samples its RoIs from the RPN's proposals and
PAA scores anchors with its own predictions (DEPENDS_ON_WEIGHTS): with a checkpoint they use its
(EMA, if saved) weights; without one the model is freshly initialised from the preset (seed
train.seed), and their counts then reflect untrained proposals / scores.
Images: the first N of the validation split with the test-time resize (no augmentation), so the
counts are at the test scale, not at the training scales.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from analysis.eval_subset import check_num_images, first_val_images
from codetr.errors import ConfigError, DataError
from codetr.io import atomic_write_json, atomic_write_text

PAPER_COCO_RATIOS = {"atss": 8.8, "faster_rcnn": 18.7}  # positives per GT box, COCO, as the paper reports
DEPENDS_ON_WEIGHTS = frozenset({"faster_rcnn", "paa"})


def positive_ratios(counts: Sequence[tuple[int, int]]) -> tuple[float, float]:
    """counts: per image (positives, gt boxes) -> (sum(pos) / sum(gt), mean over images with gt > 0 of
    pos / gt). NaN where no image has a ground-truth box."""
    total_pos = sum(p for p, _ in counts)
    total_gt = sum(g for _, g in counts)
    per_image = [p / g for p, g in counts if g > 0]
    pooled = total_pos / total_gt if total_gt else math.nan
    return pooled, (sum(per_image) / len(per_image) if per_image else math.nan)


@dataclass
class PositiveRatio:
    """One auxiliary head's positives per ground-truth box over a set of images."""

    head: str  # log name, e.g. "atss", "atss_2"
    kind: str  # head kind, e.g. "atss"
    images: int
    images_with_gt: int
    gts: int
    positives: int
    ratio: float  # sum(positives) / sum(gts)
    mean_image_ratio: float  # mean over images with gts of positives / gts
    depends_on_weights: bool
    paper_coco: float | None  # the paper's COCO value for this kind, if it reports one


def summarize_head(head: str, kind: str, counts: Sequence[tuple[int, int]]) -> PositiveRatio:
    """counts: per image (positives, gt boxes) of one head -> its PositiveRatio row."""
    ratio, mean_image_ratio = positive_ratios(counts)
    return PositiveRatio(head, kind, len(counts), sum(1 for _, g in counts if g > 0), sum(g for _, g in counts),
                         sum(p for p, _ in counts), ratio, mean_image_ratio, kind in DEPENDS_ON_WEIGHTS,
                         PAPER_COCO_RATIOS.get(kind))


@torch.no_grad()
def collect_assignment_counts(model: nn.Module, loader, device: torch.device,
                              on_batch: Callable[[int], None] | None = None) -> dict[str, list[tuple[int, int]]]:
    """Per auxiliary head (by log name) the per-image (positives, gt boxes) over `loader` (Batches).

    model: a CoDeformableDETR. It runs in eval mode (the heads' assignment does not depend on the
    mode; the backbone's BatchNorm is frozen anyway) and its training-only branches are called
    directly, as CoDeformableDETR.forward does in training.
    """
    model.eval()
    counts: dict[str, list[tuple[int, int]]] = {name: [] for name in model.aux.names}
    for batch in loader:
        batch = batch.to(device)
        out = model(batch.images, batch.masks)
        for branch in model.aux(out, batch.masks, batch.targets, model.transformer.decoder):
            counts[branch.name].extend(branch.assignment_counts())
        if on_batch is not None:
            on_batch(len(batch))
    return counts


@dataclass
class PositivesReport:
    source: str  # the checkpoint, or "preset P (freshly initialised)"
    trained: bool
    preset: str
    num_images: int
    heads: list[PositiveRatio]


def _model_and_loader(preset: str | None, ckpt: Path | None, data: Path | None, overrides: Sequence[str],
                      num_images: int, device: torch.device):
    """(model on `device`, loader over the first val images, their count, source text, preset name)."""
    from codetr.config import apply_overrides, get_preset
    from codetr.engine.inference import load_detector
    from codetr.models.detector import build_detector

    extra = [f"data.root={data}"] if data is not None else []
    if ckpt is not None:
        not_data = [item for item in overrides if not item.strip().startswith("data.")]
        if not_data:
            raise ConfigError(f"--set {not_data[0]}: with --ckpt the model comes from the checkpoint; "
                              "--set takes data.* keys only")
        detector = load_detector(ckpt, device, use_ema=True, deploy=False)
        if preset is not None and preset != detector.cfg.preset:
            raise ConfigError(f"--preset {preset} differs from the preset {detector.cfg.preset!r} of {ckpt}")
        if not detector.cfg.model.aux.heads:
            raise ConfigError(f"{ckpt} has no auxiliary heads (model.aux.heads=[]): no one-to-many assignment to count")
        loader, dataset, count = first_val_images(apply_overrides(detector.cfg, extra + list(overrides)).data, num_images)
        if dataset.cat_ids != detector.cat_ids:
            raise DataError(f"{dataset.ann_file}: categories {dataset.cat_ids} differ from the checkpoint's "
                            f"{detector.cat_ids}")
        return detector.model, loader, count, str(ckpt), detector.cfg.preset
    if preset is None:
        raise ConfigError("give --preset P (a freshly initialised model) or --ckpt FILE (a trained one)")
    cfg = apply_overrides(get_preset(preset), extra + list(overrides))
    if not cfg.model.aux.heads:
        raise ConfigError(f"preset {preset!r} has no auxiliary heads (model.aux.heads=[]); use a co_* preset or "
                          "--set model.aux.heads=atss,faster_rcnn")
    loader, dataset, count = first_val_images(cfg.data, num_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)  # the same initial weights as a training run of this config
        model = build_detector(cfg.model, dataset.num_classes)
    return model.to(device), loader, count, f"preset {preset} (freshly initialised)", preset


def run_positives(preset: str | None = None, ckpt: Path | None = None, data: Path | None = None,
                  num_images: int = 64, overrides: Sequence[str] = (), device: str | torch.device = "cpu",
                  seed: int = 0, progress: bool = True) -> PositivesReport:
    """Positives per GT box of every auxiliary head on the first `num_images` validation images.

    With `ckpt` the model and its data come from the checkpoint (`overrides` may set data.* keys);
    otherwise from `preset` + `overrides`, freshly initialised. `seed` fixes the random RoI sampling
    of Faster-RCNN (which RoIs are drawn; their count does not depend on it) and leaves the global RNG
    as it was.
    """
    check_num_images(num_images)
    device = torch.device(device)
    ckpt = Path(ckpt) if ckpt is not None else None
    model, loader, count, source, preset_name = _model_and_loader(preset, ckpt, data, overrides, num_images, device)
    columns = (TextColumn("positives"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=Console(stderr=True), disable=not progress)
    with bar, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        task = bar.add_task("positives", total=count)
        counts = collect_assignment_counts(model, loader, device, on_batch=lambda n: bar.advance(task, n))
    rows = [summarize_head(name, kind, counts[name]) for name, kind in zip(model.aux.names, model.aux.cfg.heads)]
    return PositivesReport(source, ckpt is not None, preset_name, count, rows)


def write_positives(out_dir: Path, report: PositivesReport) -> dict[str, Path]:
    """Atomically write positives.csv (one row per head) and positives.json (the whole report)."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    fields = list(PositiveRatio.__dataclass_fields__)
    writer.writerow(fields)
    for row in report.heads:
        writer.writerow(["" if value is None else value for value in asdict(row).values()])
    paths = {"csv": out_dir / "positives.csv", "json": out_dir / "positives.json"}
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_json(paths["json"], asdict(report))
    return paths
