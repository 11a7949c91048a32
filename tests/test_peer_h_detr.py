"""Equivalence of codetr's H-DETR (`model.method=h_detr`) with the official H-Deformable-DETR.

The fixture (tests/fixtures/peer/h_detr.pt) was recorded by tests/peer/record_h_detr.py from
HDETR/H-Deformable-DETR @ f58ceb1 (plain PyTorch on the CPU, through the repository's own pure-PyTorch
deformable attention): its hybrid-branch Deformable-DETR++ (two-stage, box refine, mixed query selection,
look forward twice, dropout 0), shrunk to ResNet-18, d_model 256, 2 encoder / 3 decoder layers, 10 one-to-one
+ 30 one-to-many queries, k_one2many 3, lambda_one2many 0.5, 20 classes, on two zero-padded images of
different sizes with 3 and 2 boxes, in training mode. Its weights are codetr's (a hashed fill of codetr's state
dict, regenerated here and checked against the recorded per-tensor sums) copied into the official model by
the recorder's key map. codetr, built from `tiny_pp` with the recorded overrides, must reproduce in float32:
  - the encoder memory and every token's proposal logits and boxes (the official `enc_outputs`);
  - every decoder layer's one-to-one and one-to-many logits and boxes;
  - the Hungarian assignments of every layer (one-to-one, one-to-many against the k-fold repeated ground truth,
    the encoder's class-agnostic ones) exactly: the matched queries and, for each, which ground-truth box
    (of the k identical copies, any one is the same target);
  - every loss term, weighted: codetr's raw term times its weight from codetr/models/total_loss.py LossWeights
    against the official term times its `weight_dict` entry (the official one-to-many terms already carry
    lambda_one2many, codetr's weight applies it), and the weighted total;
  - the gradient of the weighted total on parameters where the detaches, look forward twice and the separated
    query blocks decide which loss reaches what (the content queries, every box and class branch, the encoder's);
  - in eval mode, codetr's one-to-one outputs against the official eval outputs and its training-mode
    one-to-one outputs.

Conventions that differ only in form, accounted for here:
  - names: the official last layer is unsuffixed (`loss_ce` = `dec.d2.loss_cls`), `_{i}` is layer i, `_enc` the
    proposals, `_one2many` codetr's `o2m.d{l}.*`, `loss_ce` codetr's `loss_cls`; `class_error` and
    `cardinality_error` are logging-only metrics (not in the official weight dict) and are not compared;
  - the official focal loss is the mean over queries times the number of queries, over num_boxes; codetr sums
    over queries (the same number up to rounding);
  - eval: the official model runs only the one-to-one queries because `engine.evaluate` sets `num_queries` and
    `two_stage_num_proposals` to the one-to-one count around its loop; codetr's eval mode does so by itself;
  - the official input projections' 1x1 / 3x3 convs have a bias (initialised to 0), codetr's ChannelMapper
    (mmdet's) has none: the recording sets them to 0, so that a trained official checkpoint would need them.

Tolerances (float32 on the CPU, sums ordered differently), with the largest errors measured:
  activations: atol 2e-4 + rtol 2e-4 (memory 1.1e-5, proposal logits 7.3e-6, boxes 6.0e-7, one-to-one logits
    2.9e-6 / boxes 4.8e-7, one-to-many logits 3.1e-6 / boxes 6.0e-7, eval 2.9e-6);
  losses (weighted): atol 1e-6 + rtol 1e-4 (largest 3.8e-6 on 2 x enc loss_ce = 37.8, others <= 1.4e-6; the
    total 86.5 within 7.6e-6);
  gradients: atol 1e-6 + 1e-4 of each tensor's largest entry (largest error 9.9e-6 of the largest entry).
The proposal selection is compared through its consequences; the recording's class-0 scores are further from
a tie (1.5e-4) than twice the frameworks' largest logit difference.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from codetr.config import ModelConfig, apply_overrides, get_preset
from codetr.models.criterion import SetCriterion, build_criterion
from codetr.models.detector import DeformableDETR, DetectorOutput, build_detector
from codetr.models.loss_terms import encoder_term, layer_term
from codetr.models.total_loss import weighted_total
from tests.test_peer_deformable_detr import hashed_uniform

FIXTURE = Path(__file__).parent / "fixtures" / "peer" / "h_detr.pt"
ACT = dict(atol=2e-4, rtol=2e-4)
LOSS = dict(atol=1e-6, rtol=1e-4)
GRAD_RTOL_OF_MAX, GRAD_ATOL = 1e-4, 1e-6
OFFICIAL_TYPES = {"loss_ce": "loss_cls", "loss_bbox": "loss_bbox", "loss_giou": "loss_giou"}
LOGGING_ONLY = ("class_error", "cardinality_error")


def codetr_term(official: str, num_layers: int) -> str | None:
    """The official loss name's codetr term: 'loss_ce_1_one2many' -> 'o2m.d1.loss_cls', 'loss_giou_enc' ->
    'enc.loss_giou', 'loss_bbox' -> 'dec.d{L-1}.loss_bbox'; None for the logging-only metrics."""
    if official.startswith(LOGGING_ONLY):
        return None
    group, name = ("o2m", official.removesuffix("_one2many")) if official.endswith("_one2many") else ("dec", official)
    if name.endswith("_enc"):
        return encoder_term(OFFICIAL_TYPES[name.removesuffix("_enc")])
    base, _, layer = name.rpartition("_")
    if layer.isdigit():
        return layer_term(group, int(layer), OFFICIAL_TYPES[base])
    return layer_term(group, num_layers - 1, OFFICIAL_TYPES[name])


def regenerated_state(records: list[dict]) -> dict[str, Tensor]:
    """codetr's recorded state dict, regenerated from the hashed fill; each tensor's sum checked."""
    state = {}
    for r in records:
        numel = int(torch.Size(r["shape"]).numel())
        state[r["key"]] = (hashed_uniform(numel, r["seed"]) * r["scale"] + r["shift"]).view(r["shape"])
        assert float(state[r["key"]].double().sum()) == pytest.approx(r["sum"], rel=1e-9, abs=1e-9), r["key"]
    return state


@dataclass
class Run:
    fixture: dict
    cfg: ModelConfig
    model: DeformableDETR
    criterion: SetCriterion
    out: DetectorOutput
    losses: dict[str, Tensor]
    weighted: dict[str, Tensor]
    total: Tensor


@functools.lru_cache(maxsize=None)
def run() -> Run:
    """codetr's training step on the recorded batch: outputs, raw and weighted terms, gradients of the total."""
    fixture = torch.load(FIXTURE, weights_only=True)
    cfg = apply_overrides(get_preset(fixture["config"]["preset"]), fixture["config"]["overrides"]).model
    model = build_detector(cfg, fixture["config"]["num_classes"])
    model.load_state_dict(regenerated_state(fixture["weights"]), strict=True)
    model.train()
    inputs = fixture["inputs"]
    out = model(inputs["images"], inputs["masks"], inputs["targets"])
    criterion = build_criterion(model, cfg)
    losses = criterion(out, inputs["targets"])
    total, weighted = weighted_total(losses, criterion.weights)
    total.backward()
    return Run(fixture, cfg, model, criterion, out, losses, weighted, total)


