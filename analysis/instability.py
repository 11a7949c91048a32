"""Matching instability IS (Co-DETR Fig. 5; defined in DN-DETR, Li et al. 2022, Sec. 3.1): from one training epoch
to the next, how many ground-truth boxes the one-to-one (Hungarian) matching gives to a different decoder query.

What the definition says. DN-DETR (as its text is quoted; its released code has no IS script): at epoch i the
decoder predicts O^i = {O^i_0, ..., O^i_{N-1}} (N queries) for an image with ground truth T = {T_0, ..., T_{M-1}};
V^i_n = m if O^i_n is matched to T_m and -1 if it is matched to nothing; IS^i = sum_n 1(V^i_n != V^{i-1}_n).
That V is indexed by query. Co-DETR's Fig. 5 plots IS over epochs for Deformable-DETR and Co-Deformable-DETR
without restating it.

What is computed. Two counts per image and pair of consecutive checkpoints:
  IS (by ground truth, `is_per_image`): v^i_m = the query matched to T_m (-1 if none),
      IS^i = sum_m 1(v^i_m != v^{i-1}_m), the number of GT boxes that changed query;
  IS by query (DN-DETR's V, `is_by_query_per_image`): the number of queries whose matched box changed.
A box that moves from query a to query b counts once in the first; in the second it changes a and b, so when
every box is matched at both epochs (Q >= M) the query count lies between the box count (boxes only trading
queries among themselves) and twice it (every moved box taking a query that had none).

Where the paper is silent, the choices made here:
  - decoder layer: the last (the one inference uses); `layer` indexes DetectorOutput.layers (-1 = last);
  - images: a fixed set, the first `max_images` of a split (default: validation) in dataset order, with the
    test-time transforms (no augmentation), the same batches for every checkpoint of a run (with `data`,
    the same images for every run too);
  - aggregation over images: the mean of the per-image IS over all images (an image without boxes counts,
    with IS 0), and the pooled fraction of boxes that changed query (changed boxes / boxes);
  - weights: the raw weights, the ones training matched with (the EMA, if any, with use_ema=True); the model
    in eval mode (no dropout; DINO builds no denoising queries), float32;
  - costs: the matcher training uses (HungarianMatcher) with the config's model.loss.match_cost_* weights.

What a "query" is depends on the model. Plain Deformable-DETR: a learned query slot (its embedding and
reference point), the same object at every epoch. Two-stage (Deformable-DETR++, DINO, Co-DINO): slot n is
the n-th ranked encoder proposal of that image (the top-k by score), so "the same query" means the same rank,
and IS also counts proposals changing rank. Only the one-to-one queries are matched (Co-DETR's auxiliary
branches are not built).

    frame = run_instability([RunSpec("co", (Path("runs/co/epoch_001.pt"), Path("runs/co/epoch_002.pt")))])
    write_instability(Path("out"), frame)     # instability.csv, instability.json, instability.png
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from codetr.config import DataConfig, ModelConfig
from codetr.errors import CheckpointError, ConfigError, DataError
from codetr.io import atomic_write_json, atomic_write_text
from codetr.models.matcher import HungarianMatcher

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from codetr.engine.inference import LoadedDetector

UNMATCHED = -1  # a ground-truth box matched to no query (more boxes than queries)
SPLITS = ("train", "val")
EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")  # a training run's per-epoch checkpoints (codetr.engine.train)
COLUMNS = ("run", "transition", "prev_epoch", "epoch", "is_per_image", "changed_fraction", "is_by_query_per_image",
           "changed_boxes", "num_images", "num_boxes", "epoch_source", "prev_checkpoint", "checkpoint")

Assignment = Tensor | Sequence[int]  # per image: [M] the query index of each GT box, UNMATCHED where none


# -- IS from two assignments ------------------------------------------------------------------------------


def _as_assignment(values: Assignment, where: str) -> Tensor:
    """A 1-D int64 CPU tensor of query indices >= 0 or UNMATCHED, no query twice (one-to-one)."""
    tensor = torch.as_tensor(values, dtype=torch.int64).cpu().reshape(-1)
    if (tensor < UNMATCHED).any():
        raise ValueError(f"{where}: query indices must be >= 0 or {UNMATCHED} (unmatched), got {tensor.tolist()}")
    matched = tensor[tensor != UNMATCHED]
    if matched.unique().numel() != matched.numel():
        raise ValueError(f"{where}: a query is matched to two boxes ({tensor.tolist()}); the matching is one-to-one")
    return tensor


def assignment_from_match(query_idx: Tensor, target_idx: Tensor, num_targets: int) -> Tensor:
    """(query_idx [K], target_idx [K]) as HungarianMatcher returns them for one image -> [num_targets] int64:
    the query matched to each ground-truth box, UNMATCHED where none."""
    assignment = torch.full((num_targets,), UNMATCHED, dtype=torch.int64)
    assignment[target_idx.cpu().long()] = query_idx.cpu().long()
    return assignment


def image_instability(previous: Assignment, current: Assignment) -> tuple[int, int]:
    """One image's (IS by ground truth, IS by query) between two epochs' assignments [M] (see the module doc).

    A box unmatched at both epochs has not changed; a box matched at one epoch only has.
    """
    prev, curr = _as_assignment(previous, "previous"), _as_assignment(current, "current")
    if prev.numel() != curr.numel():
        raise ValueError(f"the image has {prev.numel()} boxes at one epoch and {curr.numel()} at the other")
    by_box = int((prev != curr).sum())
    # query -> box, per epoch; queries matched at neither epoch hold -1 at both and never count
    prev_box = {int(q): m for m, q in enumerate(prev.tolist()) if q != UNMATCHED}
    curr_box = {int(q): m for m, q in enumerate(curr.tolist()) if q != UNMATCHED}
    by_query = sum(prev_box.get(q, -1) != curr_box.get(q, -1) for q in prev_box.keys() | curr_box.keys())
    return by_box, by_query


@dataclass(frozen=True)
class InstabilityStats:
    """IS between two epochs over a set of images: the sums, and the averages as properties."""

    num_images: int
    num_boxes: int
    changed_boxes: int  # sum over images of IS by ground truth
    changed_queries: int  # sum over images of IS by query (DN-DETR's V)

    @property
    def is_per_image(self) -> float:
        """Mean IS (by ground truth) per image; images without boxes count with 0."""
        return self.changed_boxes / self.num_images if self.num_images else float("nan")

    @property
    def changed_fraction(self) -> float:
        """Fraction of all ground-truth boxes matched to a different query; NaN without boxes."""
        return self.changed_boxes / self.num_boxes if self.num_boxes else float("nan")

    @property
    def is_by_query_per_image(self) -> float:
        """Mean IS by query (DN-DETR's V) per image."""
        return self.changed_queries / self.num_images if self.num_images else float("nan")


def instability(previous: Sequence[Assignment], current: Sequence[Assignment]) -> InstabilityStats:
    """IS between two epochs' assignments of the same images, in the same order.

    previous, current: one assignment per image, [M_i] int (the query of each GT box, UNMATCHED = -1 where
    none); M_i may be 0. Raises ValueError if the images or their box counts differ.
    """
    if len(previous) != len(current):
        raise ValueError(f"assignments of {len(previous)} and {len(current)} images: expected the same images")
    changed_boxes = changed_queries = num_boxes = 0
    for image, (prev, curr) in enumerate(zip(previous, current)):
        try:
            by_box, by_query = image_instability(prev, curr)
        except ValueError as error:
            raise ValueError(f"image {image}: {error}") from None
        changed_boxes, changed_queries = changed_boxes + by_box, changed_queries + by_query
        num_boxes += len(prev)
    return InstabilityStats(len(previous), num_boxes, changed_boxes, changed_queries)


# -- assignments of one model / checkpoint -----------------------------------------------------------------


def build_matcher(model_cfg: ModelConfig) -> HungarianMatcher:
    """The one-to-one matcher training uses, with the config's match costs (model.loss.match_cost_*)."""
    c = model_cfg.loss
    return HungarianMatcher(cost_class=c.match_cost_class, cost_bbox=c.match_cost_bbox, cost_giou=c.match_cost_giou,
                            focal_alpha=c.focal_alpha, focal_gamma=c.focal_gamma)


def check_layer(layer: int, num_layers: int) -> None:
    if not -num_layers <= layer < num_layers:
        raise ConfigError(f"--layer {layer}: the decoder has {num_layers} layers (0..{num_layers - 1}, or -1 = last)")


@torch.no_grad()
def match_assignments(model: nn.Module, loader: Iterable, matcher: HungarianMatcher, layer: int = -1,
                      device: torch.device | str = "cpu",
                      on_batch: Callable[[int], None] | None = None) -> tuple[list[int], list[Tensor]]:
    """Run `model` (eval mode, float32) over `loader` and match each image's boxes to the queries of one layer.

    model(images [B, 3, H, W], masks [B, H, W] True = pad) -> DetectorOutput whose `layers[layer]` is (logits
    [B, Q, C], boxes [B, Q, 4] cxcywh normalised); loader yields Batches (targets: "boxes" [M, 4] cxcywh
    normalised, "labels" [M], "image_id"). Returns (image ids, per image [M] int64 the query of each box,
    UNMATCHED where none), in loader order. on_batch(number of images) after each batch.
    """
    was_training = model.training
    model.eval()
    image_ids: list[int] = []
    assignments: list[Tensor] = []
    try:
        for batch in loader:
            batch = batch.to(device)
            layers = model(batch.images, batch.masks).layers
            check_layer(layer, len(layers))
            logits, boxes = layers[layer]
            matches = matcher(logits.float(), boxes.float(), batch.targets)
            for target, (query_idx, target_idx) in zip(batch.targets, matches):
                image_ids.append(int(target["image_id"]))
                assignments.append(assignment_from_match(query_idx, target_idx, len(target["boxes"])))
            if on_batch is not None:
                on_batch(len(batch))
    finally:
        model.train(was_training)
    return image_ids, assignments


@dataclass
class CheckpointAssignments:
    """One checkpoint's matching: per image the query of each ground-truth box."""

    path: str
    epoch: int  # the checkpoint's stored epoch (epoch_003.pt: 3; a converted release: its meta epoch or 0)
    num_classes: int
    num_queries: int
    image_ids: list[int]
    assignments: list[Tensor]  # per image [M_i] int64, UNMATCHED = -1 where none


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r}: expected train or val")


