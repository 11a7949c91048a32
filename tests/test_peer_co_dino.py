"""Whole-model equivalence with mmdetection 3.3's Co-DINO (projects/CO-DETR), through the Sense-X converter.

The fixture (tests/fixtures/peer/co_dino.pt) was recorded by tests/peer/record_co_dino.py from mmdet 3.3 +
mmcv 2.1 running projects/CO-DETR's `CoDETR` with the released `co_dino_5scale_r50_8xb2_1x_coco` settings,
shrunk (ResNet-18 on C2..C5, 64 channels, 5 levels, 2 encoder / 3 decoder layers, 30 queries, 12 denoising
queries, 6 classes, RoI FCs 64), random weights, on two padded images with ground truth. Its state dict
(mmdet 3 and Sense-X share the key names) goes through `codetr convert`'s Sense-X converter, and codetr
must reproduce in float32: the neck maps, the encoder memory, every token's encoder class scores, the
selected top-k proposals, the denoising queries (content, boxes, attention mask) for the same seed, every
decoder layer's logits and boxes for the denoising and the matching queries, each auxiliary branch's
positive queries (boxes, labels, targets) and their decoder outputs, every loss term (query head, encoder,
denoising, RPN, RoI head, ATSS, both positive-query branches) and the soft-NMS'd predictions. mmcv's
soft-NMS is also compared on three synthetic sets of overlapping boxes.

Randomness: the denoising noise is drawn after torch.manual_seed(0) with the same calls in the same order
(so the same values); the samplers' and the positive-query padding's permutations are replayed from the
recording, in mmdet's order. To draw them in that order the model lists its heads as mmdet does (RoI head
first): the test swaps the converted heads (codetr's presets list ATSS first).

Tolerances (float32 on the CPU, sums ordered differently; the largest errors measured are in the notes):
  activations: atol 2e-4 + rtol 2e-4; losses: atol 1e-5 + rtol 1e-4 (weighted as mmdet reports them);
  prediction scores atol 1e-5, labels exact, boxes atol 1e-3 px.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from codetr.convert.sensex import convert
from codetr.models.criterion import build_criterion
from codetr.models.detector import DetectorOutput, build_detector
from codetr.models.soft_nms import batched_soft_nms
from tests.test_peer_deformable_detr import batch_inputs, mmdet_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "peer" / "co_dino.pt"
ACT = dict(atol=2e-4, rtol=2e-4)
LOSS = dict(atol=1e-5, rtol=1e-4)
# mmdet's index of each auxiliary branch (RoI head first) and codetr's head name
MMDET_BRANCHES = {0: "faster_rcnn", 1: "atss"}
TYPE = {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_iou": "loss_giou"}
AUX_WEIGHT = 12.0  # the released num_dec_layer x lambda2, in every auxiliary loss weight of the recording


class RandpermReplay:
    """Stands in for torch.randperm: mmdet's recorded permutations in order, each length checked."""

    def __init__(self, recorded: list[dict]) -> None:
        self.recorded, self.used = recorded, 0

    def __call__(self, n: int, *args, **kwargs) -> Tensor:
        assert self.used < len(self.recorded), f"codetr drew permutation #{self.used + 1}; mmdet drew {len(self.recorded)}"
        entry = self.recorded[self.used]
        assert len(entry["perm"]) == n, f"permutation #{self.used + 1} ({entry['phase']}): codetr asked for {n}, mmdet {len(entry['perm'])}"
        self.used += 1
        return entry["perm"].long().to(kwargs.get("device"))


def swap_heads_to_mmdet_order(conversion) -> None:
    """[atss, faster_rcnn] -> [faster_rcnn, atss], with their weights (aux.heads.j, aux.query_embeddings.j)."""
    assert conversion.model.aux.heads == ["atss", "faster_rcnn"]
    conversion.model.aux.heads = ["faster_rcnn", "atss"]
    swapped = {}
    for key, value in conversion.state_dict.items():
        for part in ("aux.heads.", "aux.query_embeddings."):
            if key.startswith(part):
                index, rest = key[len(part):].split(".", 1)
                key = f"{part}{1 - int(index)}.{rest}"
        swapped[key] = value
    conversion.state_dict = swapped


@dataclass
class Run:
    fixture: dict
    model: torch.nn.Module
    train_out: DetectorOutput
    losses: dict[str, Tensor]
    captured: dict
    eval_out: DetectorOutput
    weights: object


