"""Whole-detector equivalence with mmdetection 3.3's DeformableDETR, through the mmdet3 converter.

The fixtures (tests/fixtures/peer/deformable_detr_*.pt) were recorded from mmdet 3.3 + mmcv 2.1 by
tests/peer/record_deformable_detr.py: its own configs for plain, box refine and box refine + two-stage,
shrunk (ResNet-18, 2 encoder / 3 decoder layers, 20 queries, 6 classes, dropout 0), on a batch of two
padded images of different sizes with ground truth. Each test converts the recorded mmdet state dict
with `codetr.convert.mmdet3.convert`, builds codetr's detector from the converted config and requires
every recorded tensor in float32: neck maps (plain), encoder memory, the queries' initial references,
the two-stage proposals and their top-k, every decoder layer's logits and boxes, every loss term and
the post-processed predictions. The weights are regenerated, not stored (see the recorder): the test
first checks that the regeneration reproduces the recorded per-tensor sums.

Settings chosen for the peer: the converter turns mixed selection and look-forward-twice off (mmdet's
two-stage model has neither); codetr's defaults would differ there by design (README presets).

Tolerances (float32, both sides on the CPU; the frameworks order their sums differently and codetr's
convolutions run channels-last), with the largest errors measured at recording time:
  activations (neck, memory, references, proposals, per-layer logits and boxes): atol 2e-4 + rtol 2e-4
    (measured: memory 2.9e-5, neck 1.0e-5, proposal logits 6.7e-6, layer logits 6.2e-6, boxes 7.8e-7);
  losses (weighted, as mmdet reports them): atol 1e-6 + rtol 2e-5 (measured: 5.7e-6 on enc_loss_cls = 21.5,
    otherwise <= 2.6e-6);
  prediction scores atol 1e-5 (measured 9.2e-7), labels exact, boxes atol 1e-3 px (measured 1.9e-4 px on
    boxes up to 200 px; some boxes are clipped at the image border, so the clipping is exercised).
Top-k orders (the two-stage selection, the post-processing) are compared exactly; each test first
checks that the recording's scores are further from a tie than the frameworks are from each other.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from codetr.box_ops import box_xyxy_to_cxcywh
from codetr.convert.common import Conversion, ConversionError
from codetr.convert.mmdet3 import convert
from codetr.engine.checkpoint import save_checkpoint
from codetr.engine.inference import load_detector
from codetr.config import Config
from codetr.models.criterion import build_criterion
from codetr.models.detector import DeformableDETR, DetectorOutput, build_detector

FIXTURES = Path(__file__).parent / "fixtures" / "peer"
VARIANTS = ["plain", "refine", "twostage_refine"]
ACT = dict(atol=2e-4, rtol=2e-4)  # activations: memory, references, per-layer logits and boxes
LOSS = dict(atol=1e-6, rtol=2e-5)
SCORE_ATOL = 1e-5
# mmdet's loss names -> codetr's term types
MMDET_TERMS = {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_iou": "loss_giou"}


def hashed_uniform(numel: int, seed: int) -> Tensor:
    """The recorder's weight fill (tests/peer/record_deformable_detr.py), repeated here because tests
    never import the peer scripts; the recorded per-tensor sums prove both copies agree."""
    h = torch.arange(numel, dtype=torch.int64) + seed * 1_000_003
    for _ in range(3):
        h = (h * 1103515245 + 12345) % 2**31
        h = h ^ (h >> 16)
    return (h.double() / 2**30 - 1).float()


def mmdet_state_dict(records: list[dict]) -> dict[str, Tensor]:
    """The recorded mmdet state dict, regenerated: shared modules' keys alias their first key."""
    state: dict[str, Tensor] = {}
    for r in records:
        if r["dtype"] == "int64":
            state[r["key"]] = torch.zeros(r["shape"], dtype=torch.int64)
        elif r["alias_of"] is not None:
            state[r["key"]] = state[r["alias_of"]]
        else:
            numel = int(torch.Size(r["shape"]).numel())
            state[r["key"]] = (hashed_uniform(numel, r["seed"]) * r["scale"] + r["shift"]).view(r["shape"])
    return state


