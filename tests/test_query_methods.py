"""H-DETR's hybrid matching and Group-DETR's groups (codetr/models/methods/) against hand-built and brute-force
references: the attention masks, the isolation of the query blocks (zero gradient across them), the
one-to-many matching, the loss factors, and the degenerate settings that must equal the baseline exactly."""
import itertools

import pytest
import torch
from torchvision.ops import box_convert, generalized_box_iou

from codetr.config import apply_overrides, get_preset, validate
from codetr.errors import ConfigError
from codetr.models.criterion import SetCriterion, dense_targets, detection_losses
from codetr.models.detector import build_detector
from codetr.models.methods import block_attention_mask
from codetr.models.methods.common import QuerySetOutput
from codetr.models.total_loss import LossWeights, branch_factors, weighted_total

Q = 6  # one-to-one queries of the small models


def small_cfg(preset: str, *overrides: str):
    cfg = get_preset(preset)
    return apply_overrides(cfg, [f"model.num_queries={Q}", "model.num_detections=5", "model.transformer.d_model=32",
                                 "model.transformer.ffn_dim=32", "model.transformer.num_heads=4",
                                 "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=2",
                                 *overrides])


def batch():
    torch.manual_seed(3)
    images = torch.randn(2, 3, 64, 64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    masks[1, :, 48:] = True
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
    ]
    return images, masks, targets


def model_and_losses(cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = build_detector(cfg.model, num_classes=2)
    model.train()
    images, masks, targets = batch()
    out = model(images, masks, targets)
    criterion = SetCriterion(2, cfg.model)
    losses = criterion(out, targets)
    return model, out, losses, criterion


def test_block_masks_equal_hand_built_masks():
    x, o = True, False  # True: may not attend
    expected = torch.tensor([
        [o, o, x, x, x],
        [o, o, x, x, x],
        [x, x, o, o, o],
        [x, x, o, o, o],
        [x, x, o, o, o],
    ])
    assert torch.equal(block_attention_mask((2, 3)), expected)
    groups = block_attention_mask((2, 2, 2))
    hand = torch.ones(6, 6, dtype=torch.bool)
    for start in (0, 2, 4):
        hand[start:start + 2, start:start + 2] = False
    assert torch.equal(groups, hand)


@pytest.mark.parametrize("preset", ["tiny", "tiny_pp"])
@pytest.mark.parametrize("degenerate", [("model.method=group_detr", "model.group.num_groups=1"),
                                        ("model.method=h_detr", "model.hybrid.num_queries=0")],
                         ids=["group_detr_one_group", "h_detr_no_one_to_many"])
def test_degenerate_methods_are_exactly_the_baseline(preset, degenerate):
    base_model, base_out, base_losses, base_criterion = model_and_losses(small_cfg(preset))
    model, out, losses, criterion = model_and_losses(small_cfg(preset, *degenerate))
    assert all(torch.equal(a, b) for a, b in zip(base_model.state_dict().values(), model.state_dict().values()))
    assert out.extra_queries is None
    assert torch.equal(out.pred_logits, base_out.pred_logits) and torch.equal(out.pred_boxes, base_out.pred_boxes)
    assert losses.keys() == base_losses.keys()
    total, _ = weighted_total(losses, criterion.weights)
    base_total, _ = weighted_total(base_losses, base_criterion.weights)
    assert torch.equal(total, base_total)


def query_rows(model):
    """The learned rows that make each query: the one-to-one rows (plain: query_embed; mixed selection: the content
    queries), then the training-only `extra_queries`."""
    transformer = model.transformer
    one_to_one = transformer.content_queries if transformer.two_stage else transformer.query_embed
    return one_to_one.weight, transformer.extra_queries.weight


def row_gradients(loss, model):
    """d loss / d every learned query row, [Q + extra, width] (zeros where the loss does not reach)."""
    grads = torch.autograd.grad(loss, query_rows(model), retain_graph=True, allow_unused=True)
    return torch.cat([torch.zeros_like(r) if g is None else g for g, r in zip(grads, query_rows(model))])


@pytest.mark.parametrize("preset", ["tiny", "tiny_pp"])
@pytest.mark.parametrize("method", ["group_detr", "h_detr"])
def test_a_query_gets_zero_gradient_from_another_blocks_loss(preset, method):
    cfg = small_cfg(preset, f"model.method={method}", "model.group.num_groups=3", "model.hybrid.num_queries=12",
                    "model.hybrid.repeats=2")
    model, out, losses, criterion = model_and_losses(cfg)
    extra_loss = sum(v for k, v in losses.items() if k.startswith(("grp.", "o2m.")))
    one_to_one_loss = sum(v for k, v in losses.items() if k.startswith("dec."))
    grad_extra, grad_one = row_gradients(extra_loss, model), row_gradients(one_to_one_loss, model)
    assert grad_extra[:Q].abs().max() == 0  # the one-to-one queries are untouched by the other blocks' loss
    assert grad_one[Q:].abs().max() == 0  # and the extra queries by the one-to-one loss
    assert grad_extra[Q:].abs().max() > 0 and grad_one[:Q].abs().max() > 0  # each trains its own
    if method == "group_detr":  # group 1 and group 2 are isolated from each other too
        group1_only = QuerySetOutput([(lg[:, :Q], bx[:, :Q]) for lg, bx in out.extra_queries.layers], "grp")
        grad_group1 = row_gradients(sum(criterion.query_set_losses(group1_only, batch()[2]).values()), model)
        assert grad_group1[2 * Q:].abs().max() == 0 and grad_group1[Q:2 * Q].abs().max() > 0


def test_without_the_mask_the_blocks_would_interact(monkeypatch):
    """The zero-gradient test can fail: with the self-attention mask removed, gradient crosses the blocks."""
    import codetr.models.transformer as transformer

    monkeypatch.setattr(transformer, "block_attention_mask", lambda blocks, device=None: None)
    cfg = small_cfg("tiny", "model.method=group_detr", "model.group.num_groups=2")
    model, _, losses, _ = model_and_losses(cfg)
    extra_loss = sum(v for k, v in losses.items() if k.startswith("grp."))
    assert row_gradients(extra_loss, model)[:Q].abs().max() > 0


def test_the_one_to_one_parameters_equal_the_baseline_for_the_same_seed():
    """The extra query rows are made last: every baseline parameter starts as the baseline's (paired seeds)."""
    for preset in ("tiny", "tiny_pp"):
        torch.manual_seed(0)
        base = build_detector(small_cfg(preset).model, num_classes=2).state_dict()
        for method in ("h_detr", "group_detr"):
            torch.manual_seed(0)
            model = build_detector(small_cfg(preset, f"model.method={method}").model, num_classes=2).state_dict()
            assert set(model) - set(base) == {"transformer.extra_queries.weight"}
            assert all(torch.equal(model[key], value) for key, value in base.items())


def test_group_detr_needs_mixed_selection_on_two_stage_models():
    with pytest.raises(ConfigError, match="model.mixed_selection"):
        apply_overrides(get_preset("tiny_pp"), ["model.method=group_detr", "model.mixed_selection=false"])


def test_deployed_h_detr_is_the_baseline(tmp_path):
    """Inference loads the one-to-one detector alone: the extra query rows are training-only parameters."""
    from codetr.engine.checkpoint import save_checkpoint
    from codetr.engine.inference import load_detector

    cfg = small_cfg("tiny_pp", "model.method=h_detr", "model.hybrid.num_queries=12")
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=2)
    path = tmp_path / "h.pt"
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg.to_dict(), "num_classes": 2, "cat_ids": [1, 2],
                           "class_names": ["a", "b"], "position": {"epoch": 1}})
    deployed = load_detector(path).model
    assert deployed.query_method is None and deployed.transformer.extra_queries is None
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in deployed.state_dict().items())