def image_loader(data_cfg: DataConfig, split: str = "val", max_images: int | None = None,
                 cat_ids: Sequence[int] | None = None, max_workers: int = 2) -> tuple[DataLoader, int]:
    """A loader over the first `max_images` images of `split` (all if None), test-time transforms, dataset
    order. cat_ids: the checkpoint's categories, checked against the dataset's. Returns (loader, image count)."""
    from codetr.data.loaders import build_dataset, build_eval_loader

    check_split(split)
    if max_images is not None and max_images < 1:
        raise ConfigError(f"--max-images {max_images}: expected at least 1")
    data_cfg = replace(data_cfg, augment=False, num_workers=min(data_cfg.num_workers, max_workers))
    dataset = build_dataset(data_cfg, split)
    if cat_ids is not None and list(dataset.cat_ids) != list(cat_ids):
        raise DataError(f"{dataset.ann_file}: categories {dataset.cat_ids} differ from the checkpoint's {list(cat_ids)}")
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    if count == 0:
        raise DataError(f"{dataset.ann_file}: the {split} split has no images")
    return build_eval_loader(Subset(dataset, range(count)), data_cfg), count


def _data_config(detector: LoadedDetector, data: Path | None) -> DataConfig:
    from codetr.config import apply_overrides

    return apply_overrides(detector.cfg, [f"data.root={data}"] if data is not None else []).data


