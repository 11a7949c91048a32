"""An auxiliary head's own inference (the paper's Table 11, `codetr eval --branch`) against mmdetection 3.3.

The fixture tests/fixtures/peer/aux_predict.pt was recorded by tests/peer/record_aux_predict.py in the mmdet 3.3
/ mmcv 2.1 peer venv: mmdet's ATSSHead, RPNHead + StandardRoIHead, FCOSHead, RetinaHead, GFLHead and PAAHead
(random weights, fixed seed) predicting on the same random maps at strides 8..128 (a padded batch of two
images, valid 128 x 160 and 96 x 120, originals 480 x 600 and 200 x 300) with the released Co-DETR test_cfg
(ATSS, Faster-RCNN) or mmdet's own (the others). codetr's head gets the converted weights and must give, per
image, the same detections: the same count, labels exactly, scores within SCORE_ATOL and boxes within BOX_ATOL
pixels, in network-input pixels (`detect`) and rescaled to the original image (`rescale_detections`, mmdet's
rescale=True); for Faster-RCNN also the same RPN proposals. Both sides are ordered by (label, score
descending) before the comparison (PAA's score voting returns its detections by class, the others by score).

Then the model and the command: `postprocess_aux` on a Co-DETR model, branch names and their errors, and a
tiny Co-DETR training run evaluated with `codetr eval --branch all` (typer's CliRunner).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from codetr.convert.mmdet_heads_one_stage import convert_one_stage_head
from codetr.convert.mmdet_heads_rcnn_gfl_paa import convert_head
from codetr.models.co_detr.heads.atss import ATSSHead
from codetr.models.co_detr.heads.detect import (
    ATSS_TEST, FCOS_TEST, GFL_TEST, PAA_TEST, RCNN_TEST, RETINANET_TEST, RPN_TEST, PostprocessConfig,
    rescale_detections,
)
from codetr.models.co_detr.heads.faster_rcnn import FasterRCNNHead
from codetr.models.co_detr.heads.fcos import FCOSHead
from codetr.models.co_detr.heads.gfl import GFLHead
from codetr.models.co_detr.heads.paa import PAAHead
from codetr.models.co_detr.heads.retinanet import RetinaNetHead
from codetr.models.co_detr.types import DetectingAuxHead

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "peer" / "aux_predict.pt"
SCORE_ATOL = 1e-5
BOX_ATOL = 1e-3  # pixels (network input: boxes up to 160 px; original image: up to 600 px)
KINDS = ["atss", "faster_rcnn", "fcos", "retinanet", "gfl", "paa", "paa_nms_pre200"]


@pytest.fixture(scope="module")
def fixture() -> dict:
    assert FIXTURE.is_file(), f"missing fixture {FIXTURE}: run tests/peer/record_aux_predict.py in the peer venv"
    return torch.load(FIXTURE, weights_only=True)


def released_cfg(test_cfg: dict) -> PostprocessConfig:
    """mmdet's recorded test_cfg as codetr's PostprocessConfig."""
    return PostprocessConfig(nms_pre=test_cfg.get("nms_pre", 0), score_thr=test_cfg.get("score_thr", 0.0),
                             nms_iou=test_cfg["nms"]["iou_threshold"], max_per_img=test_cfg["max_per_img"],
                             min_box_size=test_cfg.get("min_bbox_size", -1))


def build_head(kind: str, fixture: dict) -> torch.nn.Module:
    """codetr's head of `kind` with the recorded dimensions and mmdet's converted weights, in eval mode; its
    post-processing is codetr's default for the kind, which must be the recorded test_cfg."""
    record = fixture["heads"][kind]
    state = fixture["heads"][record.get("same_weights_as", kind)]["state_dict"]
    c, strides = record["config"], fixture["inputs"]["strides"]
    if kind == "faster_rcnn":
        head = FasterRCNNHead(c["num_classes"], c["in_channels"], num_convs=c["num_convs"],
                              rpn_strides=tuple(c["rpn_strides"]), roi_strides=tuple(c["roi_strides"]),
                              finest_scale=c["finest_scale"], fc_channels=c["fc_channels"])
        assert (head.rpn_test_cfg, head.rcnn_test_cfg) == (RPN_TEST, RCNN_TEST)
        assert released_cfg(record["test_cfg"]["rpn"]) == RPN_TEST
        assert released_cfg(record["test_cfg"]["rcnn"]) == RCNN_TEST
        head.load_state_dict(convert_head(kind, state, target=head.state_dict()).state_dict, strict=True)
        return head.eval()
    common = dict(num_classes=c["num_classes"], in_channels=c["in_channels"], num_convs=c["num_convs"], strides=strides)
    if kind in ("atss", "fcos", "retinanet"):
        head = {"atss": ATSSHead, "fcos": FCOSHead, "retinanet": RetinaNetHead}[kind](**common)
        head.load_state_dict(convert_one_stage_head(kind, state), strict=True)
    else:
        head = {"gfl": GFLHead, "paa": PAAHead, "paa_nms_pre200": PAAHead}[kind](**common)
        head.load_state_dict(convert_head(kind.split("_nms")[0], state, target=head.state_dict()).state_dict, strict=True)
    default = {"atss": ATSS_TEST, "fcos": FCOS_TEST, "retinanet": RETINANET_TEST, "gfl": GFL_TEST, "paa": PAA_TEST}
    recorded = released_cfg(record["test_cfg"])
    if kind == "paa_nms_pre200":
        head.test_cfg = PostprocessConfig(**{**PAA_TEST.as_dict(), "nms_pre": 200})
    else:  # PAAHead ignores min_bbox_size: codetr's PAA_TEST says so with -1
        assert head.test_cfg == (PostprocessConfig(**{**recorded.as_dict(), "min_box_size": -1}) if kind == "paa"
                                 else recorded) == default[kind]
    return head.eval()


