"""COCO evaluation against pycocotools called directly, on hand-built ground truth."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import random
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from codetr.engine.evaluate import (
    METRIC_NAMES,
    coco_evaluate,
    detections_to_coco,
    evaluate,
    format_metrics_table,
    write_eval_outputs,
)
from codetr.errors import ConfigError, DataError

CAT_IDS = [3, 7, 12]  # non-contiguous on purpose: label i <-> CAT_IDS[i]
IMAGE_SIZES = {1: (480, 640), 2: (480, 640), 5: (400, 600), 9: (640, 480)}  # id -> (h, w)


def make_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_dataset(with_large: bool = True) -> dict:
    """Small (< 32^2), medium and (optionally) large boxes over 3 categories and 4 images."""
    boxes = [  # image_id, category_id, [x, y, w, h]
        (1, 3, [10, 10, 20, 15]),  # small
        (1, 7, [100, 120, 60, 50]),  # medium
        (1, 12, [300, 200, 150, 140]),  # large
        (2, 3, [50, 60, 25, 25]),  # small
        (2, 3, [400, 300, 80, 70]),  # medium
        (5, 7, [20, 30, 200, 180]),  # large
        (5, 12, [350, 100, 40, 45]),  # medium
        (9, 7, [5, 400, 12, 10]),  # small
        (9, 12, [100, 100, 300, 400]),  # large
    ]
    if not with_large:
        boxes = [b for b in boxes if b[2][2] * b[2][3] < 96**2]
    return {
        "images": [{"id": i, "height": h, "width": w, "file_name": f"{i}.jpg"} for i, (h, w) in IMAGE_SIZES.items()],
        "categories": [{"id": c, "name": f"cat{c}"} for c in CAT_IDS],
        "annotations": [
            {"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for k, (i, c, b) in enumerate(boxes)
        ],
    }


def direct_metrics(coco_gt: COCO, records: list[dict], image_ids: list[int] | None = None) -> list[float]:
    """The reference: pycocotools' loadRes + COCOeval, exactly as its README uses them."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(records))
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        if image_ids is not None:
            coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats]


def perturbed_records(coco_gt: COCO, seed: int) -> list[dict]:
    """Jittered GT boxes, some relabelled, plus false positives, all with random scores."""
    rng = random.Random(seed)
    records = []
    for ann in coco_gt.dataset["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(rng.randint(1, 3)):
            jitter = [rng.uniform(-0.25, 0.25) * s for s in (w, h, w, h)]
            records.append(
                {
                    "image_id": ann["image_id"],
                    "category_id": ann["category_id"] if rng.random() < 0.8 else rng.choice(CAT_IDS),
                    "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                    "score": rng.random(),
                }
            )
    for image_id, (h, w) in IMAGE_SIZES.items():
        for _ in range(5):
            bw, bh = rng.uniform(5, w / 2), rng.uniform(5, h / 2)
            records.append(
                {
                    "image_id": image_id,
                    "category_id": rng.choice(CAT_IDS),
                    "bbox": [rng.uniform(0, w - bw), rng.uniform(0, h - bh), bw, bh],
                    "score": rng.random() * 0.5,
                }
            )
    return records


def test_metric_names_match_cocoeval_summary_order():
    # The summary's 12 lines, parsed from pycocotools' own printout, in stats order.
    coco_gt = make_coco(gt_dataset())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(perturbed_records(coco_gt, 0)), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        out.truncate(0)
        out.seek(0)
        coco_eval.summarize()
    lines = out.getvalue().splitlines()
    assert len(lines) == len(METRIC_NAMES) == 12
    parsed = []
    for line in lines:
        kind = "AP" if "(AP)" in line else "AR"
        iou = line.split("IoU=")[1].split("|")[0].strip()
        area = line.split("area=")[1].split("|")[0].strip()
        max_dets = int(line.split("maxDets=")[1].split("]")[0])
        if kind == "AP":
            by_area = {"all": "AP", "small": "APs", "medium": "APm", "large": "APl"}
            name = {"0.50": "AP50", "0.75": "AP75"}.get(iou, by_area[area])
        else:
            name = {"all": f"AR{max_dets}", "small": "ARs", "medium": "ARm", "large": "ARl"}[area]
        parsed.append(name)
    assert tuple(parsed) == METRIC_NAMES


def test_perfect_detections_give_ap_one():
    coco_gt = make_coco(gt_dataset())
    records = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in coco_gt.dataset["annotations"]
    ]
    metrics = coco_evaluate(coco_gt, records, verbose=False)
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "ARs", "ARm", "ARl"):
        # 1e-12: COCOeval computes precision as tp / (tp + fp + eps), i.e. 1 - 1e-16 here.
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_detections_match_pycocotools(seed):
    coco_gt = make_coco(gt_dataset())
    records = perturbed_records(coco_gt, seed)
    before = copy.deepcopy(records)
    metrics = coco_evaluate(coco_gt, records, verbose=False)
    expected = direct_metrics(coco_gt, records)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(expected, abs=1e-12, rel=0)
    assert 0.0 < metrics["AP"] < 1.0  # the case is not degenerate
    assert records == before  # loadRes mutates records; ours must not