@dataclass
class Run:
    fixture: dict
    mmdet_state: dict[str, Tensor]
    conversion: Conversion
    model: DeformableDETR
    out: DetectorOutput
    targets: list[dict[str, Tensor]]


def batch_inputs(fixture: dict) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """(images [B, 3, H, W], masks [B, H, W] True = padding, codetr targets: cxcywh normalised to each
    image's valid region)."""
    inputs = fixture["inputs"]
    images = inputs["images"]
    masks = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool)
    targets = []
    for i, (h, w) in enumerate(inputs["img_shapes"].tolist()):
        masks[i, :h, :w] = False
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        targets.append({"labels": inputs["gt_labels"][i], "boxes": box_xyxy_to_cxcywh(inputs["gt_bboxes"][i] / scale)})
    return images, masks, targets


@functools.lru_cache(maxsize=None)
def run(variant: str) -> Run:
    fixture = torch.load(FIXTURES / f"deformable_detr_{variant}.pt", weights_only=True)
    state = mmdet_state_dict(fixture["weights"])
    info = fixture["variant"]
    conversion = convert(state, num_queries=info["num_queries"] if info["as_two_stage"] else None)
    conversion.model.num_detections = info["max_per_img"]
    model = build_detector(conversion.model, conversion.num_classes)
    model.load_state_dict(conversion.state_dict, strict=True)
    model.eval()
    images, masks, targets = batch_inputs(fixture)
    with torch.no_grad():
        out = model(images, masks)
    return Run(fixture, state, conversion, model, out, targets)


@pytest.fixture(params=VARIANTS)
def variant(request) -> str:
    return request.param


def test_regenerated_weights_are_the_recorded_ones(variant):
    r = run(variant)
    for record in r.fixture["weights"]:
        total = float(r.mmdet_state[record["key"]].double().sum())
        assert total == pytest.approx(record["sum"], rel=1e-12, abs=1e-9), record["key"]


def test_converter_reads_the_architecture(variant):
    r = run(variant)
    info, cfg = r.fixture["variant"], r.conversion.model
    assert (cfg.two_stage, cfg.with_box_refine) == (info["as_two_stage"], info["with_box_refine"])
    assert (cfg.mixed_selection, cfg.look_forward_twice) == (False, False)
    assert cfg.num_queries == info["num_queries"] and r.conversion.num_classes == info["num_classes"]
    assert cfg.backbone.depth == 18
    t = cfg.transformer
    assert (t.d_model, t.num_heads, t.num_points, t.num_encoder_layers, t.num_decoder_layers, t.ffn_dim) == (
        info["embed_dims"], 8, info["num_points"], 2, 3, 128)
    # only BatchNorm's counters are left behind, and every other mmdet tensor is carried
    assert all(k.endswith("num_batches_tracked") for k in r.conversion.skipped)
    assert len(r.conversion.skipped) + len(r.conversion.state_dict) == len(r.mmdet_state)


def test_neck_maps_match_mmdet():
    """The backbone + channel mapper, checked once (plain variant): the other variants share them."""
    r = run("plain")
    maps = r.model.neck(r.model.backbone(r.fixture["inputs"]["images"]))
    assert len(maps) == len(r.fixture["neck"]) == 4
    for ours, theirs in zip(maps, r.fixture["neck"]):
        torch.testing.assert_close(ours, theirs, **ACT)


def test_encoder_memory_matches_mmdet(variant):
    r = run(variant)
    torch.testing.assert_close(r.out.memory, r.fixture["memory"], **ACT)