def assert_layers_close(ours: list[tuple[Tensor, Tensor]], theirs: dict[str, Tensor]) -> None:
    """Per decoder layer (logits [B, N, K], boxes [B, N, 4]) against the recorded [L, B, N, *]."""
    assert len(ours) == len(theirs["logits"])
    for layer, (logits, boxes) in enumerate(ours):
        torch.testing.assert_close(logits.detach(), theirs["logits"][layer], **ACT, msg=lambda m: f"layer {layer}: {m}")
        torch.testing.assert_close(boxes.detach(), theirs["boxes"][layer], **ACT, msg=lambda m: f"layer {layer}: {m}")


def test_encoder_memory_and_proposals():
    r = run()
    torch.testing.assert_close(r.out.memory.detach(), r.fixture["memory"], **ACT)
    torch.testing.assert_close(r.out.enc_logits.detach(), r.fixture["enc_logits"], **ACT)
    torch.testing.assert_close(r.out.enc_boxes.detach(), r.fixture["enc_boxes"], **ACT)
    # the top-(Q + M) selection cannot flip: the scores are further from a tie than the frameworks from each other
    logit_error = float((r.out.enc_logits.detach()[..., 0] - r.fixture["enc_logits"][..., 0]).abs().max())
    assert 2 * logit_error < r.fixture["topk_margin"]


