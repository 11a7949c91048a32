"""`codetr predict --images`: batch inference over a folder or glob of images, written as a COCO results file.

No ground truth is needed. Each image gets a COCO image id: from an annotation file's `images` list (matched on
file name) when one is given, else 1..N in sorted file-name order (written to images.json). Labels map to the
checkpoint's category ids as in evaluation, so detections.json is directly scorable with pycocotools.

The preprocessing, batching (data.batch_size, images in id order, padded by `collate`), forward pass and
post-processing are the evaluation's own (`eval_transforms`, `forward_batch`, `model.postprocess`,
`detections_to_coco`): on the validation folder the records equal `codetr eval`'s detections.json.
"""
from __future__ import annotations

import glob
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Dataset

from codetr.data.collate import Batch, collate
from codetr.data.loaders import eval_transforms
from codetr.engine.evaluate import detections_to_coco, forward_batch
from codetr.engine.inference import LoadedDetector, open_image
from codetr.errors import DataError
from codetr.io import atomic_write_json, check_writable_dir
from codetr.visualize import draw_detections, save_png

# Files a folder is searched for (case-insensitive); a glob keeps only these too.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif",
                            ".ppm", ".pgm", ".pbm", ".pnm"})
DETECTIONS_FILE = "detections.json"
IMAGES_FILE = "images.json"
DRAWN_FOLDER = "drawn"


@dataclass(frozen=True)
class ImageEntry:
    """One image to predict: its COCO id, its file, and (from an annotation file) the (width, height) it must have."""

    image_id: int
    path: Path
    expected_wh: tuple[int, int] | None = None

    @property
    def file_name(self) -> str:
        return self.path.name


def _has_glob(pattern: str) -> bool:
    return any(char in pattern for char in "*?[")


