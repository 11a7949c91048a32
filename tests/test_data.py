"""Tests for the COCO loader, the paired transforms and collate (codetr.data).

Fixture datasets are written by hand into tmp_path; expected values are computed by hand.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.data.coco import CocoDetection, resolve_coco_split
from codetr.data.collate import Batch, collate
from codetr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResize,
    RandomSelect,
    RandomSizeCrop,
    ToTensor,
    crop,
    hflip,
    make_test_transforms,
    make_train_transforms,
    resize,
    resized_hw,
)
from codetr.errors import ConfigError, DataError

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 10, "name": "dog"}]


def _ann(ann_id: int, image_id: int, category_id: int, bbox: list, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": bbox[2] * bbox[3], "iscrowd": iscrowd}


def _write_dataset(root: Path, annotations: list[dict], images: list[tuple[int, int, int]] | None = None,
                   categories: list[dict] | None = None) -> tuple[Path, Path]:
    """COCO 2017 layout with images (id, width, height) saved as PNG; returns (image_dir, ann_file)."""
    images = images if images is not None else [(1, 40, 30), (2, 20, 10)]
    image_dir = root / "val2017"
    image_dir.mkdir(parents=True)
    entries = []
    for image_id, width, height in images:
        name = f"{image_id:012d}.png"
        Image.new("RGB", (width, height), (image_id * 40, 0, 0)).save(image_dir / name)
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    ann_file = root / "annotations" / "instances_val2017.json"
    ann_file.parent.mkdir(parents=True)
    dataset = {"images": entries, "annotations": annotations,
               "categories": categories if categories is not None else CATEGORIES}
    ann_file.write_text(json.dumps(dataset))
    return image_dir, ann_file


# ----------------------------------------------------------------------------------------------
# CocoDetection


def test_targets_labels_clipping_and_crowd(tmp_path):
    anns = [
        _ann(1, 1, 10, [5, 6, 10, 4]),
        _ann(2, 1, 3, [30, -5, 20, 15]),  # sticks out right and top: clipped to the 40x30 image
        _ann(3, 1, 3, [0, 0, 8, 8], iscrowd=1),  # crowd: not a training target
    ]
    dataset = CocoDetection(*_write_dataset(tmp_path, anns))
    assert dataset.ids == [1, 2]
    assert dataset.cat_ids == [3, 10] and dataset.class_names == ["cat", "dog"] and dataset.num_classes == 2
    image, target = dataset[0]
    assert image.mode == "RGB" and image.size == (40, 30)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    torch.testing.assert_close(target["boxes"], torch.tensor([[5.0, 6.0, 15.0, 10.0], [30.0, 0.0, 40.0, 10.0]]),
                               rtol=0, atol=0)  # exact: integer pixel coordinates
    assert target["labels"].tolist() == [1, 0]  # category 10 -> label 1, category 3 -> label 0
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["orig_size"].dtype == torch.int64
    assert len(dataset.coco.getAnnIds(imgIds=[1])) == 3  # the crowd box stays available to COCOeval


def test_image_without_annotations_gives_empty_target(tmp_path):
    dataset = CocoDetection(*_write_dataset(tmp_path, [_ann(1, 1, 3, [1, 1, 5, 5])]))
    _, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    # The empty target survives the full training pipeline.
    torch.manual_seed(0)
    train = make_train_transforms(scales=(16, 20), max_size=40, crop_scales=(12,), crop_size=(8, 12))
    dataset.transforms = train
    image, target = dataset[1]
    assert image.shape[0] == 3 and target["boxes"].shape == (0, 4)


def test_missing_image_file(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [])
    (image_dir / "000000000002.png").unlink()
    dataset = CocoDetection(image_dir, ann_file)
    with pytest.raises(DataError, match="image file not found: .*000000000002.png"):
        dataset[1]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image(tmp_path, damage):
    image_dir, ann_file = _write_dataset(tmp_path, [], images=[(1, 64, 64)])
    path = image_dir / "000000000001.png"
    if damage == "garbage":
        path.write_bytes(b"this is not an image")
    else:
        noisy = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(noisy).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])  # valid header, pixel data cut short
    dataset = CocoDetection(image_dir, ann_file)
    with pytest.raises(DataError, match="cannot read image .*000000000001.png"):
        dataset[0]


def test_image_size_mismatch(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [])
    Image.new("RGB", (7, 7)).save(image_dir / "000000000001.png")
    with pytest.raises(DataError, match="7x7 but .* says 40x30"):
        CocoDetection(image_dir, ann_file)[0]


def test_missing_annotation_file(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [])
    ann_file.unlink()
    with pytest.raises(DataError, match="annotation file not found: .*instances_val2017.json"):
        CocoDetection(image_dir, ann_file)


def test_invalid_json_names_position(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [])
    ann_file.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(DataError, match=r"not valid JSON: .* line 2 column"):
        CocoDetection(image_dir, ann_file)


def test_missing_top_level_key(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [])
    ann_file.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match=r"missing top-level key\(s\) \['categories'\]"):
        CocoDetection(image_dir, ann_file)


def test_unknown_category_id(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [_ann(7, 2, 4, [1, 1, 5, 5])])
    with pytest.raises(DataError, match=r"annotation 7 \(image 2\) has category_id 4.*\[3, 10\]") as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("bbox", [[2, 2, 0, 5], [2, 2, 5, -1], [40, 5, 3, 3], [-10, 5, 10, 3]],
                         ids=["zero-width", "negative-height", "right-of-image", "touches-left-edge"])
def test_degenerate_box_error_vs_drop(tmp_path, bbox):
    anns = [_ann(1, 1, 3, [1, 1, 5, 5]), _ann(2, 1, 10, bbox)]
    image_dir, ann_file = _write_dataset(tmp_path, anns)
    with pytest.raises(DataError, match=r"annotation 2 \(image 1\): degenerate bbox .*data.invalid_boxes=drop"):
        CocoDetection(image_dir, ann_file)
    with pytest.warns(UserWarning, match="dropped 1 degenerate box"):
        dataset = CocoDetection(image_dir, ann_file, invalid_boxes="drop")
    _, target = dataset[0]
    assert target["boxes"].tolist() == [[1.0, 1.0, 6.0, 6.0]] and target["labels"].tolist() == [0]
    assert dataset.coco.getAnnIds(imgIds=[1]) == [1]


def test_valid_file_warns_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(*_write_dataset(tmp_path, [_ann(1, 1, 3, [1, 1, 5, 5])]), invalid_boxes="drop")


def test_bad_invalid_boxes_value(tmp_path):
    with pytest.raises(ConfigError, match="invalid_boxes"):
        CocoDetection(*_write_dataset(tmp_path, []), invalid_boxes="ignore")


def test_resolve_coco_split(tmp_path):
    image_dir, ann_file = _write_dataset(tmp_path, [])
    assert resolve_coco_split(tmp_path, "val") == (image_dir, ann_file)
    with pytest.raises(DataError, match=r"image folder not found: .*train2017"):
        resolve_coco_split(tmp_path, "train")
    with pytest.raises(DataError, match="data directory not found"):
        resolve_coco_split(tmp_path / "nope", "val")


# ----------------------------------------------------------------------------------------------
# Transforms


def _target(boxes: list, labels: list | None = None, hw: tuple[int, int] = (10, 20)) -> dict:
    labels = labels if labels is not None else list(range(len(boxes)))
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": 1, "orig_size": torch.tensor(hw), "size": torch.tensor(hw)}


def test_hflip_boxes_and_pixels():
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[2, 1] = 255  # x = 1 -> x = 20 - 1 - 1 = 18 after the flip
    target = _target([[1, 2, 4, 6]])
    image, flipped = hflip(Image.fromarray(pixels), target)
    assert np.asarray(image)[2, 18].tolist() == [255, 255, 255]
    assert flipped["boxes"].tolist() == [[16.0, 2.0, 19.0, 6.0]]  # [20-4, 2, 20-1, 6]
    assert target["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]]  # caller's target untouched
    _, never = RandomHorizontalFlip(p=0.0)(image, target)
    _, always = RandomHorizontalFlip(p=1.0)(image, target)
    assert never["boxes"].tolist() == [[1.0, 2.0, 4.0, 6.0]] and always["boxes"].tolist() == [[16.0, 2.0, 19.0, 6.0]]


def test_resized_hw_hand_values():
    assert resized_hw(480, 640, 800, 1333) == (800, 1067)  # scale 5/3, long side 1066.7 < 1333
    assert resized_hw(480, 640, 800, 1000) == (750, 1000)  # capped: scale 1000 / 640
    assert resized_hw(640, 480, 800, None) == (1067, 800)
    assert resized_hw(100, 100, 64, 80) == (64, 64)


def test_resize_boxes():
    image = Image.new("RGB", (20, 10))
    out, target = resize(image, _target([[2, 1, 10, 5]]), (30, 40))  # (h, w): x * 2, y * 3
    assert out.size == (40, 30)
    assert target["boxes"].tolist() == [[4.0, 3.0, 20.0, 15.0]]
    assert target["size"].tolist() == [30, 40]
    _, target = RandomResize([5], max_size=None)(image, _target([[2, 1, 10, 5]]))
    assert target["boxes"].tolist() == [[1.0, 0.5, 5.0, 2.5]] and target["size"].tolist() == [5, 10]


def test_crop_shifts_clips_and_drops():
    image = Image.new("RGB", (20, 20))
    boxes = [[2, 2, 8, 8], [12, 12, 18, 18], [5, 5, 15, 15]]
    out, target = crop(image, _target(boxes, [0, 1, 2], hw=(20, 20)), (4, 4, 8, 8))  # top, left, h, w
    assert out.size == (8, 8)
    # Shift by (-4, -4): [-2,-2,4,4] -> [0,0,4,4]; [8,8,14,14] is empty after clipping to 8 -> dropped;
    # [1,1,11,11] -> [1,1,8,8].
    assert target["boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 8.0, 8.0]]
    assert target["labels"].tolist() == [0, 2]
    assert target["size"].tolist() == [8, 8]


def test_random_size_crop_bounds_and_reproducibility():
    image = Image.new("RGB", (50, 40))
    target = _target([[0, 0, 50, 40]], hw=(40, 50))
    for seed in range(20):
        torch.manual_seed(seed)
        out, t = RandomSizeCrop(10, 30)(image, target)
        assert 10 <= out.width <= 30 and 10 <= out.height <= 30
        assert t["boxes"].tolist() == [[0.0, 0.0, float(out.width), float(out.height)]]  # box covers all
    torch.manual_seed(3)
    first = RandomSizeCrop(10, 30)(image, target)[1]["size"].tolist()
    torch.manual_seed(3)
    assert RandomSizeCrop(10, 30)(image, target)[1]["size"].tolist() == first
    # Image smaller than min_size: kept whole rather than failing.
    assert RandomSizeCrop(64, 100)(image, target)[0].size == (50, 40)


def test_random_select_probabilities():
    def tag(name):
        return lambda image, target: (image, {**target, "path": name})

    assert RandomSelect(tag("a"), tag("b"), p=1.0)(None, {})[1]["path"] == "a"
    assert RandomSelect(tag("a"), tag("b"), p=0.0)(None, {})[1]["path"] == "b"


def test_to_tensor_and_normalize_format():
    pixels = np.full((20, 10, 3), 128, dtype=np.uint8)  # h = 20, w = 10
    image, target = ToTensor()(Image.fromarray(pixels), _target([[2, 4, 6, 12]], hw=(20, 10)))
    assert image.dtype == torch.float32 and image.shape == (3, 20, 10)
    image, target = Normalize()(image, target)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 5, 5], expected, rtol=0, atol=1e-6)
    # xyxy [2,4,6,12] -> cxcywh [4,8,4,8] -> / (w,h,w,h) = (10,20,10,20)
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.4, 0.4, 0.4, 0.4]]), rtol=0, atol=1e-7)
    assert target["size"].tolist() == [20, 10]


def _white_box_image(width: int, height: int, box: list[int]) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = 255
    return Image.fromarray(pixels)


def test_train_geometry_tracks_image_content():
    """Flip / resize / crop move boxes exactly like pixels: the transformed box must match the
    extent of the white rectangle in the transformed image (tolerance 1.5 px for bilinear blur)."""
    geometry = Compose([
        RandomHorizontalFlip(0.5),
        RandomSelect(RandomResize([64, 80, 96], 160),
                     Compose([RandomResize([60, 70]), RandomSizeCrop(40, 60), RandomResize([64, 80, 96], 160)])),
        ToTensor(),
    ])
    image = _white_box_image(90, 70, [20, 15, 60, 45])
    checked = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out, target = geometry(image, _target([[20, 15, 60, 45]], hw=(70, 90)))
        assert target["size"].tolist() == list(out.shape[1:])
        if len(target["boxes"]) == 0:
            continue
        ys, xs = torch.nonzero(out[0] > 0.5, as_tuple=True)
        if len(xs) == 0:
            continue
        extent = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        torch.testing.assert_close(target["boxes"][0], extent, rtol=0, atol=1.5)
        checked += 1
    assert checked >= 20


def test_train_transforms_output_and_reproducibility():
    image = _white_box_image(90, 70, [20, 15, 60, 45])
    train = make_train_transforms(scales=(64, 80), max_size=100, crop_scales=(60,), crop_size=(30, 50))
    torch.manual_seed(0)
    first = [train(image, _target([[20, 15, 60, 45]], hw=(70, 90))) for _ in range(5)]
    torch.manual_seed(0)
    second = [train(image, _target([[20, 15, 60, 45]], hw=(70, 90))) for _ in range(5)]
    for (img_a, t_a), (img_b, t_b) in zip(first, second):
        assert torch.equal(img_a, img_b) and torch.equal(t_a["boxes"], t_b["boxes"])
        assert img_a.dtype == torch.float32 and img_a.shape[0] == 3 and max(img_a.shape[1:]) <= 100
        assert ((t_a["boxes"] >= 0) & (t_a["boxes"] <= 1)).all()
        assert t_a["size"].tolist() == list(img_a.shape[1:])


def test_test_transforms_sizes():
    image, target = make_test_transforms(size=35, max_size=60)(Image.new("RGB", (90, 70)),
                                                               _target([[0, 0, 90, 70]], hw=(70, 90)))
    assert image.shape == (3, 35, 45)  # short 70 -> 35, scale 0.5, long 45 <= 60
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]), rtol=0, atol=1e-6)
    assert target["orig_size"].tolist() == [70, 90] and target["size"].tolist() == [35, 45]


# ----------------------------------------------------------------------------------------------
# collate


def test_collate_padding_and_mask_polarity():
    a = torch.rand(3, 4, 5)
    b = torch.rand(3, 6, 3)
    batch = collate([(a, {"labels": torch.tensor([1]), "image_id": 1}), (b, {"labels": torch.tensor([]), "image_id": 2})],
                    size_divisor=4)
    assert isinstance(batch, Batch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 8, 8) and batch.masks.shape == (2, 8, 8)  # max (6, 5) -> (8, 8)
    assert batch.masks.dtype == torch.bool
    assert torch.equal(batch.images[0, :, :4, :5], a) and torch.equal(batch.images[1, :, :6, :3], b)
    expected_mask = torch.ones(2, 8, 8, dtype=torch.bool)  # True = padding
    expected_mask[0, :4, :5] = False
    expected_mask[1, :6, :3] = False
    assert torch.equal(batch.masks, expected_mask)
    assert (batch.images[0, :, 4:, :] == 0).all() and (batch.images[0, :, :, 5:] == 0).all()
    assert [t["image_id"] for t in batch.targets] == [1, 2]
    assert collate([(a, {})]).images.shape == (1, 3, 4, 5)  # size_divisor 1: no extra padding


def test_batch_to_moves_target_tensors():
    batch = collate([(torch.rand(3, 2, 2), {"boxes": torch.rand(1, 4), "image_id": 5})])
    moved = batch.to(torch.device("cpu"))
    assert moved.images.device.type == "cpu" and moved.targets[0]["boxes"].device.type == "cpu"
    assert moved.targets[0]["image_id"] == 5
    if torch.cuda.is_available():
        on_gpu = batch.to("cuda")
        assert on_gpu.masks.is_cuda and on_gpu.targets[0]["boxes"].is_cuda
