"""Paired (image, target) transforms for detection training, DETR-style.

Until `Normalize`, the image is a PIL image and target["boxes"] is float32 [N, 4] xyxy in absolute
pixels of the current image; target["size"] is the current (h, w). `Normalize` turns the image into
a normalised float32 tensor [3, H, W] and the boxes into cxcywh normalised by the image (w, h).

Randomness comes from the global torch RNG (torch.rand / torch.randint), so `torch.manual_seed`
plus the DataLoader's per-worker seeding makes augmentation reproducible. Transforms never modify
the caller's target dict or tensors in place.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import functional as TF

from codetr.box_ops import box_xyxy_to_cxcywh

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DETR_SCALES = tuple(range(480, 801, 32))  # 480, 512, ..., 800

# Target keys holding one entry per box; cropping filters all of them together.
_PER_BOX_KEYS = ("boxes", "labels", "area", "iscrowd")

PairTransform = Callable[[Any, dict], tuple[Any, dict]]


def hflip(image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
    """Mirror left-right; box x-extents [x1, x2] become [w - x2, w - x1]."""
    target = dict(target)
    width = image.width
    x1, y1, x2, y2 = target["boxes"].unbind(-1)
    target["boxes"] = torch.stack((width - x2, y1, width - x1, y2), dim=-1)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), target


def resized_hw(height: int, width: int, short_size: int, max_size: int | None = None) -> tuple[int, int]:
    """(h, w) after scaling the short side to `short_size`, reduced so the long side is <= max_size."""
    scale = short_size / min(height, width)
    if max_size is not None and max(height, width) * scale > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize(image: Image.Image, target: dict, size_hw: tuple[int, int]) -> tuple[Image.Image, dict]:
    """Resize to (h, w) bilinearly; boxes scale by (w_new / w, h_new / h)."""
    new_h, new_w = size_hw
    target = dict(target)
    scale = torch.tensor([new_w / image.width, new_h / image.height] * 2, dtype=torch.float32)
    target["boxes"] = target["boxes"] * scale
    target["size"] = torch.tensor([new_h, new_w], dtype=torch.int64)
    return image.resize((new_w, new_h), Image.BILINEAR), target


def crop(image: Image.Image, target: dict, region: tuple[int, int, int, int]) -> tuple[Image.Image, dict]:
    """Crop region (top, left, h, w); boxes are shifted and clipped, and those left empty dropped."""
    top, left, height, width = region
    target = dict(target)
    boxes = target["boxes"] - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    target["boxes"] = boxes
    for key in _PER_BOX_KEYS:
        if key in target:
            target[key] = target[key][keep]
    target["size"] = torch.tensor([height, width], dtype=torch.int64)
    return image.crop((left, top, left + width, top + height)), target


def _randint(low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive) from the global torch RNG."""
    return int(torch.randint(low, high + 1, ()).item())


