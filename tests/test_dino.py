"""DINO's parts against hand-built references: the denoising queries (layout, noise ranges, attention mask),
the quality focal loss, the decoder's reference-box positions and look forward twice, query selection by the
best class score, and soft-NMS."""
import math

import pytest
import torch

from codetr.box_ops import box_cxcywh_to_xyxy
from codetr.config import get_preset
from codetr.models.detector import build_detector
from codetr.models.dino.denoising import DenoisingGenerator, denoising_attn_mask
from codetr.models.dino.transformer import reference_sine_embedding
from codetr.models.losses import quality_focal_loss
from codetr.models.soft_nms import batched_soft_nms


def hand_mask(max_targets: int, groups: int, matching: int) -> torch.Tensor:
    """mmdet's CdnQueryGenerator docstring figure, entry by entry: True = may not attend."""
    size = 2 * max_targets
    total = size * groups + matching
    mask = torch.zeros(total, total, dtype=torch.bool)
    for row in range(total):
        for col in range(total):
            row_group = row // size if row < size * groups else None
            col_group = col // size if col < size * groups else None
            if col_group is not None and row_group != col_group:
                mask[row, col] = True  # nobody sees another group's denoising queries
    return mask


def test_attention_mask_equals_the_hand_built_one():
    mask = denoising_attn_mask(max_targets=2, num_groups=2, num_matching=5)
    assert mask.shape == (13, 13)
    assert torch.equal(mask, hand_mask(2, 2, 5))
    # mmdet's docstring figure: 2 groups of 4 denoising queries, then 5 matching queries
    assert mask[8:, :8].all() and not mask[:, 8:].any()  # matching rows see no denoising query; all see matching
    assert not mask[:4, :4].any() and mask[:4, 4:8].all() and mask[4:8, :4].all()


def two_images():
    targets = [
        {"labels": torch.tensor([2, 4]), "boxes": torch.tensor([[0.30, 0.40, 0.20, 0.10], [0.60, 0.55, 0.30, 0.20]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.50, 0.50, 0.40, 0.30]])},
    ]
    return targets


def test_denoising_layout_targets_and_noise_ranges():
    torch.manual_seed(0)
    generator = DenoisingGenerator(num_classes=5, d_model=16, num_queries=4, label_noise=1e-9, box_noise=0.2)
    queries = generator(two_images(), num_matching=7)
    assert (queries.max_targets, queries.num_groups, queries.num_queries) == (2, 2, 8)  # G = 4 // 2
    # per image [pos g0 | neg g0 | pos g1 | neg g1], 2 slots each; image 1 has one box: slots 1, 3, 5, 7 empty
    expected_positive = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(queries.positive, expected_positive)
    assert torch.equal(queries.labels, torch.tensor([[2, 4, 5, 5, 2, 4, 5, 5], [1, 5, 5, 5, 1, 5, 5, 5]]))
    targets = two_images()
    torch.testing.assert_close(queries.target_boxes[0, [0, 1, 4, 5]], targets[0]["boxes"].repeat(2, 1), rtol=0, atol=1e-6)
    torch.testing.assert_close(queries.target_boxes[1, [0, 4]], targets[1]["boxes"].repeat(2, 1), rtol=0, atol=1e-6)
    # content = embedding of the (un-noised, label_noise ~ 0) label; empty slots are zero, box logit 0
    weight = generator.label_embedding.weight
    torch.testing.assert_close(queries.content[0, [0, 2, 4, 6]], weight[[2, 2, 2, 2]])
    torch.testing.assert_close(queries.content[1, 2], weight[1])
    empty = [1, 3, 5, 7]
    assert torch.equal(queries.content[1, empty], torch.zeros(4, 16)) and torch.equal(queries.boxes_unact[1, empty], torch.zeros(4, 4))
    assert queries.attn_mask.shape == (15, 15)

    # corners of positives move by less than box_noise * (w, h) / 2; of negatives by between 1 and 2 times that
    for image, target in enumerate(targets):
        gt_xyxy = box_cxcywh_to_xyxy(target["boxes"])
        wh = target["boxes"][:, 2:].repeat(1, 2)
        n = len(gt_xyxy)
        for group in range(2):
            for kind, (low, high) in (("pos", (0.0, 1.0)), ("neg", (1.0, 2.0))):
                start = group * 4 + (0 if kind == "pos" else 2)
                noised = box_cxcywh_to_xyxy(queries.boxes_unact[image, start:start + n].sigmoid())
                units = (noised - gt_xyxy).abs() / (wh * 0.2 / 2)  # in units of the noise scale
                assert (units >= low - 1e-3).all() and (units < high + 1e-3).all(), (image, group, kind, units)


