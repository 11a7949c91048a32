"""Draw detections on images and save them as PNG."""
from __future__ import annotations

import colorsys
import io
import os

import PIL.Image
import torch
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from codetr.errors import ConfigError
from codetr.io import atomic_write_bytes

_GOLDEN_RATIO_CONJUGATE = 0.618033988749895


def class_color(label: int) -> tuple[int, int, int]:
    """A fixed RGB colour per contiguous class label, the same in every image and run.

    Hues step by the golden ratio so that nearby labels get well-separated colours.
    """
    hue = (label * _GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def draw_detections(
    image: PIL.Image.Image,
    boxes_xyxy: Tensor,
    labels: Tensor,
    scores: Tensor,
    class_names: list[str],
    score_threshold: float = 0.3,
    *,
    line_width: int | None = None,
) -> PIL.Image.Image:
    """Return a copy of `image` with the detections scoring >= score_threshold drawn on it.

    Args:
        image: the original image (any PIL mode; drawn in RGB).
        boxes_xyxy: [K, 4] xyxy in absolute pixels of `image`.
        labels: [K] contiguous class labels, indices into `class_names`.
        scores: [K] confidences in [0, 1].
        class_names: name of each contiguous label.
        score_threshold: detections scoring below it are not drawn.
        line_width: box outline width in pixels; default grows with the image (2 px per 800 px).

    Each box is outlined in its class colour (`class_color`) with a "name 0.87" caption inside
    its top-left corner; the input image is not modified.
    """
    boxes_xyxy = boxes_xyxy.detach().to("cpu", torch.float32).reshape(-1, 4)
    labels = labels.detach().to("cpu", torch.int64).reshape(-1)
    scores = scores.detach().to("cpu", torch.float32).reshape(-1)
    if not len(boxes_xyxy) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes_xyxy)} boxes, {len(labels)} labels and {len(scores)} scores")
    keep = scores >= score_threshold
    boxes_xyxy, labels, scores = boxes_xyxy[keep], labels[keep], scores[keep]
    bad = [int(label) for label in labels if not 0 <= label < len(class_names)]
    if bad:
        raise ConfigError(f"label {bad[0]} has no name: only {len(class_names)} class names were given")

    image = image.convert("RGB")  # always a copy for an RGB input too
    if len(boxes_xyxy) == 0:
        return image
    if line_width is None:
        line_width = max(2, round(max(image.size) / 400))
    captions = [f"{class_names[label]} {score:.2f}" for label, score in zip(labels.tolist(), scores.tolist())]
    colors = [class_color(label) for label in labels.tolist()]
    drawn = draw_bounding_boxes(pil_to_tensor(image), boxes_xyxy, labels=captions, colors=colors, width=line_width)
    return to_pil_image(drawn)


def save_png(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Write `image` as a PNG atomically (a reader never sees a half-written file)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
