"""Head conflict distance (Co-DETR, Figures 1-2): how differently the heads use the encoder output.

For heads i, j (DETR's one-to-one head and the K auxiliary heads, N = K + 1 in all) and a set of images D:

    S_ij = mean_{I in D} KL(C_i(I) || C_j(I))                       an N x N matrix, zero diagonal
    S_i  = 1 / (2 (N - 1)) * sum_{j != i} (S_ij + S_ji)               the average distance of head i

where C_h(I) is head h's Grad-CAM on the encoder output turned into a distribution (analysis/gradcam.py).
The paper writes S_i = 1/(2(K-1)) sum_{j != i}(S_ij + S_ji) with the sum over its K compared heads;
here every head of the matrix is compared, so its size N replaces the paper's K: S_i is the mean of the
2(N - 1) off-diagonal entries in row i and column i (KL is asymmetric, so both directions count).

A checkpoint without auxiliary heads is an error (a 1 x 1 matrix has no pairs to compare).

    result = analyze_checkpoint("runs/co/last.pt", num_images=32)
    write_conflicts(result, "out/")        # conflicts.csv, conflicts.json, conflicts_heatmap.png, overlays/
"""
from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor

from analysis.gradcam import CamOptions, EncoderOutputCam, ImageCams
from analysis.labels import checkpoint_labels
from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.data.coco import CocoDetection
from codetr.data.collate import collate
from codetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from codetr.errors import CheckpointError, ConfigError, DataError
from codetr.io import atomic_write_json, atomic_write_text
from codetr.models.criterion import SetCriterion
from codetr.models.detector import DeformableDETR

if TYPE_CHECKING:
    import pandas as pd

KL_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class ConflictOptions:
    """Options of the conflict analysis (defaults in brackets); `cam` holds the CAM's own options.

    num_images [32]: images used, the first ones of the split in dataset order (|D| in the paper).
    split ["val"]: the dataset split, always with the test transforms (no augmentation).
    skip_images_without_boxes [True]: images without ground-truth boxes are skipped (no loss target for
        the one-to-many assignments); skipped ids are reported.
    epsilon [1e-8]: KL(P || Q) = sum_x P(x) (log(P(x) + eps) - log(Q(x) + eps)), finite for any Q.
    kl_reduction ["sum"]: "sum" is the KL divergence; "mean" divides it by the number of grid cells (what
        torch's F.kl_div(reduction="mean") returns; the paper's magnitudes, ~0.006-0.009, may come from
        such a per-element mean). Images of different sizes have grids of different sizes, so under
        "mean" a larger image weighs less in S_ij.
    seed [0]: image number n (0-based, in the order used) seeds the branches' sampling with seed + n.
    """

    cam: CamOptions = field(default_factory=CamOptions)
    num_images: int = 32
    split: str = "val"
    skip_images_without_boxes: bool = True
    epsilon: float = 1e-8
    kl_reduction: str = "sum"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_images < 1:
            raise ConfigError(f"num_images must be >= 1, got {self.num_images}")
        if self.split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {self.split!r}")
        if not self.epsilon >= 0:
            raise ConfigError(f"epsilon must be >= 0, got {self.epsilon}")
        if self.kl_reduction not in KL_REDUCTIONS:
            raise ConfigError(f"kl_reduction must be one of {list(KL_REDUCTIONS)}, got {self.kl_reduction!r}")


