"""COCO-format detection dataset: one loader for real COCO 2017 and the generated data.

The annotation file is validated once, at construction, so a bad file fails with one line naming
the file, annotation and value instead of a crash deep inside a DataLoader worker.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from codetr.errors import ConfigError, DataError

INVALID_BOX_POLICIES = ("error", "drop")
_TOP_LEVEL_KEYS = ("images", "annotations", "categories")
_IMAGE_KEYS = ("id", "file_name", "width", "height")
_CATEGORY_KEYS = ("id", "name")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")

Transform = Callable[[Image.Image, dict], tuple[Any, dict]]


def resolve_coco_split(data_dir: Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation file) of `split` in the COCO 2017 layout under `data_dir`.

    Expects data_dir/{split}2017/ and data_dir/annotations/instances_{split}2017.json.
    """
    data_dir = Path(data_dir)
    image_dir = data_dir / f"{split}2017"
    ann_file = data_dir / "annotations" / f"instances_{split}2017.json"
    if not data_dir.is_dir():
        raise DataError(f"data directory not found: {data_dir}")
    for path, kind in ((image_dir, "image folder"), (ann_file, "annotation file")):
        if not path.exists():
            raise DataError(
                f"{kind} not found: {path} (expected the COCO 2017 layout: {split}2017/ and "
                f"annotations/instances_{split}2017.json under {data_dir})"
            )
    return image_dir, ann_file


def _load_json(ann_file: Path) -> dict:
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{ann_file}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno} (char {e.pos})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{ann_file}: not valid JSON: not UTF-8 text (byte {e.start})") from e
    except RecursionError:
        raise DataError(f"{ann_file}: not a COCO file: JSON nested too deeply to read") from None
    if not isinstance(dataset, dict):
        raise DataError(f"{ann_file}: top level must be a JSON object with keys {list(_TOP_LEVEL_KEYS)}")
    missing = [k for k in _TOP_LEVEL_KEYS if k not in dataset]
    if missing:
        raise DataError(f"{ann_file}: missing top-level key(s) {missing} (a COCO file has {list(_TOP_LEVEL_KEYS)})")
    for key in _TOP_LEVEL_KEYS:
        if not isinstance(dataset[key], list):
            raise DataError(f"{ann_file}: top-level key {key!r} must be a list, got {type(dataset[key]).__name__}")
    return dataset


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _index_entries(entries: list, required: tuple[str, ...], kind: str, ann_file: Path) -> dict[int, dict]:
    """id -> entry for the "images", "categories" or "annotations" list: required keys, integer and unique ids.
    A duplicate annotation id matters too: pycocotools indexes ground truth by id, so evaluation would silently
    keep one of the two."""
    if not entries and kind != "annotations":
        raise DataError(f"{ann_file}: '{kind}' is empty: expected at least one entry")
    by_id: dict[int, dict] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(k not in entry for k in required):
            raise DataError(f"{ann_file}: {kind}[{i}] must be an object with keys {list(required)}, got {entry!r:.200}")
        if not _is_int(entry["id"]):
            raise DataError(f"{ann_file}: {kind}[{i}] has id {entry['id']!r}: expected an integer")
        if entry["id"] in by_id:
            raise DataError(f"{ann_file}: duplicate {kind} id {entry['id']!r} ({kind}[{i}])")
        if kind == "images":
            _check_image_entry(entry, ann_file)
        by_id[entry["id"]] = entry
    return by_id


def _check_image_entry(image: dict, ann_file: Path) -> None:
    """An image's size must be positive integers and its file a plain path inside the image folder."""
    where = f"{ann_file}: image {image['id']}"
    for key in ("width", "height"):
        if not _is_int(image[key]) or image[key] <= 0:
            raise DataError(f"{where}: {key} {image[key]!r}: expected a positive integer")
    name = image["file_name"]
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"{where}: file_name {name!r}: expected a file name relative to the image folder")
    path = Path(name)
    if path.is_absolute() or ".." in path.parts:  # would read a file outside the dataset
        raise DataError(f"{where}: file_name {name!r} must stay inside the image folder (no absolute path, no '..')")


