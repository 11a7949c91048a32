"""Co-DETR's collaborative hybrid assignment: positive-query rules, the lambda weighting, baseline
equivalence, deployment, and gradient flow of each branch."""
import math

import pytest
import torch

from codetr.config import AUX_HEAD_KINDS, apply_overrides, config_from_dict, get_preset
from codetr.errors import ConfigError
from codetr.data.collate import Batch
from codetr.engine.optim import build_optimizer
from codetr.engine.train import train_step
from codetr.models.co_detr.model import head_names
from codetr.models.co_detr.positive_queries import gather_queries, query_count, select_indices
from codetr.models.co_detr.types import Candidates
from codetr.models.criterion import build_criterion
from codetr.models.detector import build_detector
from codetr.models.total_loss import LossWeights, weighted_total

SMALL = ["model.num_queries=10", "model.num_detections=10", "model.transformer.num_encoder_layers=1",
         "model.transformer.num_decoder_layers=2", "model.transformer.ffn_dim=64", "model.aux.min_queries=4"]


def co_cfg(*overrides):
    """Deformable-DETR++ with K=2 (ATSS + Faster-RCNN), small."""
    return apply_overrides(get_preset("co_tiny_pp"), [*SMALL, *overrides])


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, 96, 128, generator=generator)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, 80:, :] = True  # the second image is 80 x 128 inside the padded batch
    masks[1, :, 112:] = True
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.3, 0.4], [0.7, 0.6, 0.4, 0.5]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])},
    ]
    return images, masks, targets


def candidates(labels: list[int], num_classes: int = 3) -> Candidates:
    m = len(labels)
    boxes = torch.tensor([[i, i, i + 10.0, i + 10.0] for i in range(m)])
    return Candidates(boxes, torch.tensor(labels), boxes + 1, None, num_gt=1, num_classes=num_classes)


# --- the positive-query rules -----------------------------------------------------------------


def test_query_count_is_the_clamped_batch_maximum():
    assert query_count([3, 5], 9, 300) == 9
    assert query_count([30, 12], 9, 300) == 30
    assert query_count([1000, 2], 9, 300) == 300
    assert query_count([0, 0], 9, 300) == 9


def test_selection_keeps_all_positives_and_pads_with_negatives():
    cand = candidates([0, 3, 1, 3, 3, 2, 3, 3])  # positives at 0, 2, 5
    index = select_indices(cand, 6, torch.Generator().manual_seed(0))
    assert len(index) == 6 and len(set(index.tolist())) == 6
    assert index[:3].tolist() == [0, 2, 5]
    assert (cand.labels[index[3:]] == 3).all()  # padding = background


def test_selection_subsamples_positives_beyond_the_cap():
    cand = candidates([0] * 20 + [3] * 5)
    index = select_indices(cand, 8, torch.Generator().manual_seed(0))
    assert len(index) == 8 and len(set(index.tolist())) == 8 and (index < 20).all()


def test_selection_repeats_negatives_when_there_are_too_few():
    index = select_indices(candidates([0, 3]), 5, torch.Generator().manual_seed(0))
    assert index[0] == 0 and (index[1:] == 1).all()


def test_gathered_boxes_are_cxcywh_normalised_to_each_image():
    cand = Candidates(torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.tensor([1]), torch.tensor([[0.0, 0.0, 200.0, 100.0]]),
                      torch.ones(1, 4), num_gt=1, num_classes=3)
    queries = gather_queries([cand], torch.tensor([[100, 200]]), min_queries=1)
    assert queries.ref_boxes[0, 0].tolist() == pytest.approx([0.1, 0.4, 0.1, 0.4])
    assert queries.target_boxes[0, 0].tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert queries.positive.tolist() == [[True]] and queries.features.shape == (1, 1, 4)


def test_assignment_counts_are_taken_before_the_cap():
    from codetr.models.co_detr.model import AuxBranchOutput
    from codetr.models.co_detr.types import AuxHeadOutput

    many = candidates([0] * 400 + [3] * 10)
    many.num_gt = 2
    branch = AuxBranchOutput("atss", AuxHeadOutput({}, [many, candidates([1, 3])]), posq=None)
    assert branch.assignment_counts() == [(400, 2), (1, 1)]
    assert gather_queries([many], torch.tensor([[1000, 1000]])).labels.shape == (1, 300)  # the cap applies later


def test_head_names_are_unique():
    assert head_names(["atss", "faster_rcnn", "atss"]) == ["atss", "faster_rcnn", "atss_2"]


# --- the model ---------------------------------------------------------------------------------