def conflict_options(overrides: list[str], base: ConflictOptions = ConflictOptions()) -> ConflictOptions:
    """`base` with KEY=VALUE overrides of any ConflictOptions or CamOptions field, e.g.
    ["level_weighting=normalized", "epsilon=0", "levels=0,1"] ("none" sets an optional field to None)."""
    import dataclasses
    import typing

    from codetr.config import parse_value

    types = {cls: typing.get_type_hints(cls) for cls in (ConflictOptions, CamOptions)}
    types[ConflictOptions].pop("cam")
    changes: dict[type, dict] = {ConflictOptions: {}, CamOptions: {}}
    for item in overrides:
        key, sep, text = (part.strip() for part in item.partition("="))
        owner = next((cls for cls, hints in types.items() if key in hints), None)
        if not sep or owner is None:
            valid = sorted(name for hints in types.values() for name in hints)
            raise ConfigError(f"option {item!r}: expected KEY=VALUE with KEY one of {', '.join(valid)}")
        changes[owner][key] = parse_value(text, types[owner][key], key)
    cam = dataclasses.replace(base.cam, **changes[CamOptions])
    return dataclasses.replace(base, cam=cam, **changes[ConflictOptions])


def kl_divergence(p: Tensor, q: Tensor, epsilon: float = 1e-8, reduction: str = "sum") -> Tensor:
    """KL(P || Q) of two distributions of the same shape (each sums to 1): a scalar.

    sum_x P(x) * (log(P(x) + eps) - log(Q(x) + eps)); terms with P(x) = 0 contribute 0. "mean" divides by
    the number of elements.
    """
    if p.shape != q.shape:
        raise ValueError(f"kl_divergence: shapes differ, {tuple(p.shape)} vs {tuple(q.shape)}")
    p, q = p.double(), q.double()
    kl = (p * ((p + epsilon).log() - (q + epsilon).log())).sum()
    return kl / p.numel() if reduction == "mean" else kl


def pairwise_kl(distributions: list[Tensor], epsilon: float = 1e-8, reduction: str = "sum") -> Tensor:
    """[N, N] float64 with entry (i, j) = KL(distributions[i] || distributions[j]); the diagonal is 0."""
    size = len(distributions)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            if i != j:
                matrix[i, j] = kl_divergence(distributions[i], distributions[j], epsilon, reduction).cpu()
    return matrix


def average_distance(matrix: Tensor) -> Tensor:
    """S_i = 1 / (2 (N - 1)) * sum_{j != i} (S_ij + S_ji) for an [N, N] matrix (N >= 2): [N]."""
    size = matrix.shape[0]
    if matrix.shape != (size, size) or size < 2:
        raise ValueError(f"average_distance needs an N x N matrix with N >= 2, got {tuple(matrix.shape)}")
    off_diagonal = matrix * (1 - torch.eye(size, dtype=matrix.dtype))
    return (off_diagonal.sum(0) + off_diagonal.sum(1)) / (2 * (size - 1))


@dataclass
class CamExample:
    """One image kept for overlays: image uint8 [H, W, 3] (the network input, resized), gt_boxes [N, 4]
    xyxy in its pixels, and each head's distribution [H_g, W_g] on a grid of stride `grid_stride`."""

    image_id: int
    image: Tensor
    gt_boxes: Tensor
    distributions: dict[str, Tensor]
    grid_stride: int


