"""Drawing detections: pixels change on box edges (and captions inside boxes), nowhere else."""
from __future__ import annotations

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import pytest
import torch

from codetr.errors import ConfigError
from codetr.visualize import class_color, draw_detections, save_png

NAMES = ["person", "car", "dog"]
GREY = (128, 128, 128)


def grey_image(w: int = 120, h: int = 90) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (w, h), GREY)


def changed_mask(before: PIL.Image.Image, after: PIL.Image.Image) -> np.ndarray:
    """[H, W] True where any channel differs."""
    return (np.asarray(before) != np.asarray(after)).any(axis=2)


def test_pixels_change_on_box_edges_only():
    image = grey_image()
    x1, y1, x2, y2 = 10, 15, 70, 60
    drawn = draw_detections(
        image, torch.tensor([[x1, y1, x2, y2]], dtype=torch.float32), torch.tensor([1]), torch.tensor([0.87]),
        NAMES, line_width=2,
    )
    assert drawn.size == image.size and drawn.mode == "RGB"
    assert np.asarray(image).tolist() == np.asarray(grey_image()).tolist()  # input untouched
    pixels = np.asarray(drawn)
    color = list(class_color(1))
    # Every pixel of the 1-px ring at the box coordinates has the class colour (PIL draws width inward).
    ring = [(x, y1) for x in range(x1, x2 + 1)] + [(x, y2) for x in range(x1, x2 + 1)]
    ring += [(x1, y) for y in range(y1, y2 + 1)] + [(x2, y) for y in range(y1, y2 + 1)]
    for x, y in ring:
        assert pixels[y, x].tolist() == color, (x, y)
    changed = changed_mask(image, drawn)
    # Nothing changes outside the box ...
    outside = np.ones_like(changed)
    outside[y1 : y2 + 1, x1 : x2 + 1] = False
    assert not changed[outside].any()
    assert pixels[85, 115].tolist() == list(GREY)  # far corner
    # ... nor in the box interior away from the edges and the top-left caption.
    assert not changed[y1 + 25 : y2 - 2, x1 + 3 : x2 - 2].any()
    # The caption is drawn inside the top-left corner, in the class colour.
    caption = changed[y1 + 2 : y1 + 20, x1 + 2 : x2 - 2]
    assert caption.any()


def test_matches_plain_pil_drawing_of_box_and_caption():
    # Reference: the same outline and "name score" caption drawn with PIL's ImageDraw (exact pixels).
    image = grey_image()
    drawn = draw_detections(
        image, torch.tensor([[10.6, 15.2, 70.0, 60.9]]), torch.tensor([1]), torch.tensor([0.8731]), NAMES, line_width=3
    )
    reference = grey_image()
    painter = PIL.ImageDraw.Draw(reference)
    painter.rectangle((10, 15, 70, 60), outline=class_color(1), width=3)  # coordinates truncated to int
    # The caption starts line_width + 1 px inside the corner.
    painter.text((10 + 4, 15 + 4), "car 0.87", fill=class_color(1), font=PIL.ImageFont.load_default())
    assert np.array_equal(np.asarray(drawn), np.asarray(reference))


def test_threshold_filters_low_scores():
    image = grey_image()
    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [60.0, 50.0, 100.0, 80.0]])
    labels, scores = torch.tensor([0, 2]), torch.tensor([0.9, 0.29])
    drawn = draw_detections(image, boxes, labels, scores, NAMES, score_threshold=0.3)
    changed = changed_mask(image, drawn)
    assert changed[10, 20]  # top edge of the kept box
    assert not changed[50:81, 60:101].any()  # the 0.29 box is not drawn
    # At a lower threshold it is.
    drawn_low = draw_detections(image, boxes, labels, scores, NAMES, score_threshold=0.2)
    assert np.asarray(drawn_low)[50, 80].tolist() == list(class_color(2))


def test_nothing_above_threshold_returns_unchanged_copy():
    image = grey_image()
    drawn = draw_detections(image, torch.tensor([[1.0, 1.0, 9.0, 9.0]]), torch.tensor([0]), torch.tensor([0.1]), NAMES)
    assert drawn is not image
    assert not changed_mask(image, drawn).any()


def test_class_colours_are_stable_and_distinct():
    image = grey_image()
    boxes = torch.tensor([[5.0, 5.0, 30.0, 30.0], [40.0, 5.0, 70.0, 30.0], [80.0, 5.0, 110.0, 30.0]])
    drawn = np.asarray(
        draw_detections(image, boxes, torch.tensor([2, 0, 2]), torch.tensor([0.9, 0.8, 0.7]), NAMES)
    )
    assert drawn[5, 15].tolist() == drawn[5, 95].tolist() == list(class_color(2))  # same class, same colour
    assert drawn[5, 55].tolist() == list(class_color(0))
    assert len({class_color(i) for i in range(80)}) == 80  # 80 COCO classes: all different


def test_grayscale_input_and_unknown_label():
    gray = PIL.Image.new("L", (50, 40), 100)
    drawn = draw_detections(gray, torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([0]), torch.tensor([0.5]), NAMES)
    assert drawn.mode == "RGB" and np.asarray(drawn)[5, 10].tolist() == list(class_color(0))
    with pytest.raises(ConfigError, match="label 3"):
        draw_detections(gray, torch.tensor([[5.0, 5.0, 30.0, 30.0]]), torch.tensor([3]), torch.tensor([0.5]), NAMES)


def test_save_png_round_trip(tmp_path):
    drawn = draw_detections(
        grey_image(), torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.tensor([1]), torch.tensor([0.9]), NAMES
    )
    path = tmp_path / "vis" / "img.png"
    save_png(drawn, path)
    with PIL.Image.open(path) as loaded:
        assert loaded.format == "PNG"
        assert np.array_equal(np.asarray(loaded.convert("RGB")), np.asarray(drawn))  # lossless
    assert [p.name for p in path.parent.iterdir()] == ["img.png"]  # no temp file left
