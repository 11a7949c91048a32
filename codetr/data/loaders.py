"""Datasets and loaders from a config: where the data lives, seeded augmentation, resumable sampling.

Reproducibility: the sample order of epoch e depends only on (seed, epoch), and each sample's
augmentation only on (seed, epoch, index). So a run resumed mid-epoch, or run with another number of
loader workers, sees exactly the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from codetr.config import DataConfig
from codetr.data.coco import CocoDetection, resolve_coco_split
from codetr.data.collate import collate
from codetr.data.synth import ensure_default_dataset
from codetr.data.transforms import Compose, make_lsj_transforms, make_test_transforms, make_train_transforms
from codetr.errors import DataError


@dataclass
class SplitFiles:
    image_dir: Path
    ann_file: Path


def resolve_split(cfg: DataConfig, split: str) -> SplitFiles:
    """Explicit files (data.{split}_images + data.{split}_ann) win; else the COCO layout under data.root;
    else the embedded generated dataset (created once in the cache)."""
    images, ann = (cfg.train_images, cfg.train_ann) if split == "train" else (cfg.val_images, cfg.val_ann)
    if images or ann:
        if not (images and ann):
            raise DataError(f"data.{split}_images and data.{split}_ann must be given together")
        return SplitFiles(Path(images), Path(ann))
    root = Path(cfg.root) if cfg.root else ensure_default_dataset()
    image_dir, ann_file = resolve_coco_split(root, split)
    return SplitFiles(image_dir, ann_file)


def eval_transforms(cfg: DataConfig) -> Compose:
    """The evaluation preprocessing (val split, `codetr predict --images`): the test resize (or LSJ's fixed-size
    resize), ToTensor, Normalize. (PIL image, target) -> (float [3, H, W] normalised, target with "size")."""
    if cfg.lsj:
        return make_lsj_transforms(False, cfg.lsj_size, cfg.lsj_scale_range)
    return make_test_transforms(cfg.test_size, cfg.test_max_size)


def build_dataset(cfg: DataConfig, split: str) -> CocoDetection:
    """The train split gets the paper's augmentation (unless data.augment=false), val the test resize."""
    files = resolve_split(cfg, split)
    if split == "train" and cfg.augment and cfg.lsj:
        transforms = make_lsj_transforms(True, cfg.lsj_size, cfg.lsj_scale_range)
    elif split == "train" and cfg.augment:
        transforms = make_train_transforms(cfg.train_scales, cfg.max_size, cfg.crop_scales, tuple(cfg.crop_size))
    else:
        transforms = eval_transforms(cfg)
    return CocoDetection(files.image_dir, files.ann_file, transforms=transforms, invalid_boxes=cfg.invalid_boxes)


class SeededDataset(Dataset):
    """Runs each sample's random augmentation under its own seed, derived from (seed, epoch, index)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.manual_seed(sample_seed % (2**63))
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """This rank's share of a (seed, epoch)-determined permutation, optionally skipping a prefix.

    The permutation is padded (by repeating its start) to a multiple of world_size so every rank runs
    the same number of iterations. `skip` drops this rank's first `skip` samples (mid-epoch resume).
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded_size = -(-self.size // self.world_size) * self.world_size
        order += order[: padded_size - self.size]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.skip :])

    def __len__(self) -> int:
        return -(-self.size // self.world_size) - self.skip


def build_train_loader(
    dataset: Dataset, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1
) -> tuple[DataLoader, SeededDataset, EpochSampler]:
    seeded = SeededDataset(dataset, seed)
    sampler = EpochSampler(len(seeded), seed, rank, world_size, shuffle=True)
    loader = DataLoader(
        seeded,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=partial(collate, size_divisor=1),
        num_workers=cfg.num_workers,
        persistent_workers=False,  # workers must see the dataset's current epoch
        drop_last=False,
        generator=torch.Generator().manual_seed(seed),  # never draw from the global RNG (exact resume)
    )
    return loader, seeded, sampler


def build_eval_loader(dataset: Dataset, cfg: DataConfig, rank: int = 0, world_size: int = 1) -> DataLoader:
    sampler = EpochSampler(len(dataset), 0, rank, world_size, shuffle=False)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(0),  # evaluating must not move the global RNG
    )