def _assign(detector: LoadedDetector, path: Path, loader: Iterable, layer: int, device: torch.device | str,
            on_batch: Callable[[int], None] | None) -> CheckpointAssignments:
    check_layer(layer, detector.cfg.model.transformer.num_decoder_layers)
    image_ids, assignments = match_assignments(detector.model, loader, build_matcher(detector.cfg.model), layer,
                                               device, on_batch)
    return CheckpointAssignments(str(path), detector.epoch, detector.model.num_classes, detector.cfg.model.num_queries,
                                 image_ids, assignments)


def checkpoint_assignments(ckpt: Path, device: torch.device | str = "cpu", data: Path | None = None,
                           split: str = "val", max_images: int | None = None, layer: int = -1,
                           use_ema: bool = False) -> CheckpointAssignments:
    """Load a checkpoint (codetr's, or a released file converted in memory; the one-to-one detector only) and
    match each image of the first `max_images` of `split` of its data (or of `data`, a COCO-layout folder)."""
    from codetr.engine.inference import load_detector

    detector = load_detector(ckpt, device, use_ema=use_ema, deploy=True)
    loader, _ = image_loader(_data_config(detector, data), split, max_images, detector.cat_ids)
    return _assign(detector, Path(ckpt), loader, layer, device, None)


# -- runs: ordered checkpoints ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """A training run: a label and its checkpoints in epoch order (at least 2)."""

    label: str
    checkpoints: tuple[Path, ...]


