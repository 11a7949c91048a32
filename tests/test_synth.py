"""Tests for the generated COCO-format dataset (codetr.data.synth)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from codetr.data import synth
from codetr.data.coco import CocoDetection, resolve_coco_split
from codetr.data.synth import generate_synthetic_coco
from codetr.errors import DataError

SMALL = 32**2  # COCO area ranges
LARGE = 96**2


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_synth(tmp_path_factory) -> Path:
    return generate_synthetic_coco(tmp_path_factory.mktemp("synth") / "a", num_train=3, num_val=8, seed=0)


def test_same_seed_is_byte_identical_and_other_seed_differs(small_synth, tmp_path):
    again = generate_synthetic_coco(tmp_path / "b", num_train=3, num_val=8, seed=0)
    first, second = _all_files(small_synth), _all_files(again)
    assert len(first) == 3 + 8 + 2
    assert first == second
    other = _all_files(generate_synthetic_coco(tmp_path / "c", num_train=3, num_val=8, seed=1))
    assert other.keys() == first.keys()
    assert all(other[k] != first[k] for k in first)  # every image and both JSON files change


def test_val_split_does_not_depend_on_train_size(small_synth, tmp_path):
    fewer_train = generate_synthetic_coco(tmp_path / "d", num_train=1, num_val=8, seed=0)
    val = {k: v for k, v in _all_files(small_synth).items() if "val" in k}
    assert val == {k: v for k, v in _all_files(fewer_train).items() if "val" in k}


def test_pycocotools_loads_and_content_is_as_specified(small_synth):
    coco = COCO(str(small_synth / "annotations" / "instances_val2017.json"))
    cat_ids = sorted(coco.getCatIds())
    assert len(cat_ids) >= 5
    assert cat_ids != list(range(len(cat_ids))) and cat_ids != list(range(1, len(cat_ids) + 1))  # gaps
    anns = coco.loadAnns(coco.getAnnIds())
    used_cats = {a["category_id"] for a in anns}
    assert used_cats <= set(cat_ids) and len(used_cats) >= 5
    areas = np.array([a["area"] for a in anns])
    assert (areas < SMALL).any() and ((areas >= SMALL) & (areas <= LARGE)).any() and (areas > LARGE).any()
    sizes = set()
    for image_id, info in coco.imgs.items():
        with Image.open(small_synth / "val2017" / info["file_name"]) as im:
            assert im.size == (info["width"], info["height"]) and im.mode == "RGB"
        sizes.add((info["width"], info["height"]))
        assert 224 <= info["width"] <= 288 and 224 <= info["height"] <= 288
        image_anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(image_anns) <= 8
        for a in image_anns:
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= info["width"] and y + h <= info["height"]
            assert a["area"] == w * h and a["iscrowd"] == 0
    assert len(sizes) > 1  # the resize path sees different input sizes
    empty = [i for i in coco.imgs if not coco.getAnnIds(imgIds=[i])]
    assert 1 <= len(empty) < len(coco.imgs)


def test_shape_mask_is_tight_and_non_empty():
    rng = np.random.default_rng(0)
    for shape in synth.SHAPES:
        for size in (10, 60, 150):
            mask = np.asarray(synth.render_shape_mask(shape, size, rng)) > 0
            # The mask is cropped to the object's pixels, so its size is the annotated box: every
            # border row and column must touch the object.
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any(), shape
            assert max(mask.shape) <= round(size * 1.15) + 1


def test_loader_reads_generated_data(small_synth):
    dataset = CocoDetection(*resolve_coco_split(small_synth, "val"))
    assert dataset.cat_ids == [cid for cid, _ in synth.CATEGORIES]
    for idx in range(len(dataset)):
        image, target = dataset[idx]
        h, w = target["orig_size"].tolist()
        assert (image.height, image.width) == (h, w)
        boxes = target["boxes"]
        assert ((boxes[:, 0] >= 0) & (boxes[:, 2] <= w) & (boxes[:, 1] >= 0) & (boxes[:, 3] <= h)).all()
        assert ((target["labels"] >= 0) & (target["labels"] < dataset.num_classes)).all()


def _counting_generator(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = synth.generate_synthetic_coco

    def small(out_dir: Path, **_: int) -> Path:
        calls.append(out_dir)
        return real(out_dir, num_train=2, num_val=2, seed=0)

    monkeypatch.setattr(synth, "generate_synthetic_coco", small)
    return calls


def test_ensure_default_dataset_generates_once(tmp_path, monkeypatch):
    calls = _counting_generator(monkeypatch)
    root = tmp_path / "cache" / "synth"
    assert synth.ensure_default_dataset(root) == root
    assert (root / synth.COMPLETE_MARKER).is_file()
    assert resolve_coco_split(root, "train")[1].is_file()
    before = _all_files(root)
    assert synth.ensure_default_dataset(root) == root
    assert len(calls) == 1 and _all_files(root) == before
    # No temporary sibling folder is left behind.
    assert sorted(p.name for p in root.parent.iterdir() if p.is_dir()) == ["synth"]


def test_ensure_default_dataset_concurrent_callers_generate_once(tmp_path, monkeypatch):
    calls = _counting_generator(monkeypatch)
    root = tmp_path / "synth"
    results: list[Path] = []
    # flock locks belong to open file descriptions, so two threads exclude each other like two ranks.
    threads = [threading.Thread(target=lambda: results.append(synth.ensure_default_dataset(root))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [root, root] and len(calls) == 1


def test_ensure_default_dataset_cleans_up_after_failure(tmp_path, monkeypatch):
    def failing(out_dir: Path, **_: int) -> Path:
        (out_dir / "partial.txt").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "generate_synthetic_coco", failing)
    root = tmp_path / "synth"
    with pytest.raises(RuntimeError):
        synth.ensure_default_dataset(root)
    assert not root.exists()
    assert [p for p in tmp_path.iterdir() if p.is_dir()] == []


def test_ensure_default_dataset_refuses_foreign_folder(tmp_path):
    root = tmp_path / "synth"
    root.mkdir()
    (root / "mine.txt").write_text("user data")
    with pytest.raises(DataError, match="not a complete synthetic dataset"):
        synth.ensure_default_dataset(root)
    assert (root / "mine.txt").read_text() == "user data"


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CODETR_DATA", str(tmp_path / "here"))
    assert synth.default_data_dir() == tmp_path / "here"
    monkeypatch.delenv("CODETR_DATA")
    assert synth.default_data_dir() == Path.home() / ".cache" / "codetr" / "synth-v1"


def test_annotation_json_is_plain_coco(small_synth):
    data = json.loads((small_synth / "annotations" / "instances_train2017.json").read_text())
    assert {"images", "annotations", "categories"} <= data.keys()
    assert all({"id", "name", "supercategory"} <= c.keys() for c in data["categories"])
    ann_ids = [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
