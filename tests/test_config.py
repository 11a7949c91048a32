"""Config presets and dotted overrides: parsing by field type, and one clear error for bad input."""
import pytest

from codetr.presets import PRESETS

from codetr.config import Config, apply_overrides, config_from_dict, get_preset, valid_keys
from codetr.errors import ConfigError


def test_paper_preset_defaults():
    cfg = get_preset("deformable_detr_r50_1x")  # the paper's plain Deformable-DETR
    assert cfg.model.num_queries == 300
    assert not (cfg.model.two_stage or cfg.model.with_box_refine or cfg.model.mixed_selection
                or cfg.model.look_forward_twice)
    pp = get_preset("deformable_detr_pp_r50_1x").model  # Deformable-DETR++
    assert pp.two_stage and pp.with_box_refine and pp.mixed_selection and pp.look_forward_twice
    assert (cfg.model.loss.cls_weight, cfg.model.loss.bbox_weight, cfg.model.loss.giou_weight) == (2.0, 5.0, 2.0)
    assert cfg.optim.lr == 2e-4 and cfg.optim.weight_decay == 1e-4 and cfg.optim.clip_max_norm == 0.1
    assert cfg.optim.epochs == 12 and cfg.optim.lr_drop_epochs == (11,)
    assert cfg.data.train_scales == tuple(range(480, 801, 32))
    assert cfg.model.backbone.depth == 50 and cfg.model.backbone.frozen_stages == 1


@pytest.mark.parametrize("preset, two_stage, heads", [
    ("deformable_detr_r50_1x", False, []), ("co_deformable_detr_k1_r50_1x", False, ["atss"]),
    ("co_deformable_detr_k2_r50_1x", False, ["atss", "faster_rcnn"]), ("deformable_detr_pp_r50_1x", True, []),
    ("co_deformable_detr_r50_1x", True, ["atss", "faster_rcnn"]), ("tiny", False, []), ("co_tiny", False, ["atss"]),
    ("tiny_pp", True, []), ("co_tiny_pp", True, ["atss", "faster_rcnn"]),
    ("dino_5scale_r50_1x", True, []), ("co_dino_5scale_r50_1x", True, ["atss", "faster_rcnn"]),
    ("co_dino_5scale_lsj_r50_1x", True, ["atss", "faster_rcnn"]), ("co_dino_5scale_9enc_lsj_r50_3x", True, ["atss", "faster_rcnn"]),
    ("co_dino_5scale_swin_l_1x", True, ["atss", "faster_rcnn"]), ("dino_tiny", True, []),
    ("co_dino_tiny", True, ["atss", "faster_rcnn"]), ("h_deformable_detr_pp_r50_1x", True, []),
    ("group_deformable_detr_r50_1x", False, []),
])
def test_presets_are_the_papers_rows(preset, two_stage, heads):
    cfg = get_preset(preset)
    assert (cfg.model.two_stage, cfg.model.with_box_refine, cfg.model.aux.heads) == (two_stage, two_stage, heads)
    doc = PRESETS[preset].__doc__
    assert "AP" in doc or "analogue" in doc  # the R50 rows name the paper's AP, the CPU ones their R50 row


def test_mixed_selection_needs_two_stage():
    with pytest.raises(ConfigError, match="model.mixed_selection=True: expected false without two_stage"):
        apply_overrides(get_preset("tiny"), ["model.mixed_selection=true"])


def test_overrides_parse_by_type():
    cfg = apply_overrides(
        get_preset("tiny"),
        ["model.num_queries=20", "optim.lr=1e-3", "train.ema=true", "data.train_scales=[200,224]",
         "data.invalid_boxes=drop"],
    )
    assert cfg.model.num_queries == 20 and isinstance(cfg.model.num_queries, int)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.ema is True
    assert cfg.data.train_scales == (200, 224)
    assert cfg.data.invalid_boxes == "drop"


def test_overrides_do_not_mutate_the_preset():
    base = get_preset("tiny")
    apply_overrides(base, ["model.num_queries=7"])
    assert base.model.num_queries == get_preset("tiny").model.num_queries


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.num_querys=3", "unknown config key 'model.num_querys'"),
        ("model.num_queries=abc", "expected an integer"),
        ("train.ema=maybe", "expected a boolean"),
        ("model=3", "is a section"),
        ("no_equals_sign", "expected KEY=VALUE"),
        ("data.invalid_boxes=ignore", "data.invalid_boxes"),
        ("model.transformer.d_model=100", "multiple of num_heads"),
    ],
)
def test_bad_overrides_are_one_clear_error(override, fragment):
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("tiny"), [override])
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("tiny"), ["optim.lrr=1"])
    assert "optim.lr" in str(info.value) and "optim.weight_decay" in str(info.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="valid presets: .*tiny"):
        get_preset("resnet9000")


def test_round_trip_through_dict():
    cfg = apply_overrides(get_preset("tiny"), ["data.crop_size=100,200", "model.num_queries=11"])
    rebuilt = config_from_dict(cfg.to_dict())
    assert rebuilt == cfg and rebuilt.hash() == cfg.hash()
    assert isinstance(rebuilt.data.crop_size, tuple)


def test_valid_keys_cover_every_leaf():
    keys = valid_keys(Config())
    assert "model.transformer.num_points" in keys and "optim.lr" in keys and "model" not in keys


@pytest.mark.parametrize("preset, recorded", [
    ("tiny", "4643a12ce462"), ("co_tiny", "8b49d10f1387"), ("co_dino_tiny", "4248136cfbf8"),
    ("deformable_detr_r50_1x", "60ff51a16869"), ("co_deformable_detr_r50_1x", "c1a1260b2e51"),
])
def test_config_hashes_are_unchanged_by_the_method_switch(preset, recorded):
    """Hashes recorded at 45471ef, before model.method / hybrid / group existed: grid folders made then resume.
    The method's settings enter the hash only where they are used."""
    cfg = get_preset(preset)
    assert cfg.hash() == recorded
    assert apply_overrides(cfg, ["model.group.num_groups=5"]).hash() == recorded  # unused by this method
    if not cfg.model.aux.heads:
        h_detr = apply_overrides(cfg, ["model.method=h_detr"])
        assert h_detr.hash() != recorded
        assert apply_overrides(h_detr, ["model.hybrid.repeats=2"]).hash() != h_detr.hash()