def _check_bbox(ann: dict, image: dict, ann_file: Path) -> str | None:
    """None if the annotation's [x, y, w, h] box is usable, else why it is degenerate."""
    bbox = ann["bbox"]
    if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        raise DataError(
            f"{ann_file}: annotation {ann['id']} (image {ann['image_id']}): bbox must be 4 finite numbers "
            f"[x, y, w, h], got {bbox!r:.200}"
        )
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "has a non-positive width or height"
    if x >= image["width"] or y >= image["height"] or x + w <= 0 or y + h <= 0:
        return f"lies entirely outside its {image['width']}x{image['height']} image"
    return None


def _validate_annotations(annotations: list, images: dict[int, dict], categories: dict[int, dict],
                          ann_file: Path, invalid_boxes: str) -> tuple[list[dict], int]:
    """Check every annotation; returns (annotations to keep, number of degenerate boxes dropped)."""
    kept: list[dict] = []
    num_dropped = 0
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or any(k not in ann for k in _ANNOTATION_KEYS):
            raise DataError(
                f"{ann_file}: annotations[{i}] must be an object with keys {list(_ANNOTATION_KEYS)}, got {ann!r:.200}"
            )
        where = f"annotation {ann['id']} (image {ann['image_id']})"
        for key in ("image_id", "category_id"):
            if not _is_int(ann[key]):
                raise DataError(f"{ann_file}: {where}: {key} {ann[key]!r}: expected an integer id")
        if ann.get("iscrowd", 0) not in (0, 1) or isinstance(ann.get("iscrowd", 0), (bool, float)):
            raise DataError(f"{ann_file}: {where}: iscrowd {ann['iscrowd']!r}: expected 0 or 1")
        if ann["image_id"] not in images:
            raise DataError(f"{ann_file}: {where} refers to an image id that is not in 'images'")
        if ann["category_id"] not in categories:
            raise DataError(
                f"{ann_file}: {where} has category_id {ann['category_id']!r}, which is not in 'categories' "
                f"(ids {sorted(categories)})"
            )
        problem = _check_bbox(ann, images[ann["image_id"]], ann_file)
        if problem is not None:
            if invalid_boxes == "error":
                raise DataError(
                    f"{ann_file}: {where}: degenerate bbox {ann['bbox']} [x, y, w, h] {problem}; "
                    "set data.invalid_boxes=drop to skip them"
                )
            num_dropped += 1
            continue
        area = ann.get("area", 0)  # COCOeval sorts ground truth into small / medium / large by it
        if isinstance(area, bool) or not isinstance(area, (int, float)) or not math.isfinite(area) or area < 0:
            raise DataError(f"{ann_file}: {where}: area {area!r}: expected a finite number >= 0 (pixels)")
        kept.append(ann)
    return kept, num_dropped


def _make_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
        coco.createIndex()
    return coco