def run_from_folder(folder: Path, label: str | None = None) -> RunSpec:
    """A training run folder's epoch_XXX.pt files in epoch order, labelled `label` (default: the folder's name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--run {folder}: not a folder")
    numbered = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := EPOCH_FILE.match(p.name)) and p.is_file())
    if not numbered:
        raise ConfigError(f"--run {folder}: no epoch_XXX.pt checkpoints (train with train.keep_epoch_checkpoints=true; "
                          "for a grid: codetr ablate ... --set train.keep_epoch_checkpoints=true)")
    return RunSpec(label or folder.resolve().name, tuple(p for _, p in numbered))


def resolve_runs(ckpts: Sequence[Path], label: str | None, run_dirs: Sequence[Path],
                 labelled_run_dirs: Sequence[tuple[str, Path]] = ()) -> list[RunSpec]:
    """The runs of `codetr instability`: --ckpt files (one run, in the given order, named `label`, default
    their folder's name), each --run folder, and (label, folder) pairs (a grid's points, e.g. "method=h_detr").
    Checks each run has >= 2 existing, distinct checkpoints."""
    if label is not None and not ckpts:
        raise ConfigError("--label names the --ckpt run: give its checkpoints with --ckpt")
    runs = []
    if ckpts:
        parents = {Path(p).resolve().parent.name for p in ckpts}
        runs.append(RunSpec(label or (parents.pop() if len(parents) == 1 else "ckpt"), tuple(Path(p) for p in ckpts)))
    runs += [run_from_folder(folder) for folder in run_dirs]
    runs += [run_from_folder(folder, name) for name, folder in labelled_run_dirs]
    if not runs:
        raise ConfigError("no checkpoints: give --ckpt (two or more, in epoch order), --run DIR or --grid DIR")
    labels = [run.label for run in runs]
    if len(set(labels)) != len(labels):
        twice = next(name for name in labels if labels.count(name) > 1)
        raise ConfigError(f"two runs are named {twice!r}: rename one with --label (the --ckpt run)")
    for run in runs:
        if len(run.checkpoints) < 2:
            raise ConfigError(f"run {run.label!r}: {len(run.checkpoints)} checkpoint(s); IS compares consecutive "
                              "epochs and needs at least 2")
        missing = [str(p) for p in run.checkpoints if not Path(p).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint not found: {', '.join(missing)}")
        resolved = [Path(p).resolve() for p in run.checkpoints]
        if len(set(resolved)) != len(resolved):
            raise ConfigError(f"run {run.label!r}: the same checkpoint is given twice")
    return runs


def _header(path: Path) -> tuple[int, int, int] | None:
    """(num_classes, num_queries, decoder layers) of a codetr checkpoint, read without loading its tensors (mmap);
    None for a file that is not one (a released checkpoint: checked once converted)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        model = state["config"]["model"]
        return int(state["num_classes"]), int(model["num_queries"]), int(model["transformer"]["num_decoder_layers"])
    except Exception:  # not a zip-format codetr checkpoint: load_detector reads (or refuses) it
        return None


