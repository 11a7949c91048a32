"""Sense-X Co-Deformable-DETR -> codetr (codetr/convert/sensex.py): complete, strict, and placed right.

The state dicts carry exactly the released names and shapes (tests/test_convert_sensex_keys.py, derived
from the released code) with random values. Equality checks are exact (tensors are copied, never
recomputed); the behavioural checks state their tolerance.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from codetr.config import get_preset
from codetr.convert import class_metadata, detect_source
from codetr.convert.coco import COCO_CAT_IDS, COCO_CLASS_NAMES
from codetr.convert.common import ConversionError
from codetr.convert.sensex import convert
from codetr.engine.checkpoint import load_model_state
from codetr.models.co_detr.box_coder import DeltaXYWHCoder
from codetr.models.co_detr.heads.roi_head import roi_losses
from codetr.models.detector import build_detector
from tests.test_convert_sensex_keys import TINY, random_state_dict, read_fixture

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def r50():
    """The released R50 model's state dict (fixture key list, random values) and its conversion."""
    shapes = read_fixture()
    generator = torch.Generator().manual_seed(0)
    state = {k: (torch.tensor(0) if k.endswith("num_batches_tracked") else torch.randn(s, generator=generator))
             for k, s in shapes}
    return state, convert(state)


def test_r50_converts_completely_and_loads_strictly(r50):
    state, conversion = r50
    assert conversion.model == get_preset("co_deformable_detr_r50_1x").model  # exactly the released preset
    assert conversion.num_classes == 80
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert sorted(conversion.skipped) == sorted(counters)
    assert torch.equal(conversion.state_dict["aux.feature_maps.downsample.0.bias"], state["query_head.downsample.0.bias"])
    assert len(conversion.state_dict) + len(conversion.skipped) == len(state)  # nothing dropped silently
    model = build_detector(conversion.model, conversion.num_classes)
    load_model_state(model, conversion.state_dict)  # strict: no missing, unexpected or mis-shaped key