def test_one_to_one_outputs_are_unchanged_by_the_extra_queries():
    """Masked blocks: the one-to-one queries' predictions in training equal a run without the extra queries."""
    cfg = small_cfg("tiny_pp", "model.method=h_detr", "model.hybrid.num_queries=18")
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=2).train()
    images, masks, targets = batch()
    out = model(images, masks, targets)
    assert out.extra_queries.layers[-1][0].shape == (2, 18, 2) and out.pred_logits.shape == (2, Q, 2)
    model.query_method = None  # the same weights, the one-to-one queries alone
    alone = model(images, masks, targets)
    assert torch.allclose(out.pred_logits, alone.pred_logits, atol=1e-5)
    assert torch.allclose(out.pred_boxes, alone.pred_boxes, atol=1e-6)


def brute_force_cost(logits, boxes, labels, gt_boxes, alpha=0.25, gamma=2.0, weights=(2.0, 5.0, 2.0)):
    """The Deformable-DETR matching cost written out: focal class cost, L1 on cxcywh, -GIoU (torchvision)."""
    prob = logits.sigmoid()[:, labels]
    positive = alpha * (1 - prob) ** gamma * -torch.log(prob + 1e-8)
    negative = (1 - alpha) * prob ** gamma * -torch.log(1 - prob + 1e-8)
    l1 = (boxes[:, None] - gt_boxes[None]).abs().sum(-1)
    giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(gt_boxes, "cxcywh", "xyxy"))
    return weights[0] * (positive - negative) + weights[1] * l1 - weights[2] * giou


def brute_force_assignment(cost):
    """Minimum-cost assignment of every target (column) to a distinct query (row), by enumeration."""
    queries, targets = cost.shape
    best, best_rows = None, None
    for rows in itertools.permutations(range(queries), targets):
        total = sum(cost[r, c].item() for c, r in enumerate(rows))
        if best is None or total < best - 1e-9:
            best, best_rows = total, rows
    return torch.tensor(best_rows), torch.arange(targets)


