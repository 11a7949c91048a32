"""COCO box evaluation: model outputs -> COCO result records -> the 12 COCOeval numbers.

The metrics come from pycocotools' COCOeval (iouType "bbox", default parameters), so they are the
numbers every COCO paper reports. Detections use COCO's result format: one record per box,
{image_id, category_id, bbox [x, y, w, h] in absolute pixels of the original image, score}.
"""
from __future__ import annotations

import contextlib
import dataclasses
import copy
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor, nn

from codetr.engine.amp import autocast_context
from codetr.errors import ConfigError, DataError, DivergenceError
from codetr.io import atomic_write_bytes, atomic_write_json

# In the order of COCOeval.stats.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")

# name -> (precision or recall, IoU range, area range, max detections): the rows of COCOeval's summary.
_METRIC_ROWS = {
    "AP": ("AP", "0.50:0.95", "all", 100),
    "AP50": ("AP", "0.50", "all", 100),
    "AP75": ("AP", "0.75", "all", 100),
    "APs": ("AP", "0.50:0.95", "small", 100),
    "APm": ("AP", "0.50:0.95", "medium", 100),
    "APl": ("AP", "0.50:0.95", "large", 100),
    "AR1": ("AR", "0.50:0.95", "all", 1),
    "AR10": ("AR", "0.50:0.95", "all", 10),
    "AR100": ("AR", "0.50:0.95", "all", 100),
    "ARs": ("AR", "0.50:0.95", "small", 100),
    "ARm": ("AR", "0.50:0.95", "medium", 100),
    "ARl": ("AR", "0.50:0.95", "large", 100),
}

_RECORD_KEYS = ("image_id", "category_id", "bbox", "score")