def test_initial_references_and_proposals_match_mmdet(variant):
    r = run(variant)
    f = r.fixture
    if not f["variant"]["as_two_stage"]:
        assert r.out.enc_logits is None
        _, _, reference = r.model.transformer.learned_queries(r.out.memory.shape[0])
        torch.testing.assert_close(reference, f["init_reference"], **ACT)
        return
    torch.testing.assert_close(r.out.enc_logits, f["enc_cls"], **ACT)
    # invalid tokens (padding, borders) sit at sigmoid(inf) = 1 on both sides
    torch.testing.assert_close(r.out.enc_boxes, f["enc_boxes"], **ACT)
    # The top-k order is compared exactly, which is meaningful only if the recording's scores are
    # further from a tie than the two frameworks are from each other.
    error = float((r.out.enc_logits[..., 0] - f["enc_cls"][..., 0]).abs().max())
    assert f["topk_margin"] > 10 * error, f"top-k margin {f['topk_margin']:.1e} vs score error {error:.1e}"
    topk = r.out.enc_logits[..., 0].topk(f["variant"]["num_queries"], dim=1).indices
    assert torch.equal(topk, f["topk_indices"])
    selected = r.model.transformer.propose(r.out.memory, r.out.feats).topk_boxes_unact.sigmoid()
    torch.testing.assert_close(selected, f["init_reference"], **ACT)


def test_every_decoder_layer_matches_mmdet(variant):
    r = run(variant)
    assert len(r.out.layers) == len(r.fixture["layers_cls"]) == 3
    for layer, (logits, boxes) in enumerate(r.out.layers):
        torch.testing.assert_close(logits, r.fixture["layers_cls"][layer], **ACT, msg=lambda m: f"layer {layer}: {m}")
        torch.testing.assert_close(boxes, r.fixture["layers_boxes"][layer], **ACT, msg=lambda m: f"layer {layer}: {m}")


def mmdet_loss_name(codetr_name: str, num_layers: int) -> str:
    """codetr's raw term name -> mmdet's: dec.d{l}.loss_giou -> d{l}.loss_iou (the last layer has no
    prefix), enc.loss_cls -> enc_loss_cls."""
    group, *middle, term = codetr_name.split(".")
    mmdet_term = {v: k for k, v in MMDET_TERMS.items()}[term]
    if group == "enc":
        return f"enc_{mmdet_term}"
    layer = int(middle[0][1:])
    return mmdet_term if layer == num_layers - 1 else f"d{layer}.{mmdet_term}"


def test_every_loss_term_matches_mmdet(variant):
    """mmdet's terms carry its loss weights (2, 5, 2); codetr's are raw and weighted by its own table,
    so codetr's weighted term is compared with mmdet's."""
    r = run(variant)
    criterion = build_criterion(r.model, r.conversion.model)
    with torch.no_grad():
        losses = criterion(r.out, r.targets)
    recorded = r.fixture["losses"]
    names = {mmdet_loss_name(name, 3): name for name in losses}
    assert set(names) == set(recorded), f"terms differ: codetr {sorted(names)} vs mmdet {sorted(recorded)}"
    for mmdet_name, name in names.items():
        weighted = losses[name] * criterion.weights(name)
        theirs = recorded[mmdet_name].float().reshape(())  # mmdet returns some terms with shape [1]
        torch.testing.assert_close(weighted, theirs, **LOSS, msg=lambda m: f"{name}: {m}")


def check_predictions(predictions: list[dict[str, Tensor]], fixture: dict) -> None:
    """Scores atol 1e-5, labels exact, boxes atol 1e-3 px. Labels and the order of the top-k are
    compared exactly, so the recording's scores must be further from a tie than the tolerance."""
    assert fixture["score_margin"] > 2 * SCORE_ATOL, f"score margin {fixture['score_margin']:.1e} is too close to a tie"
    for ours, theirs in zip(predictions, fixture["predictions"], strict=True):
        torch.testing.assert_close(ours["scores"], theirs["scores"], atol=SCORE_ATOL, rtol=0)
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["bboxes"], atol=1e-3, rtol=0)


def test_postprocessed_predictions_match_mmdet(variant):
    """Top-k scores, labels and boxes in original-image pixels (mmdet: clipped to the resized image,
    divided by the scale factor; codetr: scaled to the original size, clipped to it)."""
    r = run(variant)
    predictions = r.model.postprocess(r.out, r.fixture["inputs"]["ori_shapes"])
    check_predictions(predictions, r.fixture)