def ordered(boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Detections sorted by label, then score (descending)."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[torch.argsort(labels[order], stable=True)]
    return boxes[order], scores[order], labels[order]


def compare(ours: dict[str, Tensor], mmdet: dict[str, Tensor], what: str) -> tuple[float, float]:
    """Assert one image's detections equal mmdet's; returns the largest (score, box) errors."""
    assert len(ours["scores"]) == len(mmdet["scores"]), f"{what}: {len(ours['scores'])} vs mmdet {len(mmdet['scores'])}"
    boxes, scores, labels = ordered(ours["boxes"], ours["scores"], ours["labels"])
    ref_boxes, ref_scores, ref_labels = ordered(mmdet["bboxes"], mmdet["scores"], mmdet["labels"])
    assert torch.equal(labels, ref_labels), f"{what}: labels differ"
    torch.testing.assert_close(scores, ref_scores, atol=SCORE_ATOL, rtol=0, msg=lambda m: f"{what} scores: {m}")
    torch.testing.assert_close(boxes, ref_boxes, atol=BOX_ATOL, rtol=0, msg=lambda m: f"{what} boxes: {m}")
    if not len(scores):
        return 0.0, 0.0
    return float((scores - ref_scores).abs().max()), float((boxes - ref_boxes).abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_detect_equals_mmdet_predict(fixture, kind):
    head = build_head(kind, fixture)
    assert isinstance(head, DetectingAuxHead)
    inputs, record = fixture["inputs"], fixture["heads"][kind]
    detections = head.detect([m.clone() for m in inputs["maps"]], inputs["image_sizes"])
    rescaled = rescale_detections(detections, inputs["image_sizes"], inputs["orig_sizes"])
    for image in range(len(detections)):
        assert len(detections[image]["scores"]) > 0
        compare(detections[image], record["input"][image], f"{kind} image {image} (input pixels)")
        compare(rescaled[image], record["rescaled"][image], f"{kind} image {image} (original pixels)")


def test_rpn_proposals_equal_mmdet(fixture):
    head = build_head("faster_rcnn", fixture)
    inputs = fixture["inputs"]
    proposals = head.rpn.propose([m.clone() for m in inputs["maps"]], inputs["image_sizes"])
    for image, (ours, mmdet) in enumerate(zip(proposals, fixture["heads"]["faster_rcnn"]["proposals"])):
        assert len(ours) == len(mmdet["bboxes"]) > 100, f"image {image}"
        torch.testing.assert_close(ours, mmdet["bboxes"], atol=BOX_ATOL, rtol=0)  # both sorted by objectness


# ----------------------------------------------------------------------------------------- model and command
def co_model(heads: str):
    """A small Co-DETR model (co_tiny with the given heads, random weights) in eval mode."""
    from codetr.config import apply_overrides, get_preset
    from codetr.models.detector import build_detector

    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("co_tiny"), [f"model.aux.heads={heads}", "model.num_queries=20"])
    return build_detector(cfg.model, 3).eval()


def test_postprocess_aux_runs_the_head_on_the_encoder_maps_and_rescales():
    """postprocess_aux = the head's detect on the auxiliary maps of the forward's encoder output (the padded
    image's valid size from its mask), boxes scaled per axis by orig / valid size: inside the original image."""
    model = co_model("[atss,faster_rcnn]")
    images, masks = torch.randn(2, 3, 96, 128), torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, 64:, :] = masks[1, :, 80:] = True  # image 1 is 64 x 80 inside the padded batch
    orig_sizes = torch.tensor([[300.0, 400.0], [200.0, 120.0]])  # image 1 scaled unevenly (x 1.5, y 3.125)
    out = model(images, masks)
    for name in ("atss", "faster_rcnn"):
        results = model.postprocess_aux(name, out, masks, orig_sizes)
        maps, _ = model.aux.feature_maps(out.memory, out.feats)
        head = model.aux.heads[model.aux.names.index(name)]
        direct = head.detect(maps, torch.tensor([[96, 128], [64, 80]]))
        for image, (result, raw, (h, w)) in enumerate(zip(results, direct, orig_sizes.tolist())):
            assert 0 < len(result["scores"]) <= 100 and result["labels"].max() < 3
            assert torch.equal(result["scores"], raw["scores"]) and torch.equal(result["labels"], raw["labels"])
            factor = torch.tensor([w, h, w, h]) / torch.tensor([[128, 96], [80, 64]][image] * 2)
            torch.testing.assert_close(result["boxes"], raw["boxes"] * factor)
            assert float(result["boxes"][:, 0::2].max()) <= w + 1e-3 and float(result["boxes"][:, 1::2].max()) <= h + 1e-3
        predicted = model.predict_aux(name, images, masks, orig_sizes)
        assert all(torch.equal(p["boxes"], r["boxes"]) for p, r in zip(predicted, results))