def test_image_subset_matches_pycocotools():
    coco_gt = make_coco(gt_dataset())
    records = perturbed_records(coco_gt, 3)
    metrics = coco_evaluate(coco_gt, records, image_ids=[2, 9], verbose=False)
    expected = direct_metrics(coco_gt, records, image_ids=[2, 9])
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(expected, abs=1e-12, rel=0)
    assert expected != direct_metrics(coco_gt, records)  # the restriction matters here


def test_empty_detections():
    coco_gt = make_coco(gt_dataset(with_large=False))
    metrics = coco_evaluate(coco_gt, [], verbose=False)
    # No detections: 0 where GT exists, COCOeval's -1 where no GT object has that size.
    expected = {n: 0.0 for n in METRIC_NAMES} | {"APl": -1.0, "ARl": -1.0}
    assert metrics == expected  # exact


def test_verbose_prints_the_pycocotools_summary(capsys):
    coco_gt = make_coco(gt_dataset())
    records = perturbed_records(coco_gt, 4)
    coco_evaluate(coco_gt, records, verbose=False)
    assert capsys.readouterr().out == ""
    metrics = coco_evaluate(coco_gt, records, verbose=True)
    printed = capsys.readouterr().out
    # Reference text: pycocotools' own summarize() output.
    reference = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(records)), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    with contextlib.redirect_stdout(reference):
        coco_eval.summarize()
    assert printed == reference.getvalue()
    assert format_metrics_table(metrics) == reference.getvalue().rstrip("\n")


def test_bad_records_raise_one_line_errors():
    coco_gt = make_coco(gt_dataset())
    with pytest.raises(DataError, match="image_id 77"):
        coco_evaluate(coco_gt, [{"image_id": 77, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 0.5}])
    with pytest.raises(DataError, match="lacks key"):
        coco_evaluate(coco_gt, [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}])


def test_detections_to_coco_hand_computed():
    results = [
        {
            "scores": torch.tensor([0.9, 0.25]),
            "labels": torch.tensor([2, 0]),
            "boxes": torch.tensor([[10.0, 20.0, 50.0, 80.0], [1.234, 5.678, 10.5, 20.25]]),
        },
        {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
        {"scores": torch.tensor([0.5]), "labels": torch.tensor([1]), "boxes": torch.tensor([[0.0, 0.0, 640.0, 480.0]])},
    ]
    records = detections_to_coco(results, [5, 1, 9], CAT_IDS)
    expected = [
        {"image_id": 5, "category_id": 12, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.9},
        # 10.5 - 1.234 = 9.266 -> 9.27; 20.25 - 5.678 = 14.572 -> 14.57
        {"image_id": 5, "category_id": 3, "bbox": [1.23, 5.68, 9.27, 14.57], "score": 0.25},
        {"image_id": 9, "category_id": 7, "bbox": [0.0, 0.0, 640.0, 480.0], "score": 0.5},
    ]
    assert len(records) == len(expected)
    for got, want in zip(records, expected):
        assert got["image_id"] == want["image_id"] and type(got["image_id"]) is int
        assert got["category_id"] == want["category_id"] and type(got["category_id"]) is int
        assert got["bbox"] == pytest.approx(want["bbox"], abs=1e-9)  # rounded to 2 decimals
        assert all(type(v) is float for v in got["bbox"])
        assert got["score"] == pytest.approx(want["score"], abs=1e-7)  # float32 score
    json.dumps(records)  # plain python types only

    with pytest.raises(ConfigError, match="label 3"):
        detections_to_coco([{**results[2], "labels": torch.tensor([3])}], [9], CAT_IDS)


# --- evaluate() with a fake model -----------------------------------------------------------


@dataclass
class FakeBatch:
    """Stands in for codetr.data.collate.Batch: the fields and `.to` that `evaluate` uses."""

    images: torch.Tensor  # [B,3,H,W]; images[b, 0, 0, 0] carries the image id for FakeModel
    masks: torch.Tensor  # [B,H,W] True = pad
    targets: list[dict] = field(default_factory=list)

    def to(self, device):
        targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in self.targets]
        return FakeBatch(self.images.to(device), self.masks.to(device), targets)