def test_h_detr_one_to_many_matching_equals_brute_force_against_the_repeated_ground_truth():
    torch.manual_seed(5)
    cfg = small_cfg("tiny_pp")
    criterion = SetCriterion(3, cfg.model)
    k, m = 3, 7  # ground truth repeated 3 times, 7 one-to-many queries
    targets = [{"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]])}]
    layers = [(torch.randn(2, m, 3), torch.rand(2, m, 4) * 0.5 + 0.2) for _ in range(2)]
    losses = criterion.query_set_losses(QuerySetOutput(layers, "o2m", num_blocks=1, target_repeats=k), targets)
    assert sorted(losses) == [f"o2m.d{l}.{t}" for l in (0, 1) for t in ("loss_bbox", "loss_cls", "loss_giou")]
    repeated = [{"labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]
    num_boxes = torch.tensor(float(k * 3))  # 3 ground-truth boxes in the batch, each k times
    for layer, (logits, boxes) in enumerate(layers):
        indices = [brute_force_assignment(brute_force_cost(logits[b], boxes[b], t["labels"], t["boxes"]))
                   for b, t in enumerate(repeated)]
        labels, target_boxes, positive = dense_targets(indices, repeated, m, 3)
        assert int(positive.sum()) == 9  # every repeated box gets its own query: k positives per object
        expected = detection_losses(logits, boxes, labels, target_boxes, positive, num_boxes)
        for term, value in expected.items():
            assert losses[f"o2m.d{layer}.{term}"].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6)


def test_group_detr_matches_each_group_on_its_own_and_averages_the_groups():
    torch.manual_seed(6)
    cfg = small_cfg("tiny", "model.method=group_detr", "model.group.num_groups=3")
    criterion = SetCriterion(2, cfg.model)
    targets = [{"labels": torch.tensor([1, 0]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.6, 0.6, 0.3, 0.2]])}]
    groups = [(torch.randn(1, Q, 2), torch.rand(1, Q, 4) * 0.5 + 0.2) for _ in range(2)]  # groups 1 and 2
    layers = [(torch.cat([g[0] for g in groups], 1), torch.cat([g[1] for g in groups], 1))]
    losses = criterion.query_set_losses(QuerySetOutput(layers, "grp", num_blocks=2), targets)
    expected = {}
    for logits, boxes in groups:  # each group: its own brute-force one-to-one matching, normalised by 2 boxes
        indices = [brute_force_assignment(brute_force_cost(logits[0], boxes[0], targets[0]["labels"],
                                                           targets[0]["boxes"]))]
        labels, target_boxes, positive = dense_targets(indices, targets, Q, 2)
        for term, value in detection_losses(logits, boxes, labels, target_boxes, positive, torch.tensor(2.0)).items():
            expected[term] = expected.get(term, 0.0) + value.item()
    for term, value in expected.items():
        assert losses[f"grp.d0.{term}"].item() == pytest.approx(value, rel=1e-5)
    factors = branch_factors(cfg.model)
    assert factors["dec"] == pytest.approx(1 / 3) and factors["grp"] == pytest.approx(1 / 3) and factors["enc"] == 1.0
    weights = LossWeights(cfg.model)
    assert weights("grp.d0.loss_bbox") == pytest.approx(5.0 / 3) and weights("dec.d1.loss_cls") == pytest.approx(2.0 / 3)


def test_h_detr_weight_and_one_to_many_terms_on_every_layer():
    cfg = small_cfg("tiny_pp", "model.method=h_detr", "model.hybrid.num_queries=12", "model.hybrid.weight=0.5")
    _, out, losses, criterion = model_and_losses(cfg)
    layers = cfg.model.transformer.num_decoder_layers
    assert {k for k in losses if k.startswith("o2m.")} == {
        f"o2m.d{l}.{t}" for l in range(layers) for t in ("loss_cls", "loss_bbox", "loss_giou")}
    assert not any(k.startswith("o2m.") and "enc" in k for k in losses)  # no one-to-many encoder term
    assert criterion.weights("o2m.d0.loss_giou") == pytest.approx(0.5 * 2.0)


@pytest.mark.parametrize("method", ["h_detr", "group_detr"])
def test_inference_runs_the_one_to_one_queries_only(method):
    cfg = small_cfg("tiny_pp", f"model.method={method}", "model.hybrid.num_queries=12")
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=2).eval()
    images, masks, _ = batch()
    with torch.no_grad():
        out = model(images, masks)
    assert out.extra_queries is None and out.pred_logits.shape == (2, Q, 2)
    assert len(model.postprocess(out, torch.tensor([[64, 64], [64, 48]]))[0]["scores"]) == 5


@pytest.mark.parametrize("overrides, key", [
    (["model.method=h_detr", "model.aux.heads=[atss]"], "model.aux.heads"),
    (["model.method=co_detr", "model.aux.heads=[]"], "model.aux.heads"),
    (["model.method=group_detr", "model.group.num_groups=0"], "model.group.num_groups"),
    (["model.method=hdetr"], "model.method"),
])
def test_inconsistent_method_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        apply_overrides(get_preset("tiny"), overrides)


def test_h_detr_and_group_detr_need_deformable_detr():
    with pytest.raises(ConfigError, match="model.method"):
        validate(apply_overrides(get_preset("dino_tiny"), ["model.method=group_detr"]))