def raw_losses(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_detector(cfg.model, num_classes=3)
    criterion = build_criterion(model, cfg.model)
    images, masks, targets = batch()
    torch.manual_seed(seed + 1)  # the random sub-sampling of positive queries
    raw = criterion(model(images, masks, targets), targets)
    return model, criterion, raw


def test_loss_names_cover_every_branch_and_layer():
    _, _, raw = raw_losses(co_cfg())
    assert {"aux.atss.loss_cls", "aux.atss.loss_bbox", "aux.atss.loss_centerness",
            "aux.faster_rcnn.loss_rpn_cls", "aux.faster_rcnn.loss_cls", "aux.faster_rcnn.loss_bbox"} <= set(raw)
    for head in ("atss", "faster_rcnn"):
        for layer in range(2):
            assert {f"posq.{head}.d{layer}.loss_cls", f"posq.{head}.d{layer}.loss_giou"} <= set(raw)
    assert all(torch.isfinite(v) for v in raw.values())


@pytest.mark.parametrize("which, prefix", [("lambda1", "posq."), ("lambda2", "aux.")])
def test_doubling_a_lambda_doubles_exactly_its_part_of_the_loss(which, prefix):
    _, crit_a, raw_a = raw_losses(co_cfg())
    _, crit_b, raw_b = raw_losses(co_cfg(f"model.aux.{which}={2 * getattr(co_cfg().model.aux, which)}"))
    assert all(torch.equal(raw_a[k], raw_b[k]) for k in raw_a)  # the lambdas never change raw terms
    total_a, weighted_a = weighted_total(raw_a, crit_a.weights)
    total_b, _ = weighted_total(raw_b, crit_b.weights)
    part = sum(v for k, v in weighted_a.items() if k.startswith(prefix))
    assert part > 0
    assert torch.allclose(total_b - total_a, part, rtol=1e-5)  # float32 sums


def test_total_loss_is_eq6_computed_by_hand():
    """Eq. 6 with K = 2 heads and L = 6 decoder layers, for known raw terms:
    L = sum_l ( L~dec_l + lambda1 * sum_i L^dec_{i,l} + lambda2 * L^enc ), at lambda1 = 0.5, lambda2 = 3.
    Within a branch, DETR-style terms weigh focal 2 / L1 5 / GIoU 2; the heads' own weights are the
    released config's bases (ATSS focal 1, GIoU 2, centerness 1; RPN BCE 1, L1 1; RoI CE 1, GIoU 10)."""
    cfg = apply_overrides(get_preset("co_deformable_detr_r50_1x"), ["model.aux.lambda1=0.5", "model.aux.lambda2=3"])
    head_weights = {"atss": {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0},
                    "faster_rcnn": {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0, "loss_cls": 1.0, "loss_bbox": 10.0}}
    detr = {"loss_cls": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    raw, value = {}, 0.0
    for name in [f"dec.d{l}.{t}" for l in range(6) for t in detr] + [f"enc.{t}" for t in detr] + \
            [f"posq.{h}.d{l}.{t}" for h in head_weights for l in range(6) for t in detr] + \
            [f"aux.{h}.{t}" for h, terms in head_weights.items() for t in terms]:
        value += 0.125  # distinct raw values, exact in float32
        raw[name] = torch.tensor(value)
    one_to_one = sum(float(raw[f"dec.d{l}.{t}"]) * w for l in range(6) for t, w in detr.items())
    proposals = sum(float(raw[f"enc.{t}"]) * w for t, w in detr.items())
    per_layer_posq = [sum(float(raw[f"posq.{h}.d{l}.{t}"]) * w for h in head_weights for t, w in detr.items())
                      for l in range(6)]
    l_enc = sum(float(raw[f"aux.{h}.{t}"]) * w for h, terms in head_weights.items() for t, w in terms.items())
    expected = one_to_one + proposals + sum(0.5 * posq + 3.0 * l_enc for posq in per_layer_posq)
    torch.manual_seed(0)
    model = build_detector(apply_overrides(cfg, ["model.backbone.depth=18"]).model, num_classes=80)
    assert model.aux_loss_weights() == head_weights  # the heads declare the released base weights
    total, _ = weighted_total(raw, LossWeights(cfg.model, head_weights))
    assert total.item() == pytest.approx(expected, rel=1e-6)  # float32 sum of ~100 terms


def test_auxiliary_heads_weigh_l_times_lambda2_as_the_released_config():
    """The released config's effective weights (facts sheet: num_dec_layer 6 x lambda_2 2.0): RPN BCE 12,
    RPN L1 12, RoI CE 12, RoI GIoU 120, ATSS focal 12, GIoU 24, centerness 12; positive queries focal 2,
    L1 5, GIoU 2 (lambda_1 = 1)."""
    cfg = get_preset("co_deformable_detr_r50_1x")
    head_weights = {"atss": {"loss_cls": 1.0, "loss_bbox": 2.0, "loss_centerness": 1.0},
                    "faster_rcnn": {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0, "loss_cls": 1.0, "loss_bbox": 10.0}}
    weights = LossWeights(cfg.model, head_weights)
    released = {"aux.faster_rcnn.loss_rpn_cls": 12, "aux.faster_rcnn.loss_rpn_bbox": 12, "aux.faster_rcnn.loss_cls": 12,
                "aux.faster_rcnn.loss_bbox": 120, "aux.atss.loss_cls": 12, "aux.atss.loss_bbox": 24,
                "aux.atss.loss_centerness": 12, "posq.atss.d5.loss_cls": 2, "posq.faster_rcnn.d0.loss_bbox": 5,
                "posq.atss.d3.loss_giou": 2, "dec.d5.loss_cls": 2, "enc.loss_bbox": 5}
    assert {name: weights(name) for name in released} == pytest.approx(released)


def test_the_removed_weighting_key_fails_with_what_changed():
    with pytest.raises(ConfigError, match="model.aux.weighting was removed: lambda1 now weighs the positive queries"):
        co_cfg("model.aux.weighting=released")


def test_old_stored_configs_migrate_to_the_same_loss():
    """A config stored by an older codetr with weighting=paper applied lambda1 to the heads and lambda2 to
    the positive queries; it is read with the same effective weights, and weighting=released as is."""
    stored = co_cfg().to_dict()
    stored["model"].pop("two_stage"), stored["model"].pop("with_box_refine")
    stored["model"]["aux"].update(weighting="paper", lambda1=0.5, lambda2=2.0)
    with pytest.warns(UserWarning, match="read as lambda1=2, lambda2=0.25"):
        migrated = config_from_dict(stored)
    layers = migrated.model.transformer.num_decoder_layers
    assert layers == 2
    assert (migrated.model.aux.lambda1, migrated.model.aux.lambda2) == (2.0, 0.25)  # posq 2, heads 2 x 0.25 = 0.5
    assert migrated.model.two_stage and migrated.model.with_box_refine  # older codetr was always ++
    stored["model"]["aux"].update(weighting="released", lambda1=0.5, lambda2=2.0)
    released = config_from_dict(stored)
    assert (released.model.aux.lambda1, released.model.aux.lambda2) == (0.5, 2.0)


def test_no_aux_heads_is_exactly_the_baseline():
    baseline_cfg = apply_overrides(get_preset("tiny_pp"), SMALL)
    empty_cfg = co_cfg("model.aux.heads=[]")
    base_model, _, base_raw = raw_losses(baseline_cfg)
    empty_model, _, empty_raw = raw_losses(empty_cfg)
    assert type(empty_model) is type(base_model)
    base_state, empty_state = base_model.state_dict(), empty_model.state_dict()
    assert base_state.keys() == empty_state.keys()
    assert all(torch.equal(base_state[k], empty_state[k]) for k in base_state)
    assert base_raw.keys() == empty_raw.keys() and all(torch.equal(base_raw[k], empty_raw[k]) for k in base_raw)


def test_inference_is_identical_with_and_without_auxiliary_heads():
    torch.manual_seed(0)
    baseline = build_detector(co_cfg("model.aux.heads=[]").model, 3).eval()
    torch.manual_seed(0)
    co = build_detector(co_cfg().model, 3).eval()
    assert any(k.startswith("aux.") for k in co.state_dict())
    base_state = baseline.state_dict()
    assert all(torch.equal(base_state[k], v) for k, v in co.state_dict().items() if not k.startswith("aux."))
    images, masks, _ = batch()
    with torch.no_grad():
        a, b = baseline(images, masks), co(images, masks)
    assert torch.equal(a.pred_logits, b.pred_logits) and torch.equal(a.pred_boxes, b.pred_boxes)
    assert b.aux is None


@pytest.mark.parametrize("prefix", ["aux.atss.", "aux.faster_rcnn.", "posq.atss.", "posq.faster_rcnn."])
def test_each_branch_sends_gradients_to_the_encoder_and_backbone(prefix):
    model, _, raw = raw_losses(co_cfg())
    sum(v for k, v in raw.items() if k.startswith(prefix)).backward()
    encoder_grad = model.transformer.encoder_layers[0].ffn[0].weight.grad
    backbone_grad = model.backbone.stages[-1][0].conv1.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert backbone_grad is not None and backbone_grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("heads", [[k] for k in AUX_HEAD_KINDS] + [list(AUX_HEAD_KINDS), ["atss", "atss"]],
                         ids=lambda heads: "+".join(heads))
def test_every_head_trains_alone_and_together(heads):
    cfg = co_cfg(f"model.aux.heads=[{','.join(heads)}]")
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=3)
    criterion = build_criterion(model, cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    before = {k: v.detach().clone() for k, v in model.aux.heads.named_parameters()}
    images, masks, targets = batch()
    record = train_step(model, criterion, Batch(images, masks, targets), optimizer, cfg)
    assert all(math.isfinite(v) for v in record.values())
    for name in head_names(heads):
        assert record[f"stats.{name}.gts"] == 3 and record[f"stats.{name}.positives"] >= 1
    for index, name in enumerate(head_names(heads)):
        assert any(k.startswith(f"aux.{name}.") for k in record) and any(k.startswith(f"posq.{name}.d1.") for k in record)
        moved = [not torch.equal(before[k], v) for k, v in model.aux.heads[index].named_parameters(prefix=str(index))
                 if v.requires_grad]
        assert moved and any(moved), name