def test_label_noise_replaces_a_quarter_of_labels_at_scale_half():
    torch.manual_seed(1)
    generator = DenoisingGenerator(num_classes=1000, d_model=4, num_queries=2000, label_noise=0.5)
    targets = [{"labels": torch.zeros(1, dtype=torch.long), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    queries = generator(targets, num_matching=1)  # 2000 groups x 2 copies of one box
    changed = (queries.content != generator.label_embedding.weight[0]).any(-1).float().mean()
    # a label is redrawn with probability 0.5 / 2 and then differs with probability 999 / 1000
    assert abs(float(changed) - 0.25 * 0.999) < 0.02


def test_no_ground_truth_gives_no_denoising_queries():
    generator = DenoisingGenerator(num_classes=3, d_model=8, num_queries=10)
    queries = generator([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}], num_matching=4)
    assert queries.num_queries == 0 and queries.num_groups == 1 and queries.attn_mask.shape == (4, 4)
    assert not queries.attn_mask.any()


def test_quality_focal_loss_equals_the_gfl_formula():
    logits = torch.tensor([[0.3, -1.2, 2.0], [-0.5, 0.1, 0.7]])
    labels = torch.tensor([2, 3])  # second sample: background
    quality = torch.tensor([0.6, 0.0])
    beta = 2.0
    expected = torch.zeros(2)
    for n in range(2):
        for c in range(3):
            y = quality[n].item() if labels[n].item() == c else 0.0
            s = 1 / (1 + math.exp(-logits[n, c].item()))
            expected[n] += -abs(y - s) ** beta * ((1 - y) * math.log(1 - s) + y * math.log(s))
    torch.testing.assert_close(quality_focal_loss(logits, labels, quality, beta), expected, rtol=1e-6, atol=1e-7)


def test_reference_sine_embedding_is_y_x_w_h():
    box = torch.tensor([[0.1, 0.7, 0.2, 0.4]])
    embedded = reference_sine_embedding(box, d_model=8)  # 4 features per coordinate
    temperature = 10000.0
    for slot, value in enumerate([0.7, 0.1, 0.2, 0.4]):  # y, x, w, h
        phases = [value * 2 * math.pi / temperature ** (2 * (i // 2) / 4) for i in range(4)]
        expected = [math.sin(phases[0]), math.cos(phases[1]), math.sin(phases[2]), math.cos(phases[3])]
        torch.testing.assert_close(embedded[0, slot * 4:(slot + 1) * 4], torch.tensor(expected), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def dino_model():
    torch.manual_seed(0)
    cfg = get_preset("dino_tiny").model
    cfg.transformer.num_encoder_layers, cfg.num_queries, cfg.denoising.num_queries = 1, 12, 6
    return build_detector(cfg, 5)


def batch():
    images = torch.randn(2, 3, 96, 80)
    masks = torch.zeros(2, 96, 80, dtype=torch.bool)
    masks[1, :, 64:] = True
    return images, masks


def test_look_forward_twice_reaches_the_previous_box_branch_and_inputs_are_detached(dino_model):
    model = dino_model.train()
    images, masks = batch()
    out = model(images, masks, two_images())
    decoder = model.transformer.decoder
    model.zero_grad()
    out.layers[1][1].sum().backward()  # layer 1's boxes only
    assert decoder.box_branches[0][-1].weight.grad.abs().sum() > 0  # through layer 1's non-detached reference
    assert decoder.box_branches[2][-1].weight.grad is None or decoder.box_branches[2][-1].weight.grad.abs().sum() == 0
    # the matching queries start from detached proposals: no gradient reaches the encoder's box branch
    assert model.transformer.enc_box_branch[-1].weight.grad is None or model.transformer.enc_box_branch[-1].weight.grad.abs().sum() == 0
    assert out.denoising.queries.num_queries == 12 and out.layers[0][0].shape[1] == 12  # G = 6 // 2 groups of 2 x 2


def test_queries_are_the_top_tokens_by_best_class_score(dino_model):
    model = dino_model.eval()
    images, masks = batch()
    captured = {}
    head = model.transformer.enc_class_branch
    handle = head.register_forward_hook(lambda m, i, o: captured.setdefault("logits", o.detach()))
    with torch.no_grad():
        out = model(images, masks)
    handle.remove()
    logits = captured["logits"]  # [B, S, K], every token
    for image in range(2):
        best = logits[image].max(-1).values
        order = sorted(range(len(best)), key=lambda i: -float(best[i]))[:12]
        torch.testing.assert_close(out.enc_logits[image], logits[image, order])
    assert out.denoising is None and out.enc_class_agnostic is False


def test_soft_nms_by_hand():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 9.0], [1, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.8, 0.75, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 0, 1])
    decayed, keep = batched_soft_nms(boxes, scores, labels, iou_threshold=0.85)
    # box 0 first; box 1 (IoU 0.9) decays to 0.8 * 0.1 = 0.08, box 2 (IoU 0.9) to 0.075; box 3 and the other
    # class are untouched. Then box 1 (0.08) vs box 2: IoU 81/99 = 0.818 < 0.85, no decay.
    assert keep.tolist() == [0, 3, 4, 1, 2]
    torch.testing.assert_close(decayed, torch.tensor([0.9, 0.7, 0.6, 0.08, 0.075]), rtol=1e-5, atol=1e-7)
    decayed, keep = batched_soft_nms(boxes, scores, labels, iou_threshold=0.8)
    # now box 2 decays again by box 1: 0.075 * (1 - 0.818) = 0.0136
    torch.testing.assert_close(decayed[-1], torch.tensor(0.075 * (1 - 81 / 99)), rtol=1e-5, atol=1e-7)


def empty_target():
    return {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}


@pytest.mark.parametrize("preset", ["dino_tiny", "co_dino_tiny"])
@pytest.mark.parametrize("case", ["no_ground_truth", "mixed", "one_image"])
def test_training_steps_without_ground_truth_keep_every_parameter_in_the_graph(preset, case):
    """No GT in the batch: no denoising queries, yet the label embedding (and every other parameter that
    trains) gets a gradient, as DDP needs; losses stay finite."""
    from codetr.models.criterion import build_criterion
    from codetr.models.total_loss import weighted_total

    torch.manual_seed(0)
    cfg = get_preset(preset).model
    cfg.transformer.num_encoder_layers, cfg.num_queries, cfg.denoising.num_queries = 1, 12, 6
    model = build_detector(cfg, 5).train()
    images, masks = batch()
    targets = {"no_ground_truth": [empty_target(), empty_target()], "mixed": [two_images()[0], empty_target()],
               "one_image": [two_images()[1]]}[case]
    if case == "one_image":
        images, masks = images[:1], masks[:1]
    criterion = build_criterion(model, cfg)
    total, _ = weighted_total(criterion(model(images, masks, targets), targets), criterion.weights)
    assert torch.isfinite(total)
    total.backward()
    assert model.denoising.label_embedding.weight.grad is not None
    frozen = {name for name, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert not frozen, f"parameters outside the graph: {sorted(frozen)[:5]}"


def test_denoising_losses_are_normalised_by_the_positive_copies():
    """One image, 2 boxes, 6 denoising queries -> G = 3 groups, 6 positive copies: the L1 term of a layer is
    the sum over those copies of |box - target| divided by 6 (not by the 2 boxes)."""
    from codetr.models.criterion import build_criterion

    torch.manual_seed(0)
    cfg = get_preset("dino_tiny").model
    cfg.transformer.num_encoder_layers, cfg.num_queries, cfg.denoising.num_queries = 1, 12, 6
    model = build_detector(cfg, 5).train()
    images, masks = batch()
    targets = [two_images()[0]]
    out = model(images[:1], masks[:1], targets)
    losses = build_criterion(model, cfg)(out, targets)
    queries = out.denoising.queries
    assert queries.num_groups == 3 and int(queries.positive.sum()) == 6
    positive = queries.positive[0]
    expected = (out.denoising.boxes[0][0, positive] - queries.target_boxes[0, positive]).abs().sum() / 6
    torch.testing.assert_close(losses["dn.d0.loss_bbox"], expected, rtol=1e-6, atol=1e-7)