@functools.lru_cache(maxsize=None)
def run() -> Run:
    fixture = torch.load(FIXTURE, weights_only=True)
    conversion = convert(mmdet_state_dict(fixture["weights"]))
    swap_heads_to_mmdet_order(conversion)
    cfg = conversion.model
    info = fixture["config"]
    cfg.num_detections = info["max_per_img"]
    cfg.denoising.num_queries = info["num_dn_queries"]
    model = build_detector(cfg, conversion.num_classes)
    model.load_state_dict(conversion.state_dict, strict=True)
    images, masks, targets = batch_inputs(fixture)
    captured: dict = {}
    hooks = [
        model.neck.register_forward_hook(lambda m, i, o: captured.setdefault("neck", o)),
        model.transformer.enc_class_branch.register_forward_hook(lambda m, i, o: captured.setdefault("enc_cls", o)),
    ]
    model.train()
    original = torch.randperm
    torch.randperm = replay = RandpermReplay(fixture["randperm"])
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            train_out = model(images, masks, targets)
            criterion = build_criterion(model, cfg)
            losses = criterion(train_out, targets)
    finally:
        torch.randperm = original
        for hook in hooks:
            hook.remove()
    assert replay.used == len(fixture["randperm"]), f"codetr drew {replay.used} permutations, mmdet {len(fixture['randperm'])}"
    model.eval()
    with torch.no_grad():
        eval_out = model(images, masks)
    return Run(fixture, model, train_out, losses, captured, eval_out, criterion.weights)


def test_weights_regenerate_and_convert_completely():
    fixture = torch.load(FIXTURE, weights_only=True)
    state = mmdet_state_dict(fixture["weights"])
    for record in fixture["weights"]:
        assert float(state[record["key"]].double().sum()) == pytest.approx(record["sum"], rel=1e-9, abs=1e-9), record["key"]
    conversion = convert(state)
    assert conversion.model.architecture == "dino" and conversion.model.transformer.num_levels == 5
    assert conversion.model.aux.heads == ["atss", "faster_rcnn"] and not conversion.model.aux.content_feature
    assert all(k.endswith("num_batches_tracked") for k in conversion.skipped)


def test_neck_memory_and_encoder_proposals():
    r = run()
    for ours, theirs in zip(r.captured["neck"], r.fixture["neck"]):
        torch.testing.assert_close(ours, theirs, **ACT)
    torch.testing.assert_close(r.train_out.memory, r.fixture["memory"], **ACT)
    torch.testing.assert_close(r.captured["enc_cls"], r.fixture["enc_cls"], **ACT)
    assert r.fixture["topk_margin"] > 1e-4  # the selection is further from a tie than the frameworks are apart
    torch.testing.assert_close(r.train_out.enc_logits, r.fixture["topk_score"], **ACT)
    torch.testing.assert_close(r.train_out.enc_boxes, r.fixture["topk_anchor"], **ACT)


def test_denoising_queries_for_the_same_seed():
    r = run()
    queries = r.train_out.denoising.queries
    dn = r.fixture["dn"]
    assert queries.num_groups == dn["dn_meta"]["num_denoising_groups"]
    assert queries.num_queries == dn["dn_meta"]["num_denoising_queries"]
    assert torch.equal(queries.attn_mask, dn["attn_mask"])
    torch.testing.assert_close(queries.content, dn["dn_label_query"], rtol=0, atol=0)
    torch.testing.assert_close(queries.boxes_unact, dn["dn_bbox_query"], rtol=0, atol=1e-5)


def test_every_decoder_layer_denoising_and_matching():
    r = run()
    num_dn = r.train_out.denoising.queries.num_queries
    for layer in range(len(r.train_out.layers)):
        cls, boxes = r.fixture["layers_cls"][layer], r.fixture["layers_boxes"][layer]
        torch.testing.assert_close(r.train_out.denoising.logits[layer], cls[:, :num_dn], **ACT)
        torch.testing.assert_close(r.train_out.denoising.boxes[layer], boxes[:, :num_dn], **ACT)
        torch.testing.assert_close(r.train_out.layers[layer][0], cls[:, num_dn:], **ACT)
        torch.testing.assert_close(r.train_out.layers[layer][1], boxes[:, num_dn:], **ACT)
    # inference (no denoising queries) gives the matching queries' training outputs: the mask isolates them
    torch.testing.assert_close(r.eval_out.pred_logits, r.fixture["predict_last_layer"]["cls"], **ACT)
    torch.testing.assert_close(r.eval_out.pred_boxes, r.fixture["predict_last_layer"]["boxes"], **ACT)


