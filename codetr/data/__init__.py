"""Data pipeline: COCO-format datasets (real COCO or the generated default), transforms, batching."""
from codetr.data.coco import CocoDetection, resolve_coco_split
from codetr.data.collate import Batch, collate
from codetr.data.synth import default_data_dir, ensure_default_dataset, generate_synthetic_coco
from codetr.data.transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    make_test_transforms,
    make_train_transforms,
)

__all__ = [
    "Batch",
    "CocoDetection",
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "RandomResize",
    "RandomSelect",
    "RandomSizeCrop",
    "ToTensor",
    "collate",
    "default_data_dir",
    "ensure_default_dataset",
    "generate_synthetic_coco",
    "make_test_transforms",
    "make_train_transforms",
    "resolve_coco_split",
]
