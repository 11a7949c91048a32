"""A generated COCO-format detection dataset: the embedded default data.

Images are six classes of rendered shapes on textured, cluttered backgrounds, written in the COCO
2017 folder layout (``train2017/``, ``val2017/``, ``annotations/instances_{split}2017.json``), so
that real COCO and this data go through the same loader (``codetr.data.coco``).

What makes it a (small) detection problem rather than a toy:
  - classes differ by shape only; colours and fills are random per object;
  - backgrounds are textured and noisy, with unannotated lines and blobs as clutter;
  - objects overlap (later objects are drawn on top; the box is still the object's full extent);
  - object sizes cover COCO's small / medium / large ranges, image sizes vary a little, and ~2% of
    the images contain no object.

Every image is rendered from its own generator seeded by (seed, split, index), so the output is
byte-identical for the same arguments and a split does not depend on the other split's size.
"""
from __future__ import annotations

import fcntl
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from codetr.errors import DataError
from codetr.io import atomic_write_json

DATASET_VERSION = "synth-v1"
COMPLETE_MARKER = ".complete"
DEFAULT_PARAMS = {"num_train": 512, "num_val": 128, "seed": 0, "image_size": 256}

# (category id, name). The ids are deliberately not contiguous so that the contiguous label <->
# category id mapping is exercised exactly as with real COCO (whose ids run 1..90 with gaps).
CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "circle"), (2, "square"), (3, "triangle"), (5, "cross"), (7, "ring"), (9, "star"),
)
SHAPES = tuple(name for _, name in CATEGORIES)

_SPLIT_CODES = {"train": 0, "val": 1}
_EMPTY_EVERY = 50  # image idx % 50 == 3 has no object: ~2%, and at least one in any split of >= 4
_MAX_OCCLUDED_FRACTION = 0.4  # a new object may cover at most this fraction of an earlier box
_PLACEMENT_TRIES = 30


def _polygon_unit(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices [V, 2] of a polygonal shape around the origin, radius ~1, randomly rotated."""
    if shape == "square":
        angles = np.deg2rad(45.0 + 90.0 * np.arange(4) + rng.uniform(-15.0, 15.0))
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "triangle":
        angles = np.deg2rad(-90.0 + 120.0 * np.arange(3) + rng.uniform(0.0, 360.0))
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10) + rng.uniform(0.0, 72.0))
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    if shape == "cross":
        a = rng.uniform(0.28, 0.4)  # half-width of an arm
        pts = np.array([(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1),
                        (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a), (-a, 1)], dtype=np.float64)
        t = np.deg2rad(rng.uniform(-20.0, 20.0))
        rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
        return pts @ rot.T
    raise ValueError(f"not a polygonal shape: {shape!r}")


def render_shape_mask(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Render one object as a tight binary mask ("L" image, 255 = object, 0 = not).

    Args:
        shape: one of SHAPES.
        size: the longer side in pixels (before a mild random aspect stretch of 0.85..1.15).
    Returns:
        The mask cropped to the object's pixel extent, so its (width, height) IS the object's box.
    """
    stretch_x = rng.uniform(0.85, 1.15)
    if shape in ("circle", "ring"):
        w, h = max(2, round(size * stretch_x)), size
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        draw.ellipse((0, 0, w - 1, h - 1), fill=255)
        if shape == "ring":
            # Hollow centre: the background shows through, unlike a two-tone circle.
            inset = max(2, round(rng.uniform(0.25, 0.4) * min(w, h) / 2))
            draw.ellipse((inset, inset, w - 1 - inset, h - 1 - inset), fill=0)
    else:
        pts = _polygon_unit(shape, rng)
        pts[:, 0] *= stretch_x
        pts -= pts.min(axis=0)
        pts *= (size - 1) / pts.max()
        w, h = (math.ceil(v) + 1 for v in pts.max(axis=0))
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in pts.tolist()], fill=255)
    # Thin tips may rasterise short of their vertex: the box comes from pixels, not geometry.
    bbox = mask.getbbox()
    return mask.crop(bbox) if bbox is not None else mask