def test_branch_names_and_their_errors():
    from codetr.engine.branch_eval import resolve_branches
    from codetr.errors import ConfigError

    model = co_model("[atss,atss]")
    assert resolve_branches(model, []) == ["detr"]
    assert resolve_branches(model, ["all"]) == ["detr", "atss", "atss_2"]
    assert resolve_branches(model, ["atss_2", "detr", "atss_2"]) == ["atss_2", "detr"]
    with pytest.raises(ConfigError, match=r"--branch 'fcos': no such branch; this checkpoint's branches: detr, atss, "
                                          r"atss_2 \(or all\)"):
        resolve_branches(model, ["fcos"])
    model.aux.heads[1] = torch.nn.Linear(1, 1)  # a head kind without detect()
    with pytest.raises(ConfigError, match=r"--branch 'atss_2': atss heads have no inference in codetr; this "
                                          r"checkpoint's branches: detr, atss \(or all\)"):
        resolve_branches(model, ["atss_2"])
    assert resolve_branches(model, ["all"]) == ["detr", "atss"]


@pytest.fixture(scope="module")
def co_run(synth_root, tmp_path_factory) -> Path:
    """co_tiny with every head kind (and a repeat) trained for 2 iterations at ~160 px; returns its last.pt."""
    from codetr.config import apply_overrides, get_preset
    from codetr.engine.train import train

    out = tmp_path_factory.mktemp("co_all_heads")
    cfg = apply_overrides(get_preset("co_tiny"), [
        f"data.root={synth_root}", "optim.epochs=1", "train.max_iters_per_epoch=2", "data.batch_size=2",
        "data.train_scales=[160]", "data.max_size=200", "data.augment=false", "data.test_size=160",
        "data.test_max_size=200", "data.num_workers=0", "train.seed=0", "model.num_queries=20",
        "model.num_detections=20", "model.aux.heads=[atss,faster_rcnn,fcos,retinanet,gfl,paa,atss]",
    ])
    train(cfg, out, progress=False)
    return out / "last.pt"