class Compose:
    def __init__(self, transforms: Sequence[PairTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: dict) -> tuple[Any, dict]:
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Scale the short side to a size drawn uniformly from `short_sizes`; long side <= max_size."""

    def __init__(self, short_sizes: Sequence[int], max_size: int | None = None) -> None:
        if len(short_sizes) == 0:
            raise ValueError("RandomResize needs at least one short side size")
        self.short_sizes = list(short_sizes)
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
        # A single size draws nothing, so test-time resizing leaves the global RNG alone.
        index = _randint(0, len(self.short_sizes) - 1) if len(self.short_sizes) > 1 else 0
        short = self.short_sizes[index]
        return resize(image, target, resized_hw(image.height, image.width, short, self.max_size))


class RandomSizeCrop:
    """Crop a random region with each side drawn from [min_size, min(max_size, image side)]."""

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
        # An image side shorter than min_size is kept whole instead of failing.
        width = _randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = _randint(min(self.min_size, image.height), min(image.height, self.max_size))
        top = _randint(0, image.height - height)
        left = _randint(0, image.width - width)
        return crop(image, target, (top, left, height, width))


class RandomSelect:
    """Apply `a` with probability p, else `b`."""

    def __init__(self, a: PairTransform, b: PairTransform, p: float = 0.5) -> None:
        self.a, self.b, self.p = a, b, p

    def __call__(self, image: Any, target: dict) -> tuple[Any, dict]:
        if torch.rand(()).item() < self.p:
            return self.a(image, target)
        return self.b(image, target)


class ToTensor:
    """PIL image -> float32 tensor [3, H, W] in [0, 1]; the target is passed through."""

    def __call__(self, image: Image.Image, target: dict) -> tuple[Tensor, dict]:
        return TF.pil_to_tensor(image).to(torch.float32).div_(255.0), target


class Normalize:
    """Normalise the image tensor and convert boxes to cxcywh in [0, 1].

    Input: image float32 [3, H, W] in [0, 1], target["boxes"] [N, 4] xyxy abs.
    Output: (image - mean) / std, target["boxes"] [N, 4] cxcywh normalised by (w, h), and
    target["size"] = (H, W).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        image = (image - self.mean) / self.std
        height, width = image.shape[-2:]
        target = dict(target)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        target["size"] = torch.tensor([height, width], dtype=torch.int64)
        return image, target


# mmdet's LSJ pads with this grey (0..255, before normalisation); with use_lsj the padding counts as image.
LSJ_PAD_VALUE = 114


def pad_to_square(image: Image.Image, target: dict, size: int) -> tuple[Image.Image, dict]:
    """Pad at the bottom / right to size x size with LSJ's grey; the padded square becomes the image (boxes
    are later normalised by it, and the batch mask marks none of it)."""
    canvas = Image.new("RGB", (size, size), (LSJ_PAD_VALUE,) * 3)
    canvas.paste(image, (0, 0))
    target = dict(target)
    target["size"] = torch.tensor([size, size], dtype=torch.int64)
    return canvas, target


def fit_scale(height: int, width: int, size: int) -> float:
    """The keep-ratio scale that fits (h, w) inside size x size (mmdet's Resize with scale (size, size))."""
    return min(size / height, size / width)


class LargeScaleJitter:
    """Co-DINO's LSJ training augmentation: resize to fit a square of side size * r, r ~ U(scale_range), crop
    a random size x size window (smaller images are kept whole), drop boxes left under 0.01 px, flip with
    probability 0.5, pad to size x size."""

    def __init__(self, size: int = 1024, scale_range: Sequence[float] = (0.1, 2.0)) -> None:
        self.size, self.scale_range = size, tuple(scale_range)

    def __call__(self, image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
        low, high = self.scale_range
        ratio = low + (high - low) * torch.rand(()).item()
        scale = fit_scale(image.height, image.width, self.size * ratio)
        image, target = resize(image, target, (max(1, round(image.height * scale)), max(1, round(image.width * scale))))
        height, width = min(self.size, image.height), min(self.size, image.width)
        top, left = _randint(0, image.height - height), _randint(0, image.width - width)
        image, target = crop(image, target, (top, left, height, width))
        wh = target["boxes"][:, 2:] - target["boxes"][:, :2]
        keep = (wh > 1e-2).all(-1)
        target = {k: (v[keep] if k in _PER_BOX_KEYS else v) for k, v in target.items()}
        if torch.rand(()).item() < 0.5:
            image, target = hflip(image, target)
        return pad_to_square(image, target, self.size)


class LSJTestResize:
    """Co-DINO's LSJ test transform: resize to fit size x size, pad to it. The predictions, normalised by the
    padded square, map back to the original image through target["box_extent"]: the original-image pixels
    (h, w) the square covers."""

    def __init__(self, size: int = 1024) -> None:
        self.size = size

    def __call__(self, image: Image.Image, target: dict) -> tuple[Image.Image, dict]:
        scale = fit_scale(image.height, image.width, self.size)
        new_h, new_w = max(1, round(image.height * scale)), max(1, round(image.width * scale))
        orig_h, orig_w = (int(v) for v in target.get("orig_size", (image.height, image.width)))
        image, target = resize(image, target, (new_h, new_w))
        image, target = pad_to_square(image, target, self.size)
        # the square in original pixels (the resize's exact per-axis factors, as mmdet's scale_factor)
        target["box_extent"] = torch.tensor([self.size * orig_h / new_h, self.size * orig_w / new_w])
        return image, target


def make_lsj_transforms(train: bool, size: int = 1024, scale_range: Sequence[float] = (0.1, 2.0)) -> Compose:
    """Large-scale jitter (train) or its fixed-size test resize, then ToTensor and Normalize."""
    first = LargeScaleJitter(size, scale_range) if train else LSJTestResize(size)
    return Compose([first, ToTensor(), Normalize()])


def make_train_transforms(scales: Sequence[int] = DETR_SCALES, max_size: int = 1333,
                          crop_scales: Sequence[int] = (400, 500, 600),
                          crop_size: tuple[int, int] = (384, 600)) -> Compose:
    """The DETR / Co-DETR training recipe: flip 0.5, then either a multi-scale resize or
    resize -> random crop -> multi-scale resize, then ToTensor and Normalize."""
    return Compose([
        RandomHorizontalFlip(0.5),
        RandomSelect(
            RandomResize(scales, max_size),
            Compose([RandomResize(crop_scales), RandomSizeCrop(*crop_size), RandomResize(scales, max_size)]),
        ),
        ToTensor(),
        Normalize(),
    ])


def make_test_transforms(size: int = 800, max_size: int = 1333) -> Compose:
    """Short side to `size`, long side <= max_size, then ToTensor and Normalize."""
    return Compose([RandomResize([size], max_size), ToTensor(), Normalize()])
