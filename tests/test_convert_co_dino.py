"""Released Co-DINO R50 checkpoints (Sense-X and mmdetection 3's projects/CO-DETR share the key names) ->
codetr: complete, strict, and placed right.

The key list and shapes are those of mmdet 3.3's own Co-DINO R50 model (co_dino_5scale_r50_8xb2_1x_coco,
recorded by tests/peer/record_co_dino.py into tests/fixtures/peer/co_dino_r50_layout.pt); the values are
random. That the converted weights compute what mmdet computes is tests/test_peer_co_dino.py's job (a small
Co-DINO with every kind of tensor); here the full-size layout must convert with no unmapped key.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from codetr.config import get_preset
from codetr.convert import detect_source
from codetr.convert.common import ConversionError
from codetr.convert.sensex import convert
from codetr.engine.checkpoint import load_model_state
from codetr.models.detector import build_detector
from codetr.models.swin import relative_position_index

LAYOUT = Path(__file__).parent / "fixtures" / "peer" / "co_dino_r50_layout.pt"
torch.set_num_threads(1)


def layout_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Random values in the layout's keys and shapes; buffers as a real checkpoint holds them (BatchNorm
    counters, Swin's relative position index of its 12-window, which the converter checks)."""
    layout = torch.load(LAYOUT, weights_only=True)[name]
    generator = torch.Generator().manual_seed(0)

    def value(key: str, shape) -> torch.Tensor:
        if key.endswith("num_batches_tracked"):
            return torch.tensor(0)
        if key.endswith("relative_position_index"):
            return relative_position_index(12).view(shape)
        return torch.randn(shape, generator=generator)

    return {e["key"]: value(e["key"], e["shape"]) for e in layout}


@pytest.fixture(scope="module")
def r50():
    state = layout_state_dict("r50")
    return state, convert(state)


def test_r50_converts_completely_into_the_released_preset(r50):
    state, conversion = r50
    assert detect_source(state) == "sensex"
    assert conversion.model == get_preset("co_dino_5scale_r50_1x").model  # exactly the released preset
    assert conversion.num_classes == 80
    assert sorted(conversion.skipped) == sorted(k for k in state if k.endswith("num_batches_tracked"))
    assert len(conversion.state_dict) + len(conversion.skipped) == len(state)  # nothing dropped silently
    with torch.device("meta"):
        model = build_detector(conversion.model, conversion.num_classes)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes.keys() == conversion.state_dict.keys()
    assert all(conversion.state_dict[k].shape == shape for k, shape in shapes.items())


PLACES = [
    ("neck.convs.0.conv.weight", "neck.lateral.0.0.weight"),  # C2, 256 channels
    ("neck.extra_convs.0.conv.weight", "neck.extra.0.weight"),
    ("query_head.transformer.level_embeds", "transformer.level_embed"),  # [5, 256]
    ("query_head.transformer.query_embed.weight", "transformer.content_queries.weight"),  # [900, 256]
    ("query_head.transformer.decoder.ref_point_head.0.weight", "transformer.decoder.ref_point_head.0.weight"),
    ("query_head.transformer.decoder.ref_point_head.2.bias", "transformer.decoder.ref_point_head.2.bias"),
    ("query_head.transformer.decoder.norm.weight", "transformer.decoder.norm.weight"),
    ("query_head.dn_generator.label_embedding.weight", "denoising.label_embedding.weight"),
    ("query_head.cls_branches.6.weight", "transformer.enc_class_branch.weight"),
    ("query_head.reg_branches.6.4.bias", "transformer.enc_box_branch.4.bias"),
    ("query_head.cls_branches.2.bias", "transformer.decoder.class_branches.2.bias"),
    # mmdet's head k=0 is the RoI head, k=1 ATSS; codetr's heads are [atss, faster_rcnn]
    ("query_head.transformer.aux_pos_trans.0.weight", "aux.query_embeddings.1.pos_trans.weight"),  # [256, 512]
    ("query_head.transformer.aux_pos_trans_norm.1.bias", "aux.query_embeddings.0.pos_trans_norm.bias"),
    ("rpn_head.rpn_cls.weight", "aux.heads.1.rpn.objectness.weight"),
    ("roi_head.0.bbox_head.fc_cls.weight", "aux.heads.1.roi_head.bbox_head.cls.weight"),
    ("bbox_head.0.scales.5.scale", "aux.heads.0.level_scales.5.scale"),  # 6 levels: strides 4..128
]


@pytest.mark.parametrize("foreign_key, codetr_key", PLACES)
def test_each_tensor_lands_in_its_place(r50, foreign_key, codetr_key):
    state, conversion = r50
    assert torch.equal(conversion.state_dict[codetr_key], state[foreign_key])


def test_an_unknown_key_or_a_wrong_shape_is_one_error_naming_it(r50):
    state, _ = r50
    extra = dict(state, **{"query_head.transformer.mystery.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="query_head.transformer.mystery.weight"):
        convert(extra)
    wrong = dict(state, **{"query_head.transformer.decoder.norm.weight": torch.zeros(128)})
    with pytest.raises(ConversionError, match=r"decoder\.norm\.weight is \(128,\)"):
        convert(wrong)
    missing = {k: v for k, v in state.items() if k != "query_head.transformer.decoder.ref_point_head.0.weight"}
    with pytest.raises(ConversionError, match="ref_point_head.0.weight"):
        convert(missing)


def test_swin_l_converts_completely_into_its_preset():
    """mmdet's Swin-L Co-DINO layout (co_dino_5scale_swin_l_16xb1_1x_coco): the backbone goes through the Swin
    key map (codetr/convert/swin_keys.py, numerically checked against mmdet's SwinTransformer in
    tests/test_swin.py), everything else through the same rules as R50."""
    state = layout_state_dict("swin_l")
    assert "backbone.patch_embed.projection.weight" in state
    conversion = convert(state)
    assert conversion.model == get_preset("co_dino_5scale_swin_l_1x").model
    assert not conversion.skipped
    with torch.device("meta"):
        model = build_detector(conversion.model, conversion.num_classes)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes.keys() == conversion.state_dict.keys()
    assert all(conversion.state_dict[k].shape == shape for k, shape in shapes.items())
    # a non-backbone tensor is copied as is; the stage-0 block's qkv lands in the Swin block
    assert torch.equal(conversion.state_dict["transformer.level_embed"], state["query_head.transformer.level_embeds"])
    assert torch.equal(conversion.state_dict["backbone.stages.2.17.attn.qkv.weight"],
                       state["backbone.stages.2.blocks.17.attn.w_msa.qkv.weight"])


@pytest.mark.parametrize("config_text, lsj", [
    ("model = dict(type='CoDETR', use_lsj=True, eval_module='detr')", True),  # mmdet 3 (meta["cfg"])
    ("model = dict(type='CoDETR', use_lsj=False)", False),
    ("query_head=dict(type='CoDINOHead', with_attn_mask = False)", True),  # Sense-X (meta["config"])
    (None, False),
])
def test_lsj_is_read_off_the_checkpoints_config(r50, config_text, lsj):
    from codetr.convert import convert_foreign
    from codetr.convert.reading import ForeignCheckpoint

    state, _ = r50
    meta = {} if config_text is None else {("config" if "CoDINOHead" in config_text else "cfg"): config_text}
    checkpoint = convert_foreign(ForeignCheckpoint(state, meta, [], []), "co_dino.pth").checkpoint
    assert checkpoint["config"]["preset"] == "co_dino_5scale_r50_1x"
    assert checkpoint["config"]["data"]["lsj"] is lsj
