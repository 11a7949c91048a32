"""The detector's pieces against hand-computed or brute-force references."""
import math

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

from codetr.config import apply_overrides, get_preset
from codetr.engine.checkpoint import load_model_state
from codetr.engine.optim import param_groups
from codetr.errors import CheckpointError
from codetr.models.backbone import ResNetBackbone
from codetr.models.criterion import SetCriterion
from codetr.models.total_loss import LossWeights, weighted_total
from codetr.models.detector import DetectorOutput, build_detector
from codetr.models.position_encoding import box_sine_embedding, sine_position_encoding
from codetr.models.transformer import flatten_levels, grid_proposals, valid_ratio

TINY = get_preset("tiny_pp")  # two-stage + refine (Deformable-DETR++)
PLAIN = get_preset("tiny")  # plain Deformable-DETR


def small_cfg(*overrides):
    return apply_overrides(TINY, ["model.num_queries=12", "model.num_detections=10", *overrides])


def test_sine_position_encoding_matches_hand_loop():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    mask[:, :, 3] = True  # last column is padding: valid width 3
    num_feats, temperature, scale = 4, 10000.0, 2 * math.pi
    pos = sine_position_encoding(mask, num_feats=num_feats, temperature=temperature)
    for i in range(3):
        for j in range(3):
            y = (i + 1 - 0.5) / (3 + 1e-6) * scale
            x = (j + 1 - 0.5) / (3 + 1e-6) * scale
            expected = []
            for coordinate in (y, x):
                for k in range(num_feats):
                    phase = coordinate / temperature ** (2 * (k // 2) / num_feats)
                    expected.append(math.sin(phase) if k % 2 == 0 else math.cos(phase))
            assert torch.allclose(pos[0, :, i, j], torch.tensor(expected), atol=1e-5)  # float32 sines


def test_box_sine_embedding_layout():
    boxes = torch.tensor([[0.25, 0.5, 0.1, 0.2]])
    emb = box_sine_embedding(boxes, num_feats=4)
    assert emb.shape == (1, 16)
    # coordinate 1 (cy = 0.5), feature 0: sin(0.5 * 2pi / 1) = sin(pi) ~ 0; feature 1: cos(pi / 10000^(0/4)) = -1
    assert emb[0, 4].item() == pytest.approx(0.0, abs=1e-5)
    assert emb[0, 5].item() == pytest.approx(-1.0, abs=1e-5)


def test_valid_ratio_and_grid_proposals_respect_padding():
    mask = torch.zeros(1, 4, 8, dtype=torch.bool)
    mask[:, 2:, :] = True
    mask[:, :, 6:] = True
    assert valid_ratio(mask).tolist() == [[0.75, 0.5]]
    feats = flatten_levels([torch.zeros(1, 4, 4, 8)], [mask], [torch.zeros(1, 4, 4, 8)], torch.zeros(1, 4))
    boxes_unact, valid = grid_proposals(feats)
    boxes = boxes_unact.sigmoid().view(4, 8, 4)
    # pixel (row 1, col 2): centre ((2 + 0.5) / 6, (1 + 0.5) / 2) in the valid region, size 0.05 * 2^0
    assert boxes[1, 2].tolist() == pytest.approx([2.5 / 6, 0.75, 0.05, 0.05], abs=1e-6)
    assert valid.view(4, 8)[:2, :6].all() and not valid.view(4, 8)[2:].any() and not valid.view(4, 8)[:, 6:].any()


def test_postprocess_matches_brute_force_topk():
    model = build_detector(small_cfg().model, num_classes=3)
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 3)
    boxes = torch.rand(2, 12, 4) * 0.5 + 0.25
    out = DetectorOutput(pred_logits=logits, pred_boxes=boxes)
    sizes = torch.tensor([[100, 200], [50, 80]])
    results = model.postprocess(out, sizes)
    for b in range(2):
        pairs = sorted(((logits[b, q, c].sigmoid().item(), q, c) for q in range(12) for c in range(3)), reverse=True)[:10]
        assert results[b]["scores"].tolist() == pytest.approx([p[0] for p in pairs], abs=1e-6)
        assert results[b]["labels"].tolist() == [p[2] for p in pairs]
        h, w = sizes[b].tolist()
        for k, (_, q, _) in enumerate(pairs):
            cx, cy, bw, bh = boxes[b, q].tolist()
            expected = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            expected = [min(max(v, 0.0), limit) for v, limit in zip(expected, (w, h, w, h))]  # clipped to the image
            assert results[b]["boxes"][k].tolist() == pytest.approx(expected, abs=1e-4)


def plain_cfg(*overrides):
    return apply_overrides(PLAIN, ["model.num_queries=12", "model.num_detections=10", *overrides])


def test_plain_model_has_learned_queries_and_one_shared_pair_of_branches():
    model = build_detector(plain_cfg().model, num_classes=3)
    names = {name for name, _ in model.named_parameters()}
    assert {"transformer.query_embed.weight", "transformer.reference_points.weight"} <= names
    assert not any(n.startswith(("transformer.enc_", "transformer.pos_trans")) for n in names)
    decoder = model.transformer.decoder
    assert all(b is decoder.class_branches[0] for b in decoder.class_branches)
    assert all(b is decoder.box_branches[0] for b in decoder.box_branches)
    assert model.transformer.query_embed.weight.shape == (12, 2 * 128)
    refine = build_detector(plain_cfg("model.with_box_refine=true").model, num_classes=3).transformer.decoder
    assert refine.class_branches[0] is not refine.class_branches[1]
    shared = build_detector(plain_cfg("model.two_stage=true").model, num_classes=3).transformer
    assert shared.enc_class_branch is shared.decoder.class_branches[0]  # two-stage without refine shares them too


def test_box_branches_start_as_deformable_detr_initialises_them():
    """Deformable-DETR (and mmdet's head): the last box layer starts at zero, but without two-stage the first
    branch's size bias is -2 (boxes start 0.12 wide); two-stage boxes start at their proposal's size."""
    def last_biases(*overrides):
        decoder = build_detector(plain_cfg(*overrides).model, num_classes=3).transformer.decoder
        return [branch[-1].bias.tolist() for branch in decoder.box_branches]

    assert last_biases() == [[0.0, 0.0, -2.0, -2.0]] * 3  # one shared branch
    assert last_biases("model.with_box_refine=true") == [[0.0, 0.0, -2.0, -2.0]] + [[0.0] * 4] * 2
    assert last_biases("model.two_stage=true") == [[0.0] * 4] * 3


def test_plain_decoder_predicts_every_layer_around_the_learned_reference_point():
    """Without refinement each layer's box is sigmoid(delta + [logit(ref_xy), 0, 0]) with the SAME reference
    ref = sigmoid(reference_points(positional half of query_embed)), computed here by hand."""
    torch.manual_seed(0)
    model = build_detector(plain_cfg().model, num_classes=3)
    for p in model.transformer.decoder.box_branches[0][-1].parameters():
        torch.nn.init.normal_(p, std=0.1)
    out = model(torch.randn(2, 3, 64, 96), torch.zeros(2, 64, 96, dtype=torch.bool))
    t = model.transformer
    positional = t.query_embed.weight[:, :128]
    ref = torch.sigmoid(positional @ t.reference_points.weight.T + t.reference_points.bias)  # [Q, 2]
    for (_, boxes), hidden in zip(out.layers, model.transformer.decoder(  # the layers' hidden states
            t.query_embed.weight[None, :, 128:].expand(2, -1, -1), positional[None].expand(2, -1, -1),
            ref[None].expand(2, -1, -1), out.memory, out.feats).hidden):
        delta = t.decoder.box_branches[0](hidden)
        expected = torch.sigmoid(delta + torch.cat((torch.logit(ref), torch.zeros_like(ref)), -1))
        assert torch.allclose(boxes, expected, atol=1e-5)  # float32; logit of ref in (1e-5, 1 - 1e-5)


def test_learned_reference_points_are_trained_by_the_box_loss():
    torch.manual_seed(0)
    model = build_detector(plain_cfg().model, num_classes=2)
    out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    out.pred_boxes[..., :2].sum().backward()
    assert model.transformer.reference_points.weight.grad.abs().sum() > 0
    assert out.enc_logits is None and out.enc_boxes is None


def test_forward_shapes_and_per_layer_outputs():
    cfg = small_cfg()
    model = build_detector(cfg.model, num_classes=4)
    images = torch.randn(2, 3, 96, 128)
    masks = torch.zeros(2, 96, 128, dtype=torch.bool)
    masks[1, :, 100:] = True
    out = model(images, masks)
    layers = cfg.model.transformer.num_decoder_layers
    assert len(out.layers) == layers
    assert out.pred_logits.shape == (2, 12, 4) and out.pred_boxes.shape == (2, 12, 4)
    tokens = 12 * 16 + 6 * 8 + 3 * 4 + 2 * 2
    assert out.enc_logits.shape == (2, tokens, 4) and out.memory.shape == (2, tokens, 128)
    assert ((out.pred_boxes >= 0) & (out.pred_boxes <= 1)).all()


def _layer_loss_grads(look_forward_twice: bool) -> torch.Tensor:
    cfg = small_cfg(f"model.look_forward_twice={look_forward_twice}")
    torch.manual_seed(0)
    model = build_detector(cfg.model, num_classes=2)
    for p in model.transformer.decoder.box_branches[0][-1].parameters():
        torch.nn.init.normal_(p, std=0.01)  # the zero init would hide the gradient path
    out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    _, boxes_layer1 = out.layers[1]
    boxes_layer1.sum().backward()
    return model.transformer.decoder.box_branches[0][-1].weight.grad


def test_look_forward_twice_sends_next_layer_gradient_to_previous_box_branch():
    grad = _layer_loss_grads(look_forward_twice=True)
    assert grad is not None and grad.abs().sum() > 0
    grad = _layer_loss_grads(look_forward_twice=False)
    assert grad is None or grad.abs().sum() == 0  # the refined box reaches layer 1 only detached


def test_backbone_frozen_stages_and_frozen_bn():
    backbone = ResNetBackbone(depth=18, frozen_stages=1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.stages[0].parameters())
    assert all(p.requires_grad for p in backbone.stages[1].parameters())
    features = backbone(torch.randn(1, 3, 64, 96))
    assert [f.shape[1:] for f in features] == [(128, 8, 12), (256, 4, 6), (512, 2, 3)]


def test_param_groups_apply_the_paper_multipliers():
    cfg = get_preset("deformable_detr_r50_1x")
    cfg = apply_overrides(cfg, ["model.backbone.depth=18", "model.transformer.d_model=64",
                                "model.transformer.ffn_dim=64", "model.num_queries=10"])
    model = build_detector(cfg.model, num_classes=2)
    groups = {g["name"]: g for g in param_groups(model, cfg.optim)}
    assert groups["backbone"]["lr"] == pytest.approx(2e-5)
    assert groups["linear_proj"]["lr"] == pytest.approx(2e-5)
    assert groups["default"]["lr"] == pytest.approx(2e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    linear_proj = {names[id(p)] for p in groups["linear_proj"]["params"]}
    assert all("sampling_offsets" in n or n.startswith("transformer.reference_points.") for n in linear_proj)
    assert "transformer.reference_points.weight" in linear_proj  # the plain model's, as in Deformable-DETR
    assert all(names[id(p)].startswith("backbone.") for p in groups["backbone"]["params"])
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert trainable == sum(len(g["params"]) for g in groups.values())


def test_checkpoint_of_another_architecture_lists_keys():
    small = build_detector(small_cfg().model, num_classes=3)
    other = build_detector(small_cfg("model.transformer.num_decoder_layers=2").model, num_classes=5)
    with pytest.raises(CheckpointError) as info:
        load_model_state(small, other.state_dict(), source="other.pt")
    message = str(info.value)
    assert "other.pt" in message and "missing" in message and "shape mismatch" in message
    assert "decoder.layers.2" in message and "\n" not in message


def test_criterion_names_every_term_and_weights_apply_once():
    cfg = small_cfg()
    model = build_detector(cfg.model, num_classes=3)
    out = model(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.3, 0.4]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},  # background-only image
    ]
    raw = SetCriterion(3, cfg.model)(out, targets)
    layers = cfg.model.transformer.num_decoder_layers
    expected = {f"dec.d{l}.{t}" for l in range(layers) for t in ("loss_cls", "loss_bbox", "loss_giou")}
    expected |= {"enc.loss_cls", "enc.loss_bbox", "enc.loss_giou"}
    assert set(raw) == expected
    total, weighted = weighted_total(raw, LossWeights(cfg.model))
    by_hand = sum(v * {"loss_cls": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}[k.rsplit(".", 1)[1]] for k, v in raw.items())
    assert torch.allclose(total, by_hand)
    total.backward()