def test_round_trip_through_a_codetr_checkpoint(variant, tmp_path):
    """mmdet3 state dict -> codetr checkpoint on disk -> codetr's own loader -> mmdet's predictions."""
    r = run(variant)
    cfg = Config(preset="converted")
    cfg.model = r.conversion.model
    num_classes = r.conversion.num_classes
    save_checkpoint(tmp_path / "converted.pt", {
        "model": r.conversion.state_dict, "config": cfg.to_dict(), "num_classes": num_classes,
        "cat_ids": list(range(1, num_classes + 1)), "class_names": [f"c{i}" for i in range(num_classes)],
        "position": {"epoch": 0},
    })
    loaded = load_detector(tmp_path / "converted.pt")
    images, masks, _ = batch_inputs(r.fixture)
    with torch.no_grad():
        predictions = loaded.model.postprocess(loaded.model(images, masks), r.fixture["inputs"]["ori_shapes"])
    check_predictions(predictions, r.fixture)


@pytest.mark.parametrize("name, two_stage, refine", [("plain", False, False), ("refine", False, True),
                                                     ("twostage_refine", True, True)])
def test_full_size_mmdet_layouts_convert(name, two_stage, refine):
    """mmdet's unmodified configs (the model zoo's layout: ResNet-50, 6 + 6 layers, 300 queries, 80
    classes). Values are one constant per key (expanded, no memory) and shared modules' keys alias
    their first key, so the converter must tell refine from shared branches as in a real checkpoint."""
    layout = torch.load(FIXTURES / "deformable_detr_r50_layouts.pt", weights_only=True)[name]
    state: dict[str, Tensor] = {}
    for index, entry in enumerate(layout):
        source = entry["alias_of"]
        state[entry["key"]] = state[source] if source else torch.tensor(float(index)).expand(entry["shape"])
    conversion = convert(state)
    cfg, t = conversion.model, conversion.model.transformer
    assert (cfg.two_stage, cfg.with_box_refine, cfg.num_queries, conversion.num_classes) == (two_stage, refine, 300, 80)
    assert (cfg.backbone.depth, t.d_model, t.num_points, t.num_encoder_layers, t.num_decoder_layers, t.ffn_dim) == (
        50, 256, 4, 6, 6, 1024)


# ----------------------------------------------------------------------------------------------
# The converter's errors (on the plain variant's state dict: the cheapest to build)
# ----------------------------------------------------------------------------------------------


def plain_state() -> dict[str, Tensor]:
    return dict(run("plain").mmdet_state)


def test_unmapped_key_is_named():
    state = plain_state()
    state["bbox_head.extra_fc.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError, match=r"no codetr counterpart: bbox_head\.extra_fc\.weight"):
        convert(state)


def test_missing_key_is_named():
    state = plain_state()
    del state["decoder.layers.1.cross_attn.value_proj.bias"]
    expected = r"no source: transformer\.decoder\.layers\.1\.cross_attn\.value_proj\.bias"
    with pytest.raises(ConversionError, match=expected):
        convert(state)


def test_shape_mismatch_names_both_shapes():
    state = plain_state()
    state["neck.convs.1.gn.weight"] = torch.zeros(32)
    with pytest.raises(ConversionError, match=r"neck\.lateral\.1\.1\.weight: mmdet \(32,\) vs codetr \(64,\)"):
        convert(state)


def test_whole_checkpoint_and_mmdet2_names_are_refused():
    with pytest.raises(ConversionError, match="checkpoint\\['state_dict'\\]"):
        convert({"state_dict": plain_state(), "meta": {}})
    renamed = {k.replace("encoder.", "bbox_head.transformer.encoder."): v for k, v in plain_state().items()}
    with pytest.raises(ConversionError, match="mmdet 2.x"):
        convert(renamed)


def test_half_shared_branches_are_refused():
    """Plain mmdet shares both branch lists; distinct class branches with shared box branches fit no model."""
    state = plain_state()
    state["bbox_head.cls_branches.1.bias"] = state["bbox_head.cls_branches.1.bias"] + 1.0
    with pytest.raises(ConversionError, match="cls_branches are distinct but bbox_head.reg_branches are equal"):
        convert(state)


def test_explicit_num_queries_must_agree_with_a_plain_model():
    with pytest.raises(ConversionError, match="num_queries=7, but query_embedding.weight holds 20"):
        convert(plain_state(), num_queries=7)