def detections_to_coco(results: list[dict], image_ids: list[int], cat_ids: list[int]) -> list[dict]:
    """Convert per-image detections to COCO result records.

    Args:
        results: one dict per image with "scores" [K], "labels" [K] int64 contiguous labels in
            [0, len(cat_ids)), "boxes" [K, 4] xyxy in absolute pixels of the ORIGINAL image.
        image_ids: the COCO image id of each entry of `results`.
        cat_ids: contiguous label i <-> COCO category id cat_ids[i].

    Returns:
        [{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}, ...], boxes
        rounded to 2 decimals (1/100 px cannot move an IoU threshold in practice; it halves the
        size of detections.json). Scores are kept exact so that ranking ties are not created.
    """
    if len(results) != len(image_ids):
        raise ValueError(f"got {len(results)} results but {len(image_ids)} image ids")
    records = []
    for result, image_id in zip(results, image_ids):
        # float64 before subtracting: x2 - x1 in float32 can be off by more than the rounding.
        boxes_xyxy_abs = result["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
        scores = result["scores"].detach().to("cpu", torch.float32).reshape(-1).tolist()
        labels = result["labels"].detach().to("cpu", torch.int64).reshape(-1).tolist()
        if not len(boxes_xyxy_abs) == len(scores) == len(labels):
            raise ValueError(
                f"image {image_id}: {len(boxes_xyxy_abs)} boxes, {len(scores)} scores, {len(labels)} labels"
            )
        if not (torch.isfinite(boxes_xyxy_abs).all() and all(math.isfinite(score) for score in scores)):
            # pycocotools would score NaN boxes (a diverged model once got AP 25 %, AR 100 %)
            raise DivergenceError(f"image {image_id}: the model predicts NaN/inf boxes or scores: its weights have "
                                  "diverged; nothing is scored")
        boxes_xywh_abs = torch.cat([boxes_xyxy_abs[:, :2], boxes_xyxy_abs[:, 2:] - boxes_xyxy_abs[:, :2]], dim=1)
        for box, score, label in zip(boxes_xywh_abs.tolist(), scores, labels):
            if not 0 <= label < len(cat_ids):
                raise ConfigError(
                    f"predicted label {label} is outside the dataset's {len(cat_ids)} categories; "
                    "does the model's num_classes match the dataset?"
                )
            records.append(
                {
                    "image_id": int(image_id),
                    "category_id": int(cat_ids[label]),
                    "bbox": [round(v, 2) for v in box],
                    "score": float(score),
                }
            )
    return records


def _check_records(coco_gt: COCO, detections: list[dict]) -> None:
    """One clear line instead of pycocotools' bare assert / KeyError on malformed records."""
    for i, record in enumerate(detections):
        missing = [k for k in _RECORD_KEYS if k not in record]
        if missing:
            raise DataError(f"detection record {i} lacks key(s) {missing}; expected keys {list(_RECORD_KEYS)}")
        if len(record["bbox"]) != 4:
            raise DataError(f"detection record {i}: bbox {record['bbox']} is not [x, y, w, h]")
        if record["image_id"] not in coco_gt.imgs:
            raise DataError(
                f"detection record {i}: image_id {record['image_id']} is not an image of the ground-truth annotations"
            )


def _empty_results(coco_gt: COCO) -> COCO:
    """A result set with no detections (COCO.loadRes cannot build one: it indexes the first record)."""
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def coco_evaluate(
    coco_gt: COCO, detections: list[dict], image_ids: list[int] | None = None, verbose: bool = True
) -> dict[str, float]:
    """Run COCOeval(iouType="bbox") on COCO result records and return {name: value} for METRIC_NAMES.

    Args:
        coco_gt: ground-truth annotations.
        detections: COCO result records (see `detections_to_coco`); not modified.
        image_ids: evaluate only these images (ground truth of other images is ignored); all if None.
        verbose: print COCOeval's 12-line summary; pycocotools' other chatter is always suppressed.

    With no detections every metric is 0.0, except -1.0 where the ground truth has no object of
    that size (COCOeval's convention for "undefined").
    """
    _check_records(coco_gt, detections)
    # loadRes adds "area", "id", "iscrowd" and a polygon "segmentation" to each record in place.
    detections = [{**record, "bbox": list(record["bbox"])} for record in detections]
    with contextlib.redirect_stdout(io.StringIO()) as chatter:
        coco_dt = coco_gt.loadRes(detections) if detections else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = sorted({int(i) for i in image_ids})
        coco_eval.evaluate()
        coco_eval.accumulate()
        summary_start = chatter.tell()
        coco_eval.summarize()
    if verbose:
        print(chatter.getvalue()[summary_start:], end="")
    return {name: float(value) for name, value in zip(METRIC_NAMES, coco_eval.stats)}


def format_metrics_table(metrics: dict[str, float]) -> str:
    """The 12 metrics as 12 lines in COCOeval's summary layout (no trailing newline)."""
    missing = [name for name in METRIC_NAMES if name not in metrics]
    if missing:
        raise ValueError(f"metrics lack {missing}; expected all of {list(METRIC_NAMES)}")
    lines = []
    for name in METRIC_NAMES:
        kind, iou, area, max_dets = _METRIC_ROWS[name]
        title = "Average Precision" if kind == "AP" else "Average Recall"
        lines.append(
            f" {title:<18} ({kind}) @[ IoU={iou:<9} | area={area:>6} | maxDets={max_dets:>3d} ] = {metrics[name]:0.3f}"
        )
    return "\n".join(lines)


def _to_float32(outputs: Any) -> Any:
    """Cast floating tensors in nested dicts / lists to float32: fp16 boxes lose ~0.5 px at 1000 px."""
    if isinstance(outputs, Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if dataclasses.is_dataclass(outputs) and not isinstance(outputs, type):
        return dataclasses.replace(outputs, **{f.name: _to_float32(getattr(outputs, f.name)) for f in dataclasses.fields(outputs)
                                               if f.init})
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(v) for v in outputs)
    return outputs


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not enabled,
    )