class FakeModel(nn.Module):
    """forward returns stored detections (boxes xyxy normalised to [0,1]); postprocess scales them."""

    def __init__(self, stored: dict[int, dict]):
        super().__init__()
        self.stored = stored
        self.modes_seen: list[bool] = []

    def forward(self, images, masks):
        self.modes_seen.append(self.training)
        ids = [int(i) for i in images[:, 0, 0, 0]]
        return {"per_image": [self.stored[i] for i in ids]}

    def postprocess(self, outputs, orig_sizes):
        results = []
        for det, (h, w) in zip(outputs["per_image"], orig_sizes.tolist()):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32)
            results.append({"scores": det["scores"], "labels": det["labels"], "boxes": det["boxes_norm"] * scale})
        return results


def fake_detections(seed: int) -> dict[int, dict]:
    """Per image: GT-like boxes on a 1/32 grid + noise boxes.

    Grid points scaled by the image sizes are multiples of 0.25 px: exact in float32 and unchanged by
    detections_to_coco's rounding to 2 decimals, so the records can be compared exactly.
    """
    gen = torch.Generator().manual_seed(seed)
    stored = {}
    coco_gt = make_coco(gt_dataset())
    for image_id, (h, w) in IMAGE_SIZES.items():
        boxes, labels = [], []
        for ann in coco_gt.imgToAnns[image_id]:
            x, y, bw, bh = ann["bbox"]
            xyxy = torch.tensor([x / w, y / h, (x + bw) / w, (y + bh) / h])
            boxes.append(torch.round(xyxy * 32 + torch.randint(-1, 2, (4,), generator=gen)) / 32)
            labels.append(CAT_IDS.index(ann["category_id"]))
        for _ in range(3):
            x1y1 = torch.randint(0, 16, (2,), generator=gen)
            boxes.append(torch.cat([x1y1, x1y1 + torch.randint(1, 16, (2,), generator=gen)]).float() / 32)
            labels.append(int(torch.randint(0, 3, (1,), generator=gen)))
        stored[image_id] = {
            "boxes_norm": torch.stack(boxes).clamp(0, 1),
            "labels": torch.tensor(labels),
            "scores": torch.rand(len(labels), generator=gen),
        }
    return stored