def test_positive_query_branches():
    r = run()
    branches = {branch.name: branch for branch in r.train_out.aux}
    for index, name in MMDET_BRANCHES.items():
        theirs, ours = r.fixture["aux"][index], branches[name].posq
        torch.testing.assert_close(ours.queries.ref_boxes, theirs["coords"], **ACT)
        assert torch.equal(ours.queries.labels, theirs["labels"]), name
        positive = ours.queries.positive
        assert torch.equal(positive, theirs["bbox_weights"][..., 0] > 0), name
        torch.testing.assert_close(ours.queries.target_boxes[positive], theirs["targets"][positive], **ACT)
        for layer in range(len(ours.decoded.logits)):
            torch.testing.assert_close(ours.decoded.logits[layer], theirs["layers_cls"][layer], **ACT)
            torch.testing.assert_close(ours.decoded.boxes[layer], theirs["layers_boxes"][layer], **ACT)


def mmdet_name_to_codetr(name: str, last_layer: int) -> tuple[str, float] | None:
    """mmdet's loss key -> (codetr raw term, mmdet's weight on it); None for non-losses (acc0)."""
    layer, _, term = name.rpartition(".")
    layer_index = int(layer[1:]) if layer else last_layer
    for suffix, branch in (("_aux0", MMDET_BRANCHES[0]), ("_aux1", MMDET_BRANCHES[1])):
        if term.endswith(suffix):
            kind = TYPE[term.removesuffix(suffix)]
            return f"posq.{branch}.d{layer_index}.{kind}", {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}[kind]
    if term.startswith("dn_"):
        kind = TYPE[term.removeprefix("dn_")]
        return f"dn.d{layer_index}.{kind}", {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}[kind]
    if term.startswith("enc_"):
        kind = TYPE[term.removeprefix("enc_")]
        return f"enc.{kind}", {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}[kind]
    aux = {"loss_rpn_cls": ("faster_rcnn", "loss_rpn_cls", 1.0), "loss_rpn_bbox": ("faster_rcnn", "loss_rpn_bbox", 1.0),
           "loss_cls0": ("faster_rcnn", "loss_cls", 1.0), "loss_bbox0": ("faster_rcnn", "loss_bbox", 10.0),
           "loss_cls1": ("atss", "loss_cls", 1.0), "loss_bbox1": ("atss", "loss_bbox", 2.0),
           "loss_centerness1": ("atss", "loss_centerness", 1.0)}
    if term in aux:
        head, kind, weight = aux[term]
        return f"aux.{head}.{kind}", weight * AUX_WEIGHT
    if term in TYPE:
        return f"dec.d{layer_index}.{TYPE[term]}", {"loss_cls": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}[TYPE[term]]
    assert term == "acc0", name
    return None


def test_every_loss_term():
    r = run()
    last = len(r.train_out.layers) - 1
    compared = set()
    for name, value in r.fixture["losses"].items():
        mapped = mmdet_name_to_codetr(name, last)
        if mapped is None:
            continue
        ours, weight = mapped
        theirs = sum(value) if isinstance(value, list) else value  # per-level lists sum to the head's loss
        # codetr's own weight on the raw term is the released one (the aux factor aside: L x lambda2)
        own = r.weights.term_weight(ours)
        assert own * (AUX_WEIGHT if ours.startswith("aux.") else 1.0) == pytest.approx(weight), ours
        torch.testing.assert_close(r.losses[ours] * weight, theirs.reshape(()), **LOSS, msg=lambda m: f"{name} -> {ours}: {m}")
        compared.add(ours)
    assert compared == set(r.losses), f"terms not compared: {set(r.losses) - compared}"


def test_predictions_after_soft_nms():
    r = run()
    sizes = r.fixture["inputs"]["ori_shapes"]
    assert r.fixture["score_margin"] > 1e-4
    results = r.model.postprocess(r.eval_out, sizes)
    for ours, theirs in zip(results, r.fixture["predictions"]):
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours["boxes"], theirs["bboxes"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("case", range(3))
def test_soft_nms_equals_mmcv(case):
    recorded = torch.load(FIXTURE, weights_only=True)["soft_nms_cases"][case]
    scores, keep = batched_soft_nms(recorded["boxes"], recorded["scores"], recorded["idxs"], recorded["iou_threshold"])
    assert torch.equal(keep, recorded["keep"])
    torch.testing.assert_close(scores, recorded["dets"][:, -1], rtol=0, atol=1e-6)