@pytest.mark.slow
def test_eval_branch_all_through_the_command(co_run, synth_root, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    branches = ["detr", "atss", "faster_rcnn", "fcos", "retinanet", "gfl", "paa", "atss_2"]
    result = CliRunner().invoke(app, ["eval", "--ckpt", str(co_run), "--out", str(tmp_path / "all"), "--branch", "all"])
    assert result.exit_code == 0, result.output
    assert all(f"│ {name} " in result.output for name in branches), result.output
    images = {image["id"]: image for image in json.loads((synth_root / "annotations" / "instances_val2017.json")
                                                          .read_text())["images"]}
    for name in branches:
        suffix = "" if name == "detr" else f"_{name}"
        metrics = json.loads((tmp_path / "all" / f"metrics{suffix}.json").read_text())
        assert {"AP", "AP50", "AP75", "AR100"} <= set(metrics) and metrics.get("branch") == (None if name == "detr" else name)
        detections = json.loads((tmp_path / "all" / f"detections{suffix}.json").read_text())
        per_image = {i: sum(d["image_id"] == i for d in detections) for i in images}
        assert max(per_image.values()) <= (20 if name == "detr" else 100), name
        for d in detections:  # boxes in the original image's pixels
            x, y, w, h = d["bbox"]
            image = images[d["image_id"]]
            assert -0.01 <= x and x + w <= image["width"] + 0.02 and -0.01 <= y and y + h <= image["height"] + 0.02, d
    assert json.loads((tmp_path / "all" / "metrics_atss.json").read_text())["postprocess"]["test_cfg"] == ATSS_TEST.as_dict()
    settings = json.loads((tmp_path / "all" / "metrics_faster_rcnn.json").read_text())["postprocess"]
    assert settings == {"rpn_test_cfg": RPN_TEST.as_dict(), "rcnn_test_cfg": RCNN_TEST.as_dict()}

    # the default is today's command: the one-to-one head alone (without the auxiliary weights), the same numbers
    result = CliRunner().invoke(app, ["eval", "--ckpt", str(co_run), "--out", str(tmp_path / "detr")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "detr").iterdir()) == ["detections.json", "metrics.json"]
    assert (tmp_path / "detr" / "detections.json").read_text() == (tmp_path / "all" / "detections.json").read_text()

    result = CliRunner().invoke(app, ["eval", "--ckpt", str(co_run), "--out", str(tmp_path / "two"),
                                      "--branch", "atss_2", "--branch", "faster_rcnn"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        "detections_atss_2.json", "detections_faster_rcnn.json", "metrics_atss_2.json", "metrics_faster_rcnn.json"]

    result = CliRunner().invoke(app, ["eval", "--ckpt", str(co_run), "--out", str(tmp_path / "bad"), "--branch", "yolo"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: --branch 'yolo': no such branch; this checkpoint's branches: detr, atss, faster_rcnn, "
                     "fcos, retinanet, gfl, paa, atss_2 (or all)"], result.output
    assert not (tmp_path / "bad").exists()