def _loader_length(data_loader: Iterable) -> int | None:
    try:
        return len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _merge_per_image(per_image_per_rank: list[dict[int, list[dict]]]) -> dict[int, list[dict]]:
    """Union of {image_id: records} from all ranks; the first copy of a duplicated image wins.

    A DistributedSampler pads the dataset by repeating images, and a repeated image must count once.
    """
    merged: dict[int, list[dict]] = {}
    for per_image in per_image_per_rank:
        for image_id, records in per_image.items():
            merged.setdefault(image_id, records)
    return merged


def forward_batch(model: nn.Module, batch: Any, device: torch.device, use_amp: bool) -> tuple[Any, Tensor]:
    """The evaluation's forward pass of one Batch already on `device` (also `codetr predict --images`).

    Returns (outputs of `model(images, masks)`, in float32 also under AMP; orig_sizes [B, 2] (h, w) to
    post-process with: the original pixels the (unpadded) input covers; with LSJ the padded square's extent
    ("box_extent"), as mmdet's use_lsj scales and clips to the padded input).
    """
    with autocast_context(device, use_amp):  # the same dtype as in training
        outputs = model(batch.images, batch.masks)
    if use_amp:
        outputs = _to_float32(outputs)
    orig_sizes = torch.stack([torch.as_tensor(t.get("box_extent", t["orig_size"])) for t in batch.targets]).to(device)
    return outputs, orig_sizes


# (outputs of `model(images, masks)`, masks [B, H, W] True = pad, orig_sizes [B, 2] (h, w)) -> per image
# {"scores" [K], "labels" [K] contiguous, "boxes" [K, 4] xyxy abs pixels of the original image}
Postprocess = Callable[[Any, Tensor, Tensor], list[dict]]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data_loader: Iterable,
    coco_gt: COCO,
    cat_ids: list[int],
    device: torch.device | str,
    amp: bool = False,
    progress: bool = True,
) -> tuple[dict[str, float], list[dict]]:
    """Run the model over a loader and COCO-evaluate its detections.

    Args:
        model: called as `model(images [B,3,H,W], masks [B,H,W] True=pad)`; its
            `postprocess(outputs, orig_sizes [B,2] (h, w))` returns per image
            {"scores" [K], "labels" [K] contiguous, "boxes" [K,4] xyxy abs pixels of the original image}.
        data_loader: yields Batches (images, masks, targets with "image_id" and "orig_size").
        coco_gt: ground truth; only the images the loader yields are evaluated.
        cat_ids: contiguous label i <-> COCO category id cat_ids[i].
        device: where the model runs.
        amp: autocast the forward pass (CUDA only; ignored elsewhere).
        progress: show a transient progress bar and print COCOeval's summary (rank 0 only).

    Returns:
        (metrics {name: float}, COCO result records sorted by image id). Under torch.distributed,
        records are gathered from all ranks and rank 0 evaluates; the other ranks return ({}, []).
    """
    def postprocess(outputs: Any, masks: Tensor, orig_sizes: Tensor) -> list[dict]:
        return model.postprocess(outputs, orig_sizes)

    return evaluate_branches(model, data_loader, coco_gt, cat_ids, device, {"detr": postprocess}, amp, progress)["detr"]