def make_batches(image_ids_per_batch: list[list[int]]) -> list[FakeBatch]:
    batches = []
    for ids in image_ids_per_batch:
        images = torch.zeros(len(ids), 3, 8, 8)
        images[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        targets = [
            {"image_id": i, "orig_size": torch.tensor(IMAGE_SIZES[i], dtype=torch.int64), "size": torch.tensor([8, 8])}
            for i in ids
        ]
        batches.append(FakeBatch(images, torch.zeros(len(ids), 8, 8, dtype=torch.bool), targets))
    return batches


def expected_records(stored: dict[int, dict], image_ids: list[int]) -> list[dict]:
    records = []
    for image_id in sorted(set(image_ids)):
        h, w = IMAGE_SIZES[image_id]
        det = stored[image_id]
        rows = zip(det["boxes_norm"].tolist(), det["labels"].tolist(), det["scores"].tolist())
        for (x1, y1, x2, y2), label, score in rows:
            x1, x2, y1, y2 = x1 * w, x2 * w, y1 * h, y2 * h
            records.append(
                {
                    "image_id": image_id,
                    "category_id": CAT_IDS[label],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": score,
                }
            )
    return records


def test_evaluate_with_fake_model_matches_pycocotools():
    coco_gt = make_coco(gt_dataset())
    stored = fake_detections(0)
    model = FakeModel(stored).train()
    # Image 2 appears twice, as a DistributedSampler's padding would repeat it: it must count once.
    loader = make_batches([[1, 2], [5], [9, 2]])
    metrics, records = evaluate(model, loader, coco_gt, CAT_IDS, torch.device("cpu"), progress=False)

    want = expected_records(stored, [1, 2, 5, 9])
    assert len(records) == len(want)
    for got, ref in zip(records, want):
        assert (got["image_id"], got["category_id"]) == (ref["image_id"], ref["category_id"])
        assert got["bbox"] == pytest.approx(ref["bbox"], abs=1e-9)  # 1/32 grid scaled: exact
        assert got["score"] == pytest.approx(ref["score"], abs=0)
    expected = direct_metrics(coco_gt, want)
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(expected, abs=1e-12, rel=0)
    assert 0.0 < metrics["AP"] < 1.0
    assert model.modes_seen == [False, False, False]  # ran in eval mode
    assert model.training  # and the caller's mode is restored


def test_evaluate_subset_loader_only_scores_its_images():
    coco_gt = make_coco(gt_dataset())
    stored = fake_detections(1)
    metrics, _ = evaluate(FakeModel(stored), make_batches([[5, 9]]), coco_gt, CAT_IDS, "cpu", progress=False)
    expected = direct_metrics(coco_gt, expected_records(stored, [5, 9]), image_ids=[5, 9])
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(expected, abs=1e-12, rel=0)


def test_write_eval_outputs_round_trip(tmp_path):
    coco_gt = make_coco(gt_dataset())
    stored = fake_detections(2)
    loader = make_batches([[1, 2, 5, 9]])
    metrics, records = evaluate(FakeModel(stored), loader, coco_gt, CAT_IDS, "cpu", progress=False)
    metrics_path, detections_path = write_eval_outputs(
        tmp_path / "eval", metrics, records, extra={"checkpoint": tmp_path / "ckpt.pth", "epoch": 3}
    )
    written = json.loads(metrics_path.read_text())
    recorded_hash = written.pop("detections_sha256")
    assert recorded_hash == hashlib.sha256(detections_path.read_bytes()).hexdigest()
    assert written == {**metrics, "checkpoint": str(tmp_path / "ckpt.pth"), "epoch": 3}
    # detections.json is a valid COCO results file reproducing the same metrics.
    reloaded = json.loads(detections_path.read_text())
    assert reloaded == records
    assert direct_metrics(coco_gt, reloaded) == pytest.approx([metrics[n] for n in METRIC_NAMES], abs=1e-12, rel=0)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["detections.json", "metrics.json"]  # no temp files



class HalfOutputModel(FakeModel):
    """Emits float16 boxes and records the autocast state and the dtype postprocess receives."""

    def forward(self, images, masks):
        self.autocast_seen = torch.is_autocast_enabled(images.device.type)
        out = super().forward(images, masks)
        half = [{**d, "boxes_norm": d["boxes_norm"].to(images.device, torch.float16)} for d in out["per_image"]]
        return {"per_image": half}

    def postprocess(self, outputs, orig_sizes):
        self.postprocess_dtype = outputs["per_image"][0]["boxes_norm"].dtype
        cpu = [{**d, "boxes_norm": d["boxes_norm"].cpu()} for d in outputs["per_image"]]
        return super().postprocess({"per_image": cpu}, orig_sizes.cpu())


def test_amp_is_ignored_off_cuda():
    model = HalfOutputModel(fake_detections(4))
    evaluate(model, make_batches([[1, 2]]), make_coco(gt_dataset()), CAT_IDS, "cpu", amp=True, progress=False)
    assert model.autocast_seen is False
    assert model.postprocess_dtype == torch.float16  # no autocast, so outputs are passed through as they are


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast for evaluation is CUDA-only")
def test_amp_on_cuda_autocasts_and_postprocesses_in_float32():
    stored = fake_detections(4)
    model = HalfOutputModel(stored)
    coco_gt = make_coco(gt_dataset())
    metrics, _ = evaluate(model, make_batches([[1, 2], [5, 9]]), coco_gt, CAT_IDS, "cuda", amp=True, progress=False)
    assert model.autocast_seen is True
    assert model.postprocess_dtype == torch.float32
    # 1/32-grid boxes are exact in float16 too, so the metrics are pycocotools' to 1e-12.
    expected = direct_metrics(coco_gt, expected_records(stored, [1, 2, 5, 9]))
    assert [metrics[n] for n in METRIC_NAMES] == pytest.approx(expected, abs=1e-12, rel=0)

# --- distributed: 2 gloo ranks on CPU ------------------------------------------------------


def _distributed_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        coco_gt = make_coco(gt_dataset())
        # Rank 1 re-sees image 1, as a padding DistributedSampler does when len % world_size != 0.
        ids = [[1, 2], [5]] if rank == 0 else [[9, 1]]
        model = FakeModel(fake_detections(3))
        metrics, records = evaluate(model, make_batches(ids), coco_gt, CAT_IDS, "cpu", progress=False)
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump({"metrics": metrics, "records": records}, f)
    finally:
        dist.destroy_process_group()


def test_evaluate_distributed_gathers_on_rank0(tmp_path):
    mp.spawn(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True
    )
    rank0 = json.loads((tmp_path / "out.0").read_text())
    rank1 = json.loads((tmp_path / "out.1").read_text())
    assert rank1 == {"metrics": {}, "records": []}
    want = expected_records(fake_detections(3), [1, 2, 5, 9])
    assert [(r["image_id"], r["category_id"]) for r in rank0["records"]] == [
        (r["image_id"], r["category_id"]) for r in want
    ]
    coco_gt = make_coco(gt_dataset())
    expected = direct_metrics(coco_gt, want)
    assert [rank0["metrics"][n] for n in METRIC_NAMES] == pytest.approx(expected, abs=1e-12, rel=0)