# (Sense-X key, codetr key): where each kind of tensor must land, written out by hand.
PLACES = [
    ("backbone.conv1.weight", "backbone.stem.0.weight"),
    ("backbone.bn1.running_var", "backbone.stem.1.running_var"),
    ("backbone.layer3.5.conv2.weight", "backbone.stages.2.5.conv2.weight"),
    ("backbone.layer1.0.downsample.1.weight", "backbone.stages.0.0.downsample.1.weight"),
    ("neck.convs.2.conv.weight", "neck.lateral.2.0.weight"),
    ("neck.convs.0.gn.bias", "neck.lateral.0.1.bias"),
    ("neck.extra_convs.0.conv.weight", "neck.extra.0.weight"),
    ("query_head.transformer.level_embeds", "transformer.level_embed"),
    ("query_head.transformer.encoder.layers.4.attentions.0.sampling_offsets.bias",
     "transformer.encoder_layers.4.self_attn.sampling_offsets.bias"),
    ("query_head.transformer.encoder.layers.0.ffns.0.layers.1.weight", "transformer.encoder_layers.0.ffn.2.weight"),
    ("query_head.transformer.encoder.layers.5.norms.1.weight", "transformer.encoder_layers.5.norm2.weight"),
    ("query_head.transformer.decoder.layers.2.attentions.0.attn.in_proj_weight",
     "transformer.decoder.layers.2.self_attn.in_proj_weight"),
    ("query_head.transformer.decoder.layers.3.attentions.1.value_proj.weight",
     "transformer.decoder.layers.3.cross_attn.value_proj.weight"),
    ("query_head.transformer.decoder.layers.1.norms.2.bias", "transformer.decoder.layers.1.norm3.bias"),
    ("query_head.transformer.decoder.layers.5.ffns.0.layers.0.0.weight", "transformer.decoder.layers.5.ffn.0.weight"),
    ("query_head.transformer.pos_trans.weight", "transformer.pos_trans.weight"),
    ("query_head.transformer.enc_output_norm.weight", "transformer.enc_output_norm.weight"),
    ("query_head.cls_branches.5.bias", "transformer.decoder.class_branches.5.bias"),
    ("query_head.cls_branches.6.weight", "transformer.enc_class_branch.weight"),  # two-stage: the last branch
    ("query_head.reg_branches.6.4.weight", "transformer.enc_box_branch.4.weight"),
    ("query_head.reg_branches.0.2.bias", "transformer.decoder.box_branches.0.2.bias"),
    ("query_head.query_embedding.weight", "transformer.content_queries.weight"),
    ("query_head.downsample.0.weight", "aux.feature_maps.downsample.0.weight"),
    ("query_head.downsample.1.weight", "aux.feature_maps.downsample.1.weight"),
    # Sense-X head k=0 is the RoI head, k=1 ATSS; codetr's heads are [atss, faster_rcnn]
    ("query_head.transformer.aux_pos_trans.0.weight", "aux.query_embeddings.1.pos_trans.weight"),
    ("query_head.transformer.aux_pos_trans_norm.1.bias", "aux.query_embeddings.0.pos_trans_norm.bias"),
    ("query_head.transformer.pos_feats_trans.0.weight", "aux.query_embeddings.1.feature_proj.weight"),
    ("query_head.transformer.pos_feats_norm.1.weight", "aux.query_embeddings.0.feature_norm.weight"),
    ("rpn_head.rpn_conv.weight", "aux.heads.1.rpn.tower.0.weight"),
    ("rpn_head.rpn_cls.bias", "aux.heads.1.rpn.objectness.bias"),
    ("rpn_head.rpn_reg.weight", "aux.heads.1.rpn.deltas.weight"),
    ("roi_head.0.bbox_head.shared_fcs.0.weight", "aux.heads.1.roi_head.bbox_head.fc1.weight"),
    ("roi_head.0.bbox_head.shared_fcs.1.bias", "aux.heads.1.roi_head.bbox_head.fc2.bias"),
    ("roi_head.0.bbox_head.fc_cls.weight", "aux.heads.1.roi_head.bbox_head.cls.weight"),
    ("roi_head.0.bbox_head.fc_reg.bias", "aux.heads.1.roi_head.bbox_head.reg.bias"),
    ("bbox_head.0.cls_convs.0.conv.weight", "aux.heads.0.cls_tower.0.weight"),
    ("bbox_head.0.reg_convs.0.gn.weight", "aux.heads.0.reg_tower.1.weight"),
    ("bbox_head.0.atss_cls.bias", "aux.heads.0.cls_pred.bias"),
    ("bbox_head.0.atss_reg.weight", "aux.heads.0.reg_pred.weight"),
    ("bbox_head.0.atss_centerness.weight", "aux.heads.0.centerness_pred.weight"),
    ("bbox_head.0.scales.4.scale", "aux.heads.0.level_scales.4.scale"),
]


@pytest.mark.parametrize("sensex_key, codetr_key", PLACES)
def test_each_tensor_lands_in_its_place(r50, sensex_key, codetr_key):
    state, conversion = r50
    assert torch.equal(conversion.state_dict[codetr_key], state[sensex_key])


def test_head_pos_embed_rows_follow_the_heads(r50):
    """[K, 1] rows: Sense-X k=0 (Faster-RCNN), k=1 (ATSS) -> codetr j=0 (atss), j=1 (faster_rcnn)."""
    state, conversion = r50
    embed = state["query_head.transformer.head_pos_embed.weight"]
    assert conversion.model.aux.heads == ["atss", "faster_rcnn"]
    assert torch.equal(conversion.state_dict["aux.head_pos_embed"], torch.stack([embed[1], embed[0]]))


