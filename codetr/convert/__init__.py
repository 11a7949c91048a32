"""Checkpoint conversion from other frameworks (mmdetection 3.x, Sense-X/Co-DETR) to codetr.

    converted = convert_file("co_deformable_detr_r50_1x_coco.pth")   # the source is read off the key names
    save_checkpoint("co_deformable_detr_r50.pt", converted.checkpoint)

Each source is a module `codetr/convert/<source>.py` with `convert(state_dict) -> Conversion`
(codetr/convert/common.py), listed in CONVERTERS. `convert_file` reads the file safely
(codetr/convert/reading.py), converts its state dict and wraps it as an ordinary codetr checkpoint
(what `codetr.engine.inference.load_detector` reads: model, config, num_classes, cat_ids, class_names,
position). `load_any_checkpoint` is what every command's `--ckpt` goes through: a codetr checkpoint as
it is, a foreign one converted in memory.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import Tensor

from codetr.config import Config, get_preset
from codetr.presets import PRESETS
from codetr.convert.coco import COCO_CAT_IDS, COCO_CLASS_NAMES
from codetr.convert.common import Conversion, ConversionError
from codetr.convert.reading import ForeignCheckpoint, read_foreign_checkpoint
from codetr.errors import CheckpointError

# source name (the values of `codetr convert --from`) -> module with convert(state_dict) -> Conversion
CONVERTERS: dict[str, str] = {
    "mmdet3": "codetr.convert.mmdet3",
    "sensex": "codetr.convert.sensex",
}
# A key only that source's models have (used when --from is not given).
_SOURCE_MARKERS: dict[str, tuple[str, ...]] = {
    "sensex": ("query_head.",),  # Co-DETR's detector: query_head + rpn_head / roi_head / bbox_head
    "mmdet3": ("level_embed", "encoder.layers.", "bbox_head.cls_branches."),  # mmdet 3.x DeformableDETR
}
CODETR_FORMAT_KEYS = ("model", "config", "num_classes")


def get_converter(source: str) -> Callable[[dict[str, Tensor]], Conversion]:
    if source not in CONVERTERS:
        raise ConversionError(f"--from {source!r}: expected one of {', '.join(CONVERTERS)}")
    return importlib.import_module(CONVERTERS[source]).convert


def _first_keys(state_dict: dict[str, Tensor], limit: int = 5) -> str:
    keys = list(state_dict)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} keys)" if len(keys) > limit else "")


def detect_source(state_dict: dict[str, Tensor], file: str | Path = "the checkpoint") -> str:
    """The source whose key names the state dict has; ConversionError naming its first keys if none."""
    for source, markers in _SOURCE_MARKERS.items():
        if any(key == marker or (marker.endswith(".") and key.startswith(marker)) for key in state_dict for marker in markers):
            return source
    raise ConversionError(f"{file}: not a checkpoint codetr converts (Sense-X Co-DETR: query_head.*; mmdet 3.x "
                          f"Deformable-DETR: level_embed, encoder.layers.*); unmapped keys: {_first_keys(state_dict)}")


def class_metadata(meta: dict[str, Any], num_classes: int) -> tuple[list[int], list[str]]:
    """(category ids, class names) of a foreign checkpoint's classes.

    The names come from `meta.dataset_meta.classes` (mmdet 3.x) or `meta.CLASSES` (mmdet 2.x). When they
    are COCO's 80 classes, the ids are COCO 2017's (1..90 with gaps), so detections evaluate against COCO
    annotations; otherwise the ids are 1..N and the names those of meta (or "class_<id>" without them).
    """
    dataset_meta = meta.get("dataset_meta")
    names = dataset_meta.get("classes") if isinstance(dataset_meta, dict) else None
    names = names if names is not None else meta.get("CLASSES")
    if names is not None:
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"meta class names: expected a list of strings, got {type(names).__name__}")
        if len(names) != num_classes:
            raise CheckpointError(f"meta names {len(names)} classes but the weights predict {num_classes}")
        if tuple(names) == COCO_CLASS_NAMES:
            return list(COCO_CAT_IDS), list(COCO_CLASS_NAMES)
        return list(range(1, num_classes + 1)), list(names)
    return list(range(1, num_classes + 1)), [f"class_{i}" for i in range(1, num_classes + 1)]


def _preset_name(cfg_model: Any, source: str) -> str:
    """The preset whose model is exactly the converted one, else `converted-<source>`."""
    return next((name for name in PRESETS if get_preset(name).model == cfg_model), f"converted-{source}")


@dataclass
class ConvertedCheckpoint:
    source: str
    checkpoint: dict[str, Any]  # an ordinary codetr checkpoint (no optimizer: it cannot resume training)
    skipped_keys: list[str] = field(default_factory=list)  # foreign tensors not carried
    skipped_entries: list[str] = field(default_factory=list)  # top-level entries not read (optimizer, ...)
    stand_ins: list[str] = field(default_factory=list)  # OpenMMLab classes read as inert records


def uses_lsj(meta: dict[str, Any]) -> bool:
    """Whether the checkpoint's own config text (mmdet 3: meta["cfg"], mmdet 2: meta["config"]) trained and
    tests with large-scale jitter: mmdet 3's `use_lsj=True`, Sense-X's `with_attn_mask=False` (no padding
    mask). A state dict alone cannot tell."""
    text = meta.get("cfg") or meta.get("config")
    if not isinstance(text, str):
        return False
    compact = "".join(text.split())
    return "use_lsj=True" in compact or "with_attn_mask=False" in compact


def to_codetr_checkpoint(conversion: Conversion, foreign: ForeignCheckpoint, source: str, file: str | Path) -> dict[str, Any]:
    name = _preset_name(conversion.model, source)
    # the matching preset's data and schedule (a state dict has neither), the model read off the weights
    cfg = get_preset(name) if name in PRESETS else Config(preset=name)
    cfg.model = conversion.model
    cfg.data.lsj = uses_lsj(foreign.meta)
    cat_ids, class_names = class_metadata(foreign.meta, conversion.num_classes)
    epoch = foreign.meta.get("epoch", 0)
    return {
        "format_version": 1,
        "model": conversion.state_dict,
        "ema": None,
        "config": cfg.to_dict(),
        "num_classes": conversion.num_classes,
        "cat_ids": cat_ids,
        "class_names": class_names,
        "position": {"epoch": int(epoch) if isinstance(epoch, (int, np.integer)) else 0, "iteration": 0, "step": 0},
        "converted_from": {"source": source, "file": str(file), "skipped": list(conversion.skipped)},
    }


def convert_foreign(foreign: ForeignCheckpoint, file: str | Path, source: str | None = None) -> ConvertedCheckpoint:
    """Convert an already read foreign checkpoint (source read off the keys when None)."""
    if source is None:
        source = detect_source(foreign.state_dict, file)
    converter = get_converter(source)
    try:
        conversion = converter(foreign.state_dict)
    except ConversionError as error:
        raise ConversionError(f"{file}: {error}") from None
    return ConvertedCheckpoint(source, to_codetr_checkpoint(conversion, foreign, source, file), list(conversion.skipped),
                               list(foreign.skipped), list(foreign.stand_ins))


def convert_file(path: str | Path, source: str | None = None) -> ConvertedCheckpoint:
    """Read a foreign checkpoint safely and convert it (source read off the keys when None)."""
    file = Path(path)
    if source is not None:
        get_converter(source)  # an unknown --from is an error before the file is read
    foreign = read_foreign_checkpoint(file)
    if source is None and all(k in foreign.skipped + ["model"] for k in CODETR_FORMAT_KEYS):
        raise ConversionError(f"{file} is already a codetr checkpoint")
    return convert_foreign(foreign, file, source)


def load_any_checkpoint(path: str | Path) -> dict[str, Any]:
    """A codetr checkpoint as it is, or a foreign one (Sense-X, mmdet 3.x) converted in memory."""
    from codetr.engine.checkpoint import IncompleteCheckpoint, load_checkpoint

    try:
        return load_checkpoint(path)
    except IncompleteCheckpoint:
        raise  # a codetr checkpoint with keys missing: not a foreign file
    except CheckpointError as codetr_error:
        if not Path(path).is_file():
            raise codetr_error from None
    return convert_foreign(read_foreign_checkpoint(path), path).checkpoint


def describe_skipped(keys: list[str]) -> list[str]:
    """One line per kind of skipped foreign key, saying why it is not carried."""
    from codetr.convert.sensex import UNREPRESENTABLE

    counters = [k for k in keys if k.endswith("num_batches_tracked")]
    lines = [f"{len(counters)} BatchNorm num_batches_tracked counters (codetr's BatchNorm is frozen: no counter)"] if counters else []
    lines += [f"{k}: {UNREPRESENTABLE[k]}" for k in keys if k in UNREPRESENTABLE]
    others = [k for k in keys if k not in counters and k not in UNREPRESENTABLE]
    if others:
        lines.append(f"{len(others)} other keys: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}")
    return lines