def find_images(pattern: str) -> list[Path]:
    """The image files of `pattern`: a folder (its image files, not recursive) or a glob (`**` recurses), by
    extension (IMAGE_SUFFIXES, any case), sorted by file name. DataError naming the pattern if there are none,
    or if two files share a name (COCO file names must be unique)."""
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        try:
            candidates = [Path(expanded) / name for name in os.listdir(expanded)]
        except OSError as error:
            raise DataError(f"--images {pattern}: cannot list the folder ({error.strerror})") from None
        where = f"the folder {pattern} holds"
    elif _has_glob(expanded) or os.path.isfile(expanded):
        candidates = [Path(name) for name in glob.glob(expanded, recursive=True)]
        where = f"the pattern {pattern!r} matches"
    else:
        raise DataError(f"--images {pattern}: no such folder or file (expected a folder or a glob such as 'dir/*.jpg')")
    files = [path for path in candidates if path.is_file()]
    images = [path for path in files if path.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        found = f"{len(files)} file(s) but none with" if files else "no file with"
        raise DataError(f"no images: {where} {found} an image extension (.jpg, .jpeg, .png, .bmp, .webp, .tif, ...)")
    images.sort(key=lambda path: (path.name, str(path)))
    for first, second in zip(images, images[1:]):
        if first.name == second.name:
            raise DataError(f"two images in {where} are named {first.name}: {first} and {second}; "
                            "COCO file names must be unique")
    return images


def _ann_images(ann_file: Path) -> tuple[list[dict], list[int] | None]:
    """(`images` entries with id and file_name, sorted category ids or None) of a COCO annotation / image-info
    file (annotations are not needed: COCO's test-dev image_info files work too)."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise DataError(f"--ann {ann_file}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"--ann {ann_file}: not a readable JSON file ({error})") from None
    images = dataset.get("images") if isinstance(dataset, dict) else None
    if not isinstance(images, list):
        raise DataError(f"--ann {ann_file}: expected a COCO annotation file with an 'images' list")
    for i, entry in enumerate(images):
        if not isinstance(entry, dict) or "id" not in entry or "file_name" not in entry:
            raise DataError(f"--ann {ann_file}: images[{i}] must be an object with keys 'id' and 'file_name'")
    categories = dataset.get("categories")
    cat_ids = sorted(c["id"] for c in categories if isinstance(c, dict) and "id" in c) if categories else None
    return images, cat_ids


def assign_image_ids(paths: list[Path], ann_file: Path | None = None) -> tuple[list[ImageEntry], list[int] | None]:
    """COCO image ids for `paths` (sorted by file name): (entries in id order, the annotation file's sorted
    category ids or None).

    Without `ann_file`: 1..N in the given order. With it: the id of the `images` entry whose file_name (its
    last component) equals the file's name; a file the annotation file does not list is a DataError.
    """
    if ann_file is None:
        return [ImageEntry(index + 1, path) for index, path in enumerate(paths)], None
    images, ann_cat_ids = _ann_images(ann_file)
    by_name: dict[str, dict] = {}
    for entry in images:
        by_name.setdefault(Path(str(entry["file_name"])).name, entry)
    unlisted = [path for path in paths if path.name not in by_name]
    if unlisted:
        raise DataError(f"--ann {ann_file}: {len(unlisted)} image(s) are not in its 'images' list, e.g. {unlisted[0]}")
    entries = []
    for path in paths:
        entry = by_name[path.name]
        width, height = entry.get("width"), entry.get("height")
        size = (width, height) if isinstance(width, int) and isinstance(height, int) else None
        entries.append(ImageEntry(int(entry["id"]), path, size))
    return sorted(entries, key=lambda e: e.image_id), ann_cat_ids


class ImageFiles(Dataset):
    """The entries' images with the evaluation's transforms: (image float [3, H, W] normalised, target with
    "image_id", "orig_size" [2] (h, w), "size", "path"); an unusable file gives (None, {"path", "error"})."""

    def __init__(self, entries: list[ImageEntry], transforms: Any) -> None:
        self.entries = entries
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, dict]:
        entry = self.entries[index]
        try:
            image = open_image(entry.path)
        except DataError as error:
            return None, {"path": str(entry.path), "error": str(error)}
        if entry.expected_wh is not None and image.size != entry.expected_wh:
            return None, {"path": str(entry.path), "error": f"image {entry.path} is {image.width}x{image.height} but "
                          f"--ann says {entry.expected_wh[0]}x{entry.expected_wh[1]} (width x height)"}
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": entry.image_id,
                  "orig_size": size, "size": size.clone(), "path": str(entry.path)}
        return self.transforms(image, target)


def collate_readable(samples: list[tuple[torch.Tensor | None, dict]]) -> tuple[Batch | None, list[dict]]:
    """(the readable samples as a padded Batch, or None if there are none; the unusable ones' {"path", "error"})."""
    readable = [sample for sample in samples if sample[0] is not None]
    failed = [target for image, target in samples if image is None]
    return (collate(readable) if readable else None), failed


@dataclass
class BatchPrediction:
    """What `predict_images` did: the files written, and the images predicted / skipped."""

    detections_path: Path
    images_path: Path | None
    drawn_dir: Path | None
    num_images: int
    num_detections: int
    seconds: float
    skipped: list[str] = field(default_factory=list)  # paths of the unusable files

    def summary(self) -> list[str]:
        """The lines `codetr predict --images` prints when done."""
        text = (f"predicted {self.num_images} images in {self.seconds:.1f} s: {self.num_detections} detections "
                f"written to {self.detections_path}")
        if self.images_path is not None:
            text += f", image ids in {self.images_path}"
        if self.drawn_dir is not None:
            text += f", drawings in {self.drawn_dir}"
        lines = [text]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unreadable image(s): {', '.join(self.skipped)}")
        return lines


def _progress(console: Console | None, enabled: bool) -> Progress:
    return Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=True, disable=not enabled)


def drawing_names(entries: list[ImageEntry]) -> dict[Path, str]:
    """The PNG name of each image's drawing: <stem>.png, or <file name>.png where stems clash (a.jpg, a.png)."""
    stems = Counter(entry.path.stem for entry in entries)
    return {entry.path: f"{entry.path.stem if stems[entry.path.stem] == 1 else entry.file_name}.png"
            for entry in entries}


def _draw(detector: LoadedDetector, path: Path, result: dict[str, torch.Tensor], file: Path, threshold: float) -> None:
    """Draw one image's detections scoring >= threshold to `file` (boxes xyxy in original pixels)."""
    result = {k: v.cpu() for k, v in result.items()}
    drawn = draw_detections(open_image(path), result["boxes"], result["labels"], result["scores"],
                            detector.class_names, threshold)
    save_png(drawn, file)


@torch.no_grad()
def predict_images(detector: LoadedDetector, entries: list[ImageEntry], out_dir: Path, write_images_json: bool,
                   draw_threshold: float | None = None, console: Console | None = None, progress: bool = True
                   ) -> BatchPrediction:
    """Predict every entry as `codetr eval` does and write out_dir/detections.json (COCO results: {image_id,
    category_id, bbox [x, y, w, h] in original pixels, score}, sorted by image id; every detection, unthresholded),
    and with `write_images_json` out_dir/images.json ({"images": [{id, file_name, width, height}]}). With
    `draw_threshold`, also out_dir/drawn/<stem>.png (see `drawing_names`) with the detections scoring at least that.

    An unusable image is skipped with one "warning:" line on `console`; DataError if no image could be read.
    """
    start = time.perf_counter()
    device = next(detector.model.parameters()).device
    data_cfg = detector.cfg.data
    loader = DataLoader(ImageFiles(entries, eval_transforms(data_cfg)), batch_size=data_cfg.batch_size,
                        shuffle=False, collate_fn=collate_readable, num_workers=data_cfg.num_workers,
                        generator=torch.Generator().manual_seed(0))  # predicting must not move the global RNG
    records: list[dict] = []
    images: list[dict] = []
    skipped: list[str] = []
    drawn_dir = out_dir / DRAWN_FOLDER if draw_threshold is not None else None
    drawn_names = drawing_names(entries)
    detector.model.eval()
    with _progress(console, progress) as bar:
        task = bar.add_task("predict", total=len(entries))
        for batch, failed in loader:
            for failure in failed:
                bar.console.print(f"warning: {failure['error']}; skipped", markup=False, highlight=False,
                                  soft_wrap=True)
                skipped.append(failure["path"])
            if batch is not None:
                batch = batch.to(device)
                outputs, orig_sizes = forward_batch(detector.model, batch, device, use_amp=False)
                results = detector.model.postprocess(outputs, orig_sizes)
                for target, result in zip(batch.targets, results):
                    image_id = int(target["image_id"])
                    records.extend(detections_to_coco([result], [image_id], detector.cat_ids))
                    height, width = (int(v) for v in target["orig_size"])
                    images.append({"id": image_id, "file_name": Path(target["path"]).name,
                                   "width": width, "height": height})
                    if drawn_dir is not None:
                        path = Path(target["path"])
                        _draw(detector, path, result, drawn_dir / drawn_names[path], draw_threshold)
            bar.advance(task, len(failed) + (len(batch) if batch is not None else 0))
    if not images:
        raise DataError(f"none of the {len(entries)} image(s) could be read (e.g. {skipped[0]}); nothing written")
    records.sort(key=lambda record: record["image_id"])  # stable: each image's records keep their order
    detections_path = out_dir / DETECTIONS_FILE
    atomic_write_json(detections_path, records, indent=None)
    images_path = None
    if write_images_json:
        images_path = out_dir / IMAGES_FILE
        atomic_write_json(images_path, {"images": sorted(images, key=lambda image: image["id"])})
    return BatchPrediction(detections_path, images_path, drawn_dir, len(images), len(records),
                           time.perf_counter() - start, skipped)


def run_batch_predict(ckpt: Path, pattern: str, out_dir: Path, ann_file: Path | None, draw_threshold: float | None,
                      device: str = "", console: Console | None = None) -> BatchPrediction:
    """`codetr predict --images`: check --out, find the images and their ids (all before the model is loaded),
    then load the checkpoint and run `predict_images` into `out_dir`."""
    from codetr.engine.distributed import init_distributed
    from codetr.engine.inference import load_detector

    check_writable_dir(out_dir, "--out")
    entries, ann_cat_ids = assign_image_ids(find_images(pattern), ann_file)
    detector = load_detector(ckpt, init_distributed(device).device)
    if ann_cat_ids is not None and ann_cat_ids != sorted(detector.cat_ids):
        raise DataError(f"--ann {ann_file}: categories {ann_cat_ids} differ from the checkpoint's {detector.cat_ids}")
    return predict_images(detector, entries, out_dir, write_images_json=ann_file is None,
                          draw_threshold=draw_threshold, console=console)