@torch.no_grad()
def evaluate_branches(
    model: nn.Module,
    data_loader: Iterable,
    coco_gt: COCO,
    cat_ids: list[int],
    device: torch.device | str,
    postprocessors: dict[str, Postprocess],
    amp: bool = False,
    progress: bool = True,
) -> dict[str, tuple[dict[str, float], list[dict]]]:
    """`evaluate` for several post-processings of one forward pass per batch (e.g. the one-to-one head and
    Co-DETR's auxiliary heads, see codetr.engine.branch_eval).

    postprocessors: name -> Postprocess(outputs, masks, orig_sizes) -> per image results (see `evaluate`).
    Returns name -> (metrics, records sorted by image id); ({}, []) on ranks other than 0. COCOeval's
    summary is printed (with `progress`) only when there is one post-processing.
    """
    device = torch.device(device)
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    use_amp = amp and device.type == "cuda"
    was_training = model.training
    model.eval()

    per_image: dict[str, dict[int, list[dict]]] = {name: {} for name in postprocessors}
    with _progress_bar(progress and rank == 0) as bar:
        task = bar.add_task("eval", total=_loader_length(data_loader))
        for batch in data_loader:
            batch = batch.to(device)
            outputs, orig_sizes = forward_batch(model, batch, device, use_amp)
            image_ids = [int(t["image_id"]) for t in batch.targets]
            for name, postprocess in postprocessors.items():
                results = postprocess(outputs, batch.masks, orig_sizes)
                for image_id, result in zip(image_ids, results):
                    # setdefault: an image repeated in the loader counts once, as across ranks.
                    per_image[name].setdefault(image_id, detections_to_coco([result], [image_id], cat_ids))
            bar.advance(task)
    model.train(was_training)

    if distributed:
        gathered: list[dict[str, dict[int, list[dict]]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_image)
        if rank != 0:
            return {name: ({}, []) for name in postprocessors}
        per_image = {name: _merge_per_image([g[name] for g in gathered if g is not None]) for name in postprocessors}

    outcome = {}
    for name, images in per_image.items():
        if not images:
            raise DataError("the evaluation data loader yielded no images; nothing to evaluate")
        records = [record for image_id in sorted(images) for record in images[image_id]]
        metrics = coco_evaluate(coco_gt, records, image_ids=sorted(images), verbose=progress and len(per_image) == 1)
        outcome[name] = (metrics, records)
    return outcome


def write_eval_outputs(
    out_dir: Path, metrics: dict[str, float], detections: list[dict], extra: dict | None = None, suffix: str = ""
) -> tuple[Path, Path]:
    """Atomically write out_dir/metrics{suffix}.json ({metric: value, **extra}) and out_dir/detections{suffix}.json.

    detections.json is a plain COCO results list, loadable by `COCO.loadRes`. Path values in `extra`
    are written as strings. suffix: e.g. "_atss" for an auxiliary head's files. Returns (metrics_path,
    detections_path).
    """
    out_dir = Path(out_dir)
    extra = {k: str(v) if isinstance(v, Path) else v for k, v in (extra or {}).items()}
    clashes = sorted(set(extra) & set(metrics))
    if clashes:
        raise ValueError(f"extra keys {clashes} would overwrite metrics of the same name")
    metrics_path = out_dir / f"metrics{suffix}.json"
    detections_path = out_dir / f"detections{suffix}.json"
    # Two files cannot be replaced in one atomic step. The detections go first, and metrics.json, written last,
    # records their hash: a kill between the two leaves a pair that `check_eval_outputs` sees does not match.
    # No indentation: COCO-sized result lists are hundreds of thousands of records.
    detections_bytes = (json.dumps(detections) + "\n").encode("utf-8")
    atomic_write_bytes(detections_path, detections_bytes)
    atomic_write_json(metrics_path, {**{k: float(v) for k, v in metrics.items()}, **extra,
                                     DETECTIONS_HASH_KEY: hashlib.sha256(detections_bytes).hexdigest()})
    return metrics_path, detections_path


DETECTIONS_HASH_KEY = "detections_sha256"


def check_eval_outputs(metrics_path: Path, detections_path: Path) -> None:
    """Raise DataError unless `detections_path` is the file `metrics_path` was computed from (by its hash)."""
    recorded = json.loads(Path(metrics_path).read_text()).get(DETECTIONS_HASH_KEY)
    actual = hashlib.sha256(Path(detections_path).read_bytes()).hexdigest()
    if recorded != actual:
        raise DataError(f"{detections_path} is not the detections {metrics_path} was computed from (the writing "
                        "process was killed between the two files?): evaluate again")