def _sample_size(rng: np.random.Generator, width: int, height: int) -> int:
    """Longer side of an object: ~40% small, ~40% medium, ~20% large in COCO's box-area ranges.

    The bounds leave room for the 0.85..1.15 aspect stretch: small stays below 32^2, medium
    mostly between 32^2 and 96^2, large mostly above 96^2.
    """
    u = rng.random()
    if u < 0.4:
        return int(rng.integers(10, 29))
    if u < 0.8:
        return int(rng.integers(40, 89))
    high = int(0.8 * min(width, height))
    return int(rng.integers(min(120, high), high + 1))


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    colour = rng.integers(0, 256, size=3)
    for _ in range(20):
        if np.abs(colour - background).sum() >= 150:
            break
        colour = rng.integers(0, 256, size=3)
    return tuple(int(c) for c in colour)


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured background [H, W, 3] float and its base colour [3]."""
    base = rng.uniform(40.0, 215.0, size=3)
    # Low-frequency blotches: a coarse random grid upsampled bicubically.
    coarse = rng.normal(128.0, rng.uniform(15.0, 35.0), size=(height // 32 + 2, width // 32 + 2, 3))
    blotches = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    canvas = base + np.asarray(blotches, dtype=np.float32) - 128.0
    if rng.random() < 0.3:  # oriented stripes
        theta, period = rng.uniform(0.0, math.pi), rng.uniform(6.0, 30.0)
        yy, xx = np.mgrid[0:height, 0:width]
        phase = 2.0 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period
        canvas += rng.uniform(8.0, 25.0) * np.sin(phase)[..., None]
    return canvas, base


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, base: np.ndarray,
                  width: int, height: int, num_lines: int, num_blobs: int) -> None:
    """Unannotated distractors: random lines and small irregular blobs near the background colour."""
    def near_base() -> tuple[int, ...]:
        return tuple(int(c) for c in np.clip(base + rng.uniform(-70.0, 70.0, size=3), 0, 255))

    for _ in range(num_lines):
        x0, x1 = rng.uniform(0, width, size=2)
        y0, y1 = rng.uniform(0, height, size=2)
        draw.line((x0, y0, x1, y1), fill=near_base(), width=int(rng.integers(1, 4)))
    for _ in range(num_blobs):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        n = int(rng.integers(7, 12))
        radii = rng.uniform(3.0, 10.0) * rng.uniform(0.4, 1.0, size=n)
        angles = np.sort(rng.uniform(0.0, 2.0 * math.pi, size=n))
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]
        draw.polygon(pts, fill=near_base())


def _occludes_too_much(box: tuple[int, int, int, int], earlier: list[tuple[int, int, int, int]]) -> bool:
    """True if `box` (x, y, w, h), drawn on top, would cover too much of an earlier box."""
    x, y, w, h = box
    for ex, ey, ew, eh in earlier:
        iw = min(x + w, ex + ew) - max(x, ex)
        ih = min(y + h, ey + eh) - max(y, ey)
        if iw > 0 and ih > 0 and iw * ih > _MAX_OCCLUDED_FRACTION * ew * eh:
            return True
    return False


def render_image(rng: np.random.Generator, width: int, height: int, num_objects: int
                 ) -> tuple[Image.Image, list[dict]]:
    """Render one image.

    Returns:
        (RGB image, objects) with one dict per placed object: "shape" and "bbox" [x, y, w, h] in
        absolute pixels (the object's full pixel extent, also where later objects hide part of
        it). Fewer than `num_objects` objects are
        returned when no placement passes the occlusion limit.
    """
    canvas, base = _background(rng, width, height)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    _draw_clutter(draw, rng, base, width, height, int(rng.integers(0, 7)), int(rng.integers(0, 6)))

    objects: list[dict] = []
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(num_objects):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        mask = render_shape_mask(shape, _sample_size(rng, width, height), rng)
        mw, mh = mask.size
        if mw > width or mh > height:
            continue
        for _ in range(_PLACEMENT_TRIES):
            box = (int(rng.integers(0, width - mw + 1)), int(rng.integers(0, height - mh + 1)), mw, mh)
            if not _occludes_too_much(box, boxes):
                break
        else:
            continue
        x, y = box[0], box[1]
        outer = _contrasting_colour(rng, base)
        image.paste(outer, (x, y, x + mw, y + mh), mask)
        if min(mw, mh) >= 16 and rng.random() < 0.4:  # two-tone fill: a border of another colour
            border = max(1, min(mw, mh) // 10)
            inner_mask = mask.filter(ImageFilter.MinFilter(2 * border + 1))
            image.paste(_contrasting_colour(rng, base), (x, y, x + mw, y + mh), inner_mask)
        boxes.append(box)
        objects.append({"shape": shape, "bbox": list(box)})

    # A few thin lines on top of everything (clutter that also crosses objects), then sensor noise.
    _draw_clutter(draw, rng, base, width, height, int(rng.integers(0, 3)), 0)
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(2.0, 8.0), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"), objects


def _generate_split(out_dir: Path, split: str, num_images: int, seed: int, image_size: int) -> None:
    image_dir = out_dir / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    cat_id = {name: cid for cid, name in CATEGORIES}
    jitter = image_size // 8
    images, annotations = [], []
    for idx in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], idx])
        width = int(rng.integers(image_size - jitter, image_size + jitter + 1))
        height = int(rng.integers(image_size - jitter, image_size + jitter + 1))
        num_objects = 0 if idx % _EMPTY_EVERY == 3 else int(rng.integers(1, 9))
        image, objects = render_image(rng, width, height, num_objects)
        image_id = idx + 1
        file_name = f"{image_id:012d}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        # Plain writes: ensure_default_dataset makes the whole folder appear atomically.
        (image_dir / file_name).write_bytes(buffer.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for obj in objects:
            w, h = obj["bbox"][2:]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id[obj["shape"]],
                "bbox": [float(v) for v in obj["bbox"]], "area": float(w * h), "iscrowd": 0,
            })
    categories = [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in CATEGORIES]
    dataset = {
        "info": {"description": f"codetr synthetic shapes ({DATASET_VERSION}), split {split}, seed {seed}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_json(out_dir / "annotations" / f"instances_{split}2017.json", dataset, indent=None)


def generate_synthetic_coco(out_dir: Path, num_train: int = 512, num_val: int = 128, seed: int = 0,
                            image_size: int = 256) -> Path:
    """Write a synthetic dataset in the COCO 2017 layout under `out_dir` and return `out_dir`.

    Image sides are drawn from [image_size - image_size // 8, image_size + image_size // 8].
    Annotation boxes are [x, y, w, h] in absolute pixels. There are no masks, so "area" (which
    decides small / medium / large in COCOeval) is the box area w * h, the same for every shape.
    """
    out_dir = Path(out_dir)
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if value < 0:
            raise DataError(f"{name} must be >= 0, got {value}")
    if not 0 <= seed < 2**32:  # numpy's seed range
        raise DataError(f"--seed {seed}: expected an integer in [0, 2^32)")
    if image_size < 64:
        raise DataError(f"image_size must be >= 64 pixels, got {image_size}")
    _generate_split(out_dir, "train", num_train, seed, image_size)
    _generate_split(out_dir, "val", num_val, seed, image_size)
    return out_dir


def default_data_dir() -> Path:
    """`$CODETR_DATA` if set, else ~/.cache/codetr/synth-v1."""
    env = os.environ.get("CODETR_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "codetr" / DATASET_VERSION


def ensure_default_dataset(root: Path | None = None) -> Path:
    """Generate the default synthetic dataset into `root` (default: default_data_dir()) once.

    The data is generated into a temporary sibling folder that is renamed into place, and a marker
    file inside it says the folder is complete, so an interrupted run never leaves a half dataset.
    An exclusive file lock next to `root` makes concurrent callers (e.g. DDP ranks) generate once;
    the others wait and reuse the result.
    """
    root = Path(root).expanduser() if root is not None else default_data_dir()
    if (root / COMPLETE_MARKER).is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if (root / COMPLETE_MARKER).is_file():  # another caller finished while we waited
                return root
            if root.exists():
                if not root.is_dir() or any(root.iterdir()):
                    raise DataError(
                        f"{root} exists but is not a complete synthetic dataset (no {COMPLETE_MARKER} "
                        "marker); delete it or set CODETR_DATA to another folder"
                    )
                root.rmdir()
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
            try:
                generate_synthetic_coco(tmp, **DEFAULT_PARAMS)
                atomic_write_json(tmp / COMPLETE_MARKER, {"version": DATASET_VERSION, **DEFAULT_PARAMS})
                tmp.chmod(0o755)  # mkdtemp makes it private
                os.replace(tmp, root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return root