@dataclass
class ConflictResult:
    """The conflict analysis of one checkpoint.

    matrix [N, N] (rows i, columns j: S_ij), average [N] (S_i), per_image [num_images, N, N] (the KL
    matrix of every image, in `image_ids` order), targets [num_images, N] (the scalar back-propagated per
    head), degenerate: per head the number of images whose CAM was all zero.
    """

    heads: list[str]
    matrix: Tensor
    average: Tensor
    image_ids: list[int]
    per_image: Tensor
    targets: Tensor
    options: ConflictOptions
    checkpoint: str = ""
    label: str = ""
    skipped_image_ids: list[int] = field(default_factory=list)
    degenerate: dict[str, int] = field(default_factory=dict)
    examples: list[CamExample] = field(default_factory=list)

    def to_json(self) -> dict:
        """Everything except the examples' pixels, as plain JSON types."""
        return {
            "checkpoint": self.checkpoint,
            "label": self.label,
            "heads": self.heads,
            "matrix": self.matrix.tolist(),
            "average_distance": dict(zip(self.heads, self.average.tolist())),
            "num_images": len(self.image_ids),
            "skipped_image_ids": self.skipped_image_ids,
            "degenerate_cams": self.degenerate,
            "options": asdict(self.options),
            "per_image": [
                {"image_id": image_id, "kl": kl.tolist(), "target": dict(zip(self.heads, target.tolist()))}
                for image_id, kl, target in zip(self.image_ids, self.per_image, self.targets)
            ],
        }

    def to_frame(self) -> pd.DataFrame:
        """S_ij as a DataFrame (rows i = KL from, named "i \\ j"; columns j = KL to) with S_i as the last column."""
        import pandas as pd

        frame = pd.DataFrame(self.matrix.numpy(), index=pd.Index(self.heads, name="i \\ j"), columns=self.heads)
        frame["S_i"] = self.average.numpy()
        return frame

    def to_csv(self) -> str:
        """The matrix with a header row of head names (rows i = KL from, columns j = KL to) and S_i last."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["head", *self.heads, "S_i"])
        for name, row, average in zip(self.heads, self.matrix.tolist(), self.average.tolist()):
            writer.writerow([name, *(f"{v:.6g}" for v in row), f"{average:.6g}"])
        return buffer.getvalue()


def head_conflicts(
    model: DeformableDETR,
    criterion: SetCriterion,
    dataset: CocoDetection,
    options: ConflictOptions = ConflictOptions(),
    keep_examples: int = 0,
    progress: bool = True,
    checkpoint: str = "",
    label: str = "",
) -> ConflictResult:
    """Run the analysis over the first `options.num_images` usable images of `dataset` (test transforms).

    model: a Co-DETR model with its auxiliary heads (load_detector(..., deploy=False)); criterion:
    build_criterion(model, cfg.model). keep_examples: how many of the first images keep their CAMs for
    overlays (`ConflictResult.examples`).
    """
    per_image, targets, image_ids, skipped, examples = [], [], [], [], []
    degenerate: dict[str, int] = {}
    with EncoderOutputCam(model, criterion, options.cam) as cams, _progress_bar(progress) as bar:
        task = bar.add_task("conflicts", total=min(options.num_images, len(dataset)))
        for index in range(len(dataset)):
            if len(image_ids) == options.num_images:
                break
            image, target = dataset[index]
            if options.skip_images_without_boxes and len(target["labels"]) == 0:
                skipped.append(int(target["image_id"]))
                continue
            batch = collate([(image, target)])
            image_cams = cams(batch, seed=options.seed + len(image_ids))
            distributions = [image_cams.distributions[h] for h in cams.heads]
            per_image.append(pairwise_kl(distributions, options.epsilon, options.kl_reduction))
            targets.append(torch.tensor([image_cams.targets[h] for h in cams.heads], dtype=torch.float64))
            for head in image_cams.degenerate:
                degenerate[head] = degenerate.get(head, 0) + 1
            if len(examples) < keep_examples:
                examples.append(_example(image, target, image_cams))
            image_ids.append(int(target["image_id"]))
            bar.update(task, advance=1)
    if not image_ids:
        raise DataError(f"{dataset.ann_file}: no image with ground-truth boxes among {len(dataset)} images")
    stacked = torch.stack(per_image)
    matrix = stacked.mean(0)
    return ConflictResult(
        heads=list(cams.heads), matrix=matrix, average=average_distance(matrix), image_ids=image_ids,
        per_image=stacked, targets=torch.stack(targets), options=options, checkpoint=checkpoint, label=label,
        skipped_image_ids=skipped, degenerate=degenerate, examples=examples,
    )


def analyze_checkpoint(
    ckpt: str | Path,
    device: torch.device | str = "cpu",
    data_root: str | Path | None = None,
    options: ConflictOptions = ConflictOptions(),
    keep_examples: int = 0,
    progress: bool = True,
    use_ema: bool = True,
    label: str = "",
) -> ConflictResult:
    """Load a Co-DETR checkpoint with its auxiliary heads and run `head_conflicts` on its dataset.

    data_root: a COCO 2017-layout folder; default: the data the checkpoint was trained on (its config).
    Raises CheckpointError / DataError / ConfigError (bad input) with one readable line.
    """
    from codetr.config import apply_overrides
    from codetr.data.loaders import build_dataset
    from codetr.engine.inference import load_detector
    from codetr.models.criterion import build_criterion

    detector = load_detector(ckpt, device, use_ema=use_ema, deploy=False)
    if not detector.cfg.model.aux.heads:
        raise CheckpointError(f"{ckpt}: model.aux.heads is empty (a baseline checkpoint); head conflicts need "
                              "a Co-DETR checkpoint with auxiliary heads")
    overrides = ["data.augment=false"] + ([f"data.root={data_root}"] if data_root is not None else [])
    data_cfg = apply_overrides(detector.cfg, overrides).data
    dataset = build_dataset(data_cfg, options.split)
    if dataset.cat_ids != detector.cat_ids:
        raise DataError(f"{dataset.ann_file}: categories {dataset.cat_ids} differ from the checkpoint's "
                        f"{detector.cat_ids}")
    criterion = build_criterion(detector.model, detector.cfg.model)
    return head_conflicts(detector.model, criterion, dataset, options, keep_examples, progress,
                          checkpoint=str(ckpt), label=label or checkpoint_labels([ckpt])[0])


def write_conflicts(result: ConflictResult, out_dir: str | Path, overlays: int | None = None) -> list[Path]:
    """Write conflicts.csv, conflicts.json (with per-image values), conflicts_heatmap.png and
    overlays/image_<id>.png (the first `overlays` kept examples, all of them if None). Returns the paths."""
    from analysis.conflict_plots import plot_cam_overlay, plot_conflict_matrices
    from analysis.figures import save_figure

    out = Path(out_dir)
    paths = [out / "conflicts.csv", out / "conflicts.json", out / "conflicts_heatmap.png"]
    atomic_write_text(paths[0], result.to_csv())
    atomic_write_json(paths[1], result.to_json())
    save_figure(plot_conflict_matrices([result]), paths[2])
    for example in result.examples[:overlays]:
        path = out / "overlays" / f"image_{example.image_id}.png"
        save_figure(plot_cam_overlay(example, result.heads), path)
        paths.append(path)
    return paths


def conflict_table(result: ConflictResult, digits: int = 4) -> Table:
    """A rich table: rows i, columns j (S_ij = mean KL(C_i || C_j)), and S_i in the last column."""
    title = f"{result.label or result.checkpoint}: S_ij = mean KL(C_i || C_j) over {len(result.image_ids)} images"
    table = Table(title=title, title_justify="left")
    table.add_column("i \\ j", style="bold")
    for name in result.heads:
        table.add_column(name, justify="right")
    table.add_column("S_i", justify="right", style="bold")
    for name, row, average in zip(result.heads, result.matrix.tolist(), result.average.tolist()):
        table.add_row(name, *(f"{v:.{digits}f}" for v in row), f"{average:.{digits}f}")
    return table


def _example(image: Tensor, target: dict, image_cams: ImageCams) -> CamExample:
    """The de-normalised input image [H, W, 3] uint8 and its GT boxes in pixels, with the CAMs (on CPU)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = ((image.cpu() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    height, width = pixels.shape[:2]
    boxes = box_cxcywh_to_xyxy(target["boxes"].float()) * torch.tensor([width, height, width, height])
    distributions = {h: d.detach().cpu() for h, d in image_cams.distributions.items()}
    return CamExample(int(target["image_id"]), pixels, boxes, distributions, image_cams.grid_stride)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(TextColumn("conflicts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True, disable=not enabled)
