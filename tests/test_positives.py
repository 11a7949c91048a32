"""Positive-query ratio: the arithmetic by hand, the real ATSS head against a brute-force recount, and
`codetr positives` end to end."""
import csv
import json
import math

import torch

from analysis.eval_subset import first_val_images, gt_boxes_xyxy_abs, image_sizes_from_masks
from analysis.positives import collect_assignment_counts, positive_ratios, summarize_head
from codetr.config import apply_overrides
from codetr.engine.inference import load_detector
from tests.test_cli import assert_one_line_error, codetr


def test_positive_ratios_by_hand():
    counts = [(10, 2), (0, 0), (6, 3)]  # the image without boxes counts in neither mean nor per-image ratios
    pooled, per_image = positive_ratios(counts)
    assert math.isclose(pooled, 16 / 5, abs_tol=1e-12)
    assert math.isclose(per_image, (10 / 2 + 6 / 3) / 2, abs_tol=1e-12)
    assert all(math.isnan(v) for v in positive_ratios([(0, 0)]))
    row = summarize_head("atss_2", "atss", counts)
    assert (row.images, row.images_with_gt, row.gts, row.positives, row.paper_coco) == (3, 2, 5, 16, 8.8)
    assert not row.depends_on_weights and summarize_head("faster_rcnn", "faster_rcnn", counts).depends_on_weights


def brute_force_atss_positives(gt_boxes: list[list[float]], height: int, width: int,
                               level_sizes: list[tuple[int, int]], strides: list[int], topk: int = 9) -> int:
    """ATSS (Zhang et al. 2020) written out with loops: anchors of side 8 * stride centred on (x * s, y * s),
    valid if the centre is inside the image; per GT and level the `topk` anchors nearest its centre; IoU
    threshold mean + std (unbiased) of those; positive if IoU >= threshold and the centre is more than
    0.01 px inside the box. Returns how many anchors are positive for at least one GT."""
    anchors = []  # per level [(x1, y1, x2, y2)]
    for (rows, cols), stride in zip(level_sizes, strides):
        half = 4.0 * stride
        anchors.append([(x * stride - half, y * stride - half, x * stride + half, y * stride + half)
                        for y in range(rows) for x in range(cols) if x * stride < width and y * stride < height])

    def iou(a, b):
        inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union

    positive = set()
    for gt in gt_boxes:
        gx, gy = (gt[0] + gt[2]) / 2, (gt[1] + gt[3]) / 2
        candidates = []
        for level, level_anchors in enumerate(anchors):
            def distance(index):
                a = level_anchors[index]
                return math.hypot((a[0] + a[2]) / 2 - gx, (a[1] + a[3]) / 2 - gy)
            nearest = sorted(range(len(level_anchors)), key=distance)[:topk]
            candidates += [(level, i, iou(level_anchors[i], gt)) for i in nearest]
        ious = [c[2] for c in candidates]
        mean = sum(ious) / len(ious)
        std = math.sqrt(sum((v - mean) ** 2 for v in ious) / (len(ious) - 1))
        for level, index, value in candidates:
            a = anchors[level][index]
            cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
            inside = min(cx - gt[0], cy - gt[1], gt[2] - cx, gt[3] - cy) > 0.01
            if value >= mean + std and inside:
                positive.add((level, index))
    return len(positive)


def test_atss_counts_equal_a_brute_force_recount(co_tiny_pp_ckpt, synth_root):
    detector = load_detector(co_tiny_pp_ckpt, "cpu", deploy=False)
    data_cfg = apply_overrides(detector.cfg, [f"data.root={synth_root}", "data.batch_size=1"]).data
    loader, _, _ = first_val_images(data_cfg, 2)
    model = detector.model
    counts = collect_assignment_counts(model, loader, torch.device("cpu"))
    for image, batch in enumerate(loader):
        size = image_sizes_from_masks(batch.masks)
        (boxes,) = gt_boxes_xyxy_abs(batch.targets, size)
        with torch.no_grad():
            out = model(batch.images, batch.masks)
            maps, _ = model.aux.feature_maps(out.memory, out.feats)
        height, width = size[0].tolist()
        expected = brute_force_atss_positives(boxes.tolist(), height, width, [tuple(m.shape[-2:]) for m in maps],
                                              model.aux.feature_maps.strides)
        assert counts["atss"][image] == (expected, len(boxes))
        positives, gts = counts["faster_rcnn"][image]
        # every GT box is added to the proposals (IoU 1), and at most 25 % of 512 sampled RoIs are positive
        assert gts == len(boxes) and min(gts, 128) <= positives <= 128


def test_cli_positives_end_to_end(co_tiny_pp_ckpt, synth_root, cli_env, tmp_path):
    result = codetr("positives", "--ckpt", co_tiny_pp_ckpt, "--data", synth_root, "--num-images", "4", "--out", tmp_path,
                    env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "atss" in result.stdout and "faster_rcnn" in result.stdout
    with open(tmp_path / "positives.csv") as f:
        rows = {row["head"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"atss", "faster_rcnn"}
    report = json.loads((tmp_path / "positives.json").read_text())
    assert report["trained"] and report["num_images"] == 4
    for head in report["heads"]:
        assert head["gts"] > 0 and math.isclose(head["ratio"], head["positives"] / head["gts"], rel_tol=1e-12)

    # no checkpoint: a freshly initialised model of the preset
    result = codetr("positives", "--preset", "co_tiny_pp", "--data", synth_root, "--num-images", "1", "--set",
                    "data.test_size=160", "--set", "data.test_max_size=200", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "freshly initialised" in result.stdout and "untrained" in result.stderr


def test_cli_positives_bad_input(cli_env, synth_root):
    result = codetr("positives", "--preset", "tiny", "--data", synth_root, env=cli_env)
    assert_one_line_error(result, "preset 'tiny' has no auxiliary heads")