def _check_compatible(path: Path, num_classes: int, num_queries: int, first: tuple[Path, int, int] | None,
                      run_first: tuple[Path, int, int] | None) -> None:
    """Every checkpoint: one class count; within a run: one query count (query indices must mean the same)."""
    if first is not None and num_classes != first[1]:
        raise CheckpointError(f"checkpoints of different class counts: {first[0]} has {first[1]} classes, "
                              f"{path} has {num_classes}")
    if run_first is not None and num_queries != run_first[2]:
        raise CheckpointError(f"checkpoints of one run with different query counts: {run_first[0]} has "
                              f"{run_first[2]} queries, {path} has {num_queries}")


def check_runs(runs: Sequence[RunSpec], layer: int = -1) -> None:
    """Before any work: the class and query counts and the decoder depth (for `layer`) of every codetr
    checkpoint; released files are checked when loaded."""
    first = None
    for run in runs:
        run_first = None
        for path in run.checkpoints:
            header = _header(path)
            if header is None:
                continue
            num_classes, num_queries, num_layers = header
            check_layer(layer, num_layers)
            _check_compatible(path, num_classes, num_queries, first, run_first)
            first = first or (path, num_classes, num_queries)
            run_first = run_first or (path, num_classes, num_queries)


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True, disable=not enabled)


def _run_rows(run: RunSpec, results: list[CheckpointAssignments]) -> list[dict]:
    """One row per pair of consecutive checkpoints. The stored epochs label them when they increase strictly;
    otherwise (converted files without one) the position in the run, 1..n (epoch_source "order")."""
    epochs = [r.epoch for r in results]
    source = "checkpoint" if all(a < b for a, b in zip(epochs, epochs[1:])) else "order"
    if source == "order":
        epochs = list(range(1, len(results) + 1))
    rows = []
    for index, (prev, curr) in enumerate(zip(results, results[1:])):
        if prev.image_ids != curr.image_ids:
            raise DataError(f"run {run.label!r}: {prev.path} and {curr.path} were matched on different images")
        stats = instability(prev.assignments, curr.assignments)
        rows.append({"run": run.label, "transition": index + 1, "prev_epoch": epochs[index], "epoch": epochs[index + 1],
                     "is_per_image": stats.is_per_image, "changed_fraction": stats.changed_fraction,
                     "is_by_query_per_image": stats.is_by_query_per_image, "changed_boxes": stats.changed_boxes,
                     "num_images": stats.num_images, "num_boxes": stats.num_boxes, "epoch_source": source,
                     "prev_checkpoint": prev.path, "checkpoint": curr.path})
    return rows


