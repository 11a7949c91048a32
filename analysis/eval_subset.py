"""What the analyses share: the first N validation images as a loader, and ground truth in pixels.

The analyses read the validation split with the test-time resize (no augmentation), in dataset order,
so two checkpoints (or two runs) are measured on exactly the same images.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.config import DataConfig
from codetr.data.coco import CocoDetection
from codetr.data.loaders import build_dataset, build_eval_loader
from codetr.errors import ConfigError


def check_num_images(num_images: int) -> None:
    if num_images < 1:
        raise ConfigError(f"--num-images={num_images}: expected at least 1 image")


def first_val_images(data_cfg: DataConfig, num_images: int,
                     max_workers: int = 2) -> tuple[DataLoader, CocoDetection, int]:
    """A loader over the first `num_images` validation images (fewer if the split is smaller).

    Returns (loader, the full dataset, the number of images the loader yields). Batches are padded
    (see codetr.data.collate.Batch); at most `max_workers` loader processes.
    """
    check_num_images(num_images)
    dataset = build_dataset(data_cfg, "val")
    count = min(num_images, len(dataset))
    cfg = replace(data_cfg, num_workers=min(data_cfg.num_workers, max_workers))
    return build_eval_loader(Subset(dataset, range(count)), cfg), dataset, count


def image_sizes_from_masks(masks: Tensor) -> Tensor:
    """masks [B, H, W] (True = padding, image at the top-left) -> [B, 2] int64 (h, w) valid sizes."""
    valid = ~masks
    return torch.stack((valid.any(2).sum(1), valid.any(1).sum(1)), -1)


def gt_boxes_xyxy_abs(targets: list[dict], image_sizes: Tensor) -> list[Tensor]:
    """Per image the ground-truth boxes [N_i, 4] xyxy in pixels of the network input.

    targets[i]["boxes"] are cxcywh normalised by image i's unpadded size; image_sizes [B, 2] (h, w).
    """
    boxes = []
    for target, (height, width) in zip(targets, image_sizes.tolist()):
        scale = target["boxes"].new_tensor([width, height, width, height])
        boxes.append(box_cxcywh_to_xyxy(target["boxes"].float()) * scale)
    return boxes