class CocoDetection(Dataset):
    """COCO-format detection dataset returning (image, target) pairs.

    Contiguous labels: label i <-> COCO category id `cat_ids[i]` (sorted ids), name `class_names[i]`.

    The target before transforms:
        "boxes":     float32 [N, 4] xyxy in absolute pixels, clipped to the image
        "labels":    int64 [N], contiguous labels
        "image_id":  int, the COCO image id
        "orig_size": int64 [2] (h, w) of the image file
        "size":      int64 [2] (h, w), updated by the transforms
    iscrowd=1 annotations are left out of the targets (they stay in `coco` for evaluation). An
    image without annotations gives N = 0 and trains as background.

    Args:
        image_dir: folder holding the images named by "file_name".
        ann_file: COCO instances JSON.
        transforms: called as transforms(image, target) -> (image, target).
        invalid_boxes: "error" raises on a degenerate box (w <= 0, h <= 0, or entirely outside its
            image); "drop" skips such boxes with one warning (they are also removed from `coco`).
    """

    def __init__(self, image_dir: Path, ann_file: Path, transforms: Transform | None = None,
                 invalid_boxes: str = "error") -> None:
        if invalid_boxes not in INVALID_BOX_POLICIES:
            raise ConfigError(f"data.invalid_boxes must be one of {list(INVALID_BOX_POLICIES)}, got {invalid_boxes!r}")
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms

        dataset = _load_json(self.ann_file)
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir} (images of {self.ann_file})")
        images = _index_entries(dataset["images"], _IMAGE_KEYS, "images", self.ann_file)
        categories = _index_entries(dataset["categories"], _CATEGORY_KEYS, "categories", self.ann_file)
        _index_entries(dataset["annotations"], _ANNOTATION_KEYS, "annotations", self.ann_file)
        kept, num_dropped = _validate_annotations(
            dataset["annotations"], images, categories, self.ann_file, invalid_boxes
        )
        if num_dropped:
            warnings.warn(
                f"{self.ann_file}: dropped {num_dropped} degenerate box(es) (data.invalid_boxes=drop)",
                stacklevel=2,
            )
        self.coco = _make_coco({**dataset, "annotations": kept})

        self.ids: list[int] = sorted(images)
        self.cat_ids: list[int] = sorted(categories)
        self.class_names: list[str] = [str(categories[c]["name"]) for c in self.cat_ids]
        self.num_classes: int = len(self.cat_ids)
        self._targets = self._build_targets(kept, images)

    def _build_targets(self, annotations: list[dict], images: dict[int, dict]
                       ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """image id -> (boxes [N, 4] xyxy abs clipped, labels [N]), crowd annotations left out."""
        label_of = {cat_id: i for i, cat_id in enumerate(self.cat_ids)}
        per_image: dict[int, tuple[list, list]] = {image_id: ([], []) for image_id in images}
        for ann in annotations:
            if ann.get("iscrowd", 0):
                continue
            image = images[ann["image_id"]]
            x, y, w, h = ann["bbox"]
            # Clip boxes that stick out of the image (validation removed the entirely-outside ones).
            box = [max(0.0, x), max(0.0, y), min(float(image["width"]), x + w), min(float(image["height"]), y + h)]
            boxes, labels = per_image[ann["image_id"]]
            boxes.append(box)
            labels.append(label_of[ann["category_id"]])
        return {
            image_id: (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64))
            for image_id, (boxes, labels) in per_image.items()
        }

    def __len__(self) -> int:
        return len(self.ids)

    def num_boxes(self) -> int:
        """The number of ground-truth boxes the targets hold (crowd and dropped boxes left out)."""
        return sum(len(labels) for _, labels in self._targets.values())

    def get_image_info(self, idx: int) -> dict:
        """The COCO "images" entry (id, file_name, width, height, ...) of sample `idx`."""
        return dict(self.coco.imgs[self.ids[idx]])

    def load_image(self, idx: int) -> Image.Image:
        """The RGB image of sample `idx`, fully decoded; DataError if missing, unreadable or mis-sized."""
        info = self.coco.imgs[self.ids[idx]]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"image file not found: {path} (image id {info['id']} in {self.ann_file})")
        try:
            with Image.open(path) as image:
                image.load()  # decode now, so a truncated file fails here and not in a transform
                image = image.convert("RGB")
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path} (image id {info['id']}): {e}") from e
        if image.size != (info["width"], info["height"]):
            raise DataError(
                f"image {path} is {image.width}x{image.height} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (width x height)"
            )
        return image

    def __getitem__(self, idx: int) -> tuple[Any, dict]:
        image = self.load_image(idx)
        image_id = self.ids[idx]
        boxes, labels = self._targets[image_id]
        size = torch.tensor([image.height, image.width], dtype=torch.int64)
        target = {
            "boxes": torch.from_numpy(boxes.copy()),
            "labels": torch.from_numpy(labels.copy()),
            "image_id": image_id,
            "orig_size": size,
            "size": size.clone(),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