def test_qkv_in_proj_layout():
    """mmcv's MultiheadAttention is torch's nn.MultiheadAttention (attn): q, k, v rows in that order.
    codetr's decoder self-attention computes q from rows [0, d), k from [d, 2d), v from [2d, 3d)."""
    state = random_state_dict(TINY)
    d = TINY.d_model
    key = "query_head.transformer.decoder.layers.0.attentions.0.attn."
    weight = torch.zeros(3 * d, d)
    weight[:d], weight[d:2 * d], weight[2 * d:] = torch.eye(d), 2 * torch.eye(d), 3 * torch.eye(d)
    state[key + "in_proj_weight"], state[key + "in_proj_bias"] = weight, torch.zeros(3 * d)
    conversion = convert(state)
    model = build_detector(conversion.model, conversion.num_classes)
    load_model_state(model, conversion.state_dict)
    attn = model.transformer.decoder.layers[0].self_attn
    x = torch.randn(1, 5, d)
    out = attn(x, x, x, need_weights=False)[0]
    # reference: q = x, k = 2x, v = 3x, 8 heads of d/8, then out_proj (from the Sense-X tensors)
    heads = 8
    q, k, v = (t.view(1, 5, heads, d // heads).transpose(1, 2) for t in (x, 2 * x, 3 * x))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 5, d)
    reference = F.linear(attended, state[key + "out_proj.weight"], state[key + "out_proj.bias"])
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)


def test_roi_classifier_background_is_last_and_deltas_are_class_major():
    """mmdet's fc_cls has background LAST of num_classes + 1 and fc_reg holds [class 0 dx dy dw dh, class 1 ...].
    Through codetr's RoI loss: a huge background logit gives ~zero CE on negatives, and class c's deltas are
    the ones decoded for a positive of class c (GIoU ~ 0 against the box they decode to)."""
    state = random_state_dict(TINY)
    c = TINY.num_classes
    b = "roi_head.0.bbox_head."
    for key in ("shared_fcs.0.weight", "fc_cls.weight", "fc_reg.weight"):
        state[b + key] = torch.zeros_like(state[b + key])
    state[b + "fc_cls.bias"] = torch.zeros(c + 1)
    state[b + "fc_cls.bias"][c] = 30.0  # mmdet: index num_classes is the background
    reg_bias = torch.zeros(4 * c)
    reg_bias[4 * 2: 4 * 3] = torch.tensor([1.0, -0.5, 0.3, 0.2])  # class 2's deltas; every other class zero
    state[b + "fc_reg.bias"] = reg_bias
    conversion = convert(state)
    model = build_detector(conversion.model, conversion.num_classes)
    load_model_state(model, conversion.state_dict)
    head = model.aux.heads[1].roi_head.bbox_head
    logits, deltas = head(torch.randn(2, TINY.d_model, 7, 7))
    rois = torch.tensor([[10.0, 10.0, 50.0, 40.0], [10.0, 10.0, 50.0, 40.0]])
    coder = DeltaXYWHCoder(means=(0.0, 0.0, 0.0, 0.0), stds=(0.1, 0.1, 0.2, 0.2))
    class2_box = coder.decode(rois[:1], reg_bias[8:12][None], None)
    negatives = roi_losses(logits, deltas, rois, torch.tensor([c, c]), torch.zeros(2, 4), coder)
    assert negatives["loss_cls"] < 1e-10  # background at index num_classes in codetr too
    positive = roi_losses(logits[:1], deltas[:1], rois[:1], torch.tensor([2]), class2_box, coder)
    assert positive["loss_bbox"] < 1e-5  # GIoU of class 2's own decoded box: tolerance 1e-5
    other = roi_losses(logits[:1], deltas[:1], rois[:1], torch.tensor([3]), class2_box, coder)
    assert other["loss_bbox"] > 0.05  # class 3 decodes with zero deltas: a different box


def test_atss_scales_multiply_their_level():
    """mmdet ATSS: bbox_pred = scales[l](atss_reg(reg_convs(x))); scales.l must scale level l in codetr."""
    state = random_state_dict(TINY)
    for level in range(5):
        state[f"bbox_head.0.scales.{level}.scale"] = torch.tensor(1.0 + level)
    conversion = convert(state)
    model = build_detector(conversion.model, conversion.num_classes)
    load_model_state(model, conversion.state_dict)
    head = model.aux.heads[0]
    maps = [torch.randn(1, TINY.d_model, 6 - level, 6 - level) for level in range(5)]  # 5 levels, as strides 8..128
    _, deltas, _ = head.predict(maps)
    per_level = [m.shape[-1] * m.shape[-2] for m in maps]
    for level, chunk in enumerate(deltas[0].split(per_level)):
        feat = F.relu(F.group_norm(F.conv2d(maps[level], state["bbox_head.0.reg_convs.0.conv.weight"], padding=1), 32,
                                   state["bbox_head.0.reg_convs.0.gn.weight"], state["bbox_head.0.reg_convs.0.gn.bias"]))
        reference = (1.0 + level) * F.conv2d(feat, state["bbox_head.0.atss_reg.weight"], state["bbox_head.0.atss_reg.bias"], padding=1)
        torch.testing.assert_close(chunk, reference.permute(0, 2, 3, 1).reshape(-1, 4), rtol=1e-5, atol=1e-6)


def test_tiny_variant_reads_its_dims():
    conversion = convert(random_state_dict(TINY))
    t = conversion.model.transformer
    assert (conversion.model.backbone.depth, t.d_model, t.ffn_dim, t.num_points) == (18, 32, 64, 2)
    assert (t.num_encoder_layers, t.num_decoder_layers, conversion.model.num_queries) == (1, 2, 20)
    assert (conversion.num_classes, conversion.model.aux.rcnn_fc_channels) == (6, 32)


# -- strictness ------------------------------------------------------------------------------------------


def test_extra_key_is_named():
    state = random_state_dict(TINY)
    state["query_head.label_embedding.weight"] = torch.zeros(6, 32)  # Co-DINO's, not Co-Deformable-DETR's
    with pytest.raises(ConversionError, match=r"1 keys have no codetr counterpart: query_head\.label_embedding\.weight"):
        convert(state)


def test_missing_key_is_named():
    state = random_state_dict(TINY)
    del state["roi_head.0.bbox_head.fc_cls.bias"]
    with pytest.raises(ConversionError, match=r"no source in the state dict: aux\.heads\.1\.roi_head\.bbox_head\.cls\.bias"):
        convert(state)


def test_shape_mismatch_names_key_and_both_shapes():
    state = random_state_dict(TINY)
    state["rpn_head.rpn_cls.weight"] = torch.zeros(15, 32, 1, 1)  # 15 anchors instead of 9
    with pytest.raises(ConversionError, match=r"rpn_head\.rpn_cls\.weight is \(15, 32, 1, 1\) but codetr's "
                                              r"aux\.heads\.1\.rpn\.objectness\.weight is \(9, 32, 1, 1\)"):
        convert(state)


def test_other_frameworks_name_their_first_unmapped_keys():
    import torchvision

    classifier = torchvision.models.resnet18(weights=None).state_dict()
    with pytest.raises(ConversionError, match=r"122 keys have no codetr counterpart: conv1\.weight, bn1\.weight"):
        convert(classifier)  # a torchvision classifier's names lack Sense-X's "backbone." prefix
    with pytest.raises(ConversionError, match=r"unmapped keys: conv1\.weight, bn1\.weight"):
        detect_source(classifier)
    codetr_names = build_detector(get_preset("co_tiny_pp").model, 6).state_dict()
    with pytest.raises(ConversionError, match=r"no codetr counterpart: backbone\.stem\.0\.weight"):
        convert(codetr_names)


def test_class_metadata():
    assert class_metadata({"CLASSES": COCO_CLASS_NAMES}, 80) == (list(COCO_CAT_IDS), list(COCO_CLASS_NAMES))
    assert class_metadata({"dataset_meta": {"classes": list(COCO_CLASS_NAMES)}}, 80)[0][-1] == 90
    assert class_metadata({"CLASSES": ("a", "b")}, 2) == ([1, 2], ["a", "b"])
    assert class_metadata({}, 3) == ([1, 2, 3], ["class_1", "class_2", "class_3"])
    with pytest.raises(Exception, match="meta names 2 classes but the weights predict 3"):
        class_metadata({"CLASSES": ("a", "b")}, 3)