def run_instability(runs: Sequence[RunSpec], data: Path | None = None, split: str = "val",
                    max_images: int | None = None, layer: int = -1, device: torch.device | str = "cpu",
                    use_ema: bool = False, progress: bool = True) -> pd.DataFrame:
    """IS between consecutive checkpoints of each run: a DataFrame with COLUMNS, one row per transition.

    Each run is matched on the first `max_images` images (all if None) of `split` of its first checkpoint's
    data, or of `data` (a COCO-layout folder; then every run sees the same images), one loader for all of its
    checkpoints. layer: the decoder layer matched (index into DetectorOutput.layers, -1 = last).
    """
    import pandas as pd

    from codetr.engine.inference import load_detector

    check_split(split)
    if max_images is not None and max_images < 1:
        raise ConfigError(f"--max-images {max_images}: expected at least 1")
    check_runs(runs, layer)
    rows: list[dict] = []
    first: tuple[Path, int, int] | None = None
    with _progress(progress) as bar:
        overall = bar.add_task("checkpoints", total=sum(len(run.checkpoints) for run in runs))
        for run in runs:
            loader, count, results, run_first = None, 0, [], None
            for path in run.checkpoints:
                detector = load_detector(path, device, use_ema=use_ema, deploy=True)
                counts = (detector.model.num_classes, detector.cfg.model.num_queries)
                _check_compatible(path, *counts, first, run_first)
                first, run_first = first or (path, *counts), run_first or (path, *counts)
                if loader is None:
                    loader, count = image_loader(_data_config(detector, data), split, max_images, detector.cat_ids)
                task = bar.add_task(f"{run.label}: {Path(path).name}", total=count)
                results.append(_assign(detector, path, loader, layer, device, lambda n: bar.advance(task, n)))
                bar.remove_task(task)
                bar.advance(overall)
                del detector
            rows += _run_rows(run, results)
    return pd.DataFrame(rows, columns=list(COLUMNS))


# -- output -------------------------------------------------------------------------------------------------


def plot_instability(frame: pd.DataFrame) -> Figure:
    """Two panels over epochs, one line per run: mean IS per image, and the % of boxes that changed query.

    Each point is the transition into that epoch (epoch e: checkpoints e - 1 -> e). Built with matplotlib's
    object API (no pyplot state); analysis.figures.save_figure writes it.
    """
    from matplotlib.figure import Figure

    if frame.empty:
        raise ValueError("plot_instability needs at least one row")
    figure = Figure(figsize=(10, 4.2), layout="tight")
    left, right = figure.subplots(1, 2)
    for label, rows in frame.groupby("run", sort=False):
        left.plot(rows["epoch"], rows["is_per_image"], marker="o", label=label)
        right.plot(rows["epoch"], 100 * rows["changed_fraction"], marker="o", label=label)
    order = "epoch" if (frame["epoch_source"] == "checkpoint").all() else "epoch (checkpoint order where unknown)"
    images = ", ".join(str(n) for n in frame["num_images"].unique())
    left.set(xlabel=order, ylabel="IS: boxes matched to another query, per image",
             title=f"matching instability ({images} images)")
    right.set(xlabel=order, ylabel="% of ground-truth boxes", title="boxes that changed query", ylim=(0, None))
    left.set_ylim(bottom=0)
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
        axis.xaxis.get_major_locator().set_params(integer=True)
    return figure


def write_instability(out_dir: Path, frame: pd.DataFrame, settings: dict | None = None) -> dict[str, Path]:
    """Atomically write instability.csv (the rows), instability.json (settings and rows) and instability.png.
    Returns {kind: path}."""
    from analysis.figures import save_figure

    out_dir = Path(out_dir)
    paths = {"csv": out_dir / "instability.csv", "json": out_dir / "instability.json",
             "png": out_dir / "instability.png"}
    atomic_write_text(paths["csv"], frame.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    records = [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}  # NaN -> null
               for row in frame.astype(object).to_dict(orient="records")]
    atomic_write_json(paths["json"], {"settings": {k: str(v) if isinstance(v, Path) else v
                                                   for k, v in (settings or {}).items()}, "rows": records})
    save_figure(plot_instability(frame), paths["png"], dpi=120)
    return paths


def instability_table(frame: pd.DataFrame) -> Table:
    """A rich table, one row per transition."""
    table = Table(title="matching instability between consecutive checkpoints")
    for name in ("run", "epochs", "IS / image", "changed %", "IS by query / image", "images", "boxes"):
        table.add_column(name, justify="left" if name in ("run", "epochs") else "right", no_wrap=True)
    for row in frame.itertuples(index=False):
        table.add_row(str(row.run), f"{row.prev_epoch} -> {row.epoch}", f"{row.is_per_image:.3f}",
                      f"{100 * row.changed_fraction:.1f}", f"{row.is_by_query_per_image:.3f}", str(row.num_images),
                      str(row.num_boxes))
    return table