def test_one_to_one_predictions_every_layer():
    assert_layers_close(run().out.layers, run().fixture["one2one"])


def test_one_to_many_predictions_every_layer():
    r = run()
    assert r.out.extra_queries is not None and r.out.extra_queries.term_group == "o2m"
    assert_layers_close(r.out.extra_queries.layers, r.fixture["one2many"])


def official_pairs(matcher, logits: Tensor, boxes: Tensor, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
    """codetr's matcher in the recording's form: per image (query index, ground-truth index modulo the image's
    distinct boxes)."""
    distinct = [len(t["labels"]) for t in run().fixture["inputs"]["targets"]]
    pairs = matcher(logits.detach(), boxes.detach(), targets)
    return [(query, gt % n) for (query, gt), n in zip(pairs, distinct)]


def assert_same_pairs(ours: list[tuple[Tensor, Tensor]], theirs: list[tuple[Tensor, Tensor]]) -> None:
    for (query, gt), (their_query, their_gt) in zip(ours, theirs, strict=True):
        order, their_order = query.argsort(), their_query.argsort()
        assert torch.equal(query[order], their_query[their_order])
        assert torch.equal(gt[order], their_gt[their_order])


def test_assignments_every_layer_exactly():
    r = run()
    matcher, targets, k = r.criterion.matcher, r.fixture["inputs"]["targets"], r.cfg.hybrid.repeats
    repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    binary = [{"labels": torch.zeros_like(t["labels"]), "boxes": t["boxes"]} for t in targets]
    matches = r.fixture["matches"]
    for layer, (logits, boxes) in enumerate(r.out.layers):
        assert_same_pairs(official_pairs(matcher, logits, boxes, targets), matches["one2one"][layer])
    for layer, (logits, boxes) in enumerate(r.out.extra_queries.layers):
        assert_same_pairs(official_pairs(matcher, logits, boxes, repeated), matches["one2many"][layer])
    assert_same_pairs(official_pairs(matcher, r.out.enc_logits, r.out.enc_boxes, binary), matches["enc"][0])


def test_every_weighted_loss_term_and_the_total():
    r = run()
    num_layers = r.cfg.transformer.num_decoder_layers
    theirs = {}
    for name, value in r.fixture["losses"].items():
        term = codetr_term(name, num_layers)
        if term is not None:
            theirs[term] = value * r.fixture["weight_dict"][name]
    assert sorted(theirs) == sorted(r.losses)  # the same terms, one for one
    for term, value in theirs.items():
        torch.testing.assert_close(r.weighted[term].detach(), value, **LOSS, msg=lambda m: f"{term}: {m}")
    torch.testing.assert_close(r.total.detach(), r.fixture["total"], **LOSS)


def test_one_to_many_weight_is_lambda_on_the_raw_term():
    r = run()
    weights, lam = r.criterion.weights, r.cfg.hybrid.weight
    assert lam != 1.0  # the recording uses 0.5, so that a weight in the wrong place shows
    for name in r.losses:
        if name.startswith("o2m."):
            assert weights(name) == pytest.approx(lam * weights(name.replace("o2m.", "dec.")))


def test_gradients_of_the_weighted_total():
    r = run()
    for key, theirs in r.fixture["gradients"].items():
        ours = r.model.get_parameter(key).grad
        assert ours is not None, key
        scale = float(theirs.abs().max())
        torch.testing.assert_close(ours, theirs, atol=GRAD_ATOL + GRAD_RTOL_OF_MAX * scale, rtol=0,
                                   msg=lambda m: f"{key}: {m}")


def test_inference_is_the_official_one_to_one_detector():
    r = run()
    inputs = r.fixture["inputs"]
    r.model.eval()
    try:
        with torch.no_grad():
            evaluated = r.model(inputs["images"], inputs["masks"])
    finally:
        r.model.train()
    assert evaluated.extra_queries is None and evaluated.pred_logits.shape[1] == r.cfg.num_queries
    assert_layers_close(evaluated.layers, r.fixture["eval"])
    assert_layers_close(evaluated.layers, r.fixture["one2one"])
