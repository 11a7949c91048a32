"""Typed configuration: dataclasses, named presets and dotted overrides.

    cfg = get_preset("tiny")
    cfg = apply_overrides(cfg, ["model.num_queries=100", "optim.lr=1e-4"])

Every value lives in a typed field; overrides are parsed according to the field's type, and an unknown
key or an unparsable value raises `ConfigError` naming the key and listing what is valid.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from codetr.errors import ConfigError


BACKBONE_KINDS = ("resnet", "swin_t", "swin_s", "swin_b", "swin_l")


@dataclass
class BackboneConfig:
    kind: str = "resnet"  # "resnet" (torchvision, `depth`) or a Swin size as Co-DETR releases them (codetr/models/swin.py)
    depth: int = 50  # torchvision ResNet depth: 18, 34, 50, 101
    frozen_stages: int = 1  # ResNet: 0 nothing frozen; 1 stem + stage 1 frozen (the paper); up to 4. Swin: 0
    pretrained: str = ""  # path to a local torchvision ImageNet ResNet state-dict file; never downloaded


@dataclass
class TransformerConfig:
    d_model: int = 256
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_levels: int = 4  # feature levels fed to the transformer: 4 = strides 8..64 (C3..C5 + one extra), 5 = 4..64 (C2..)
    num_points: int = 4  # sampling points per head and level
    # The feature maps' 2-D sine encoding: Deformable-DETR uses temperature 10000 and offset -0.5, DINO and
    # Co-DINO temperature 20 and offset 0 (mmdet's SinePositionalEncoding default).
    pos_temperature: float = 10000.0
    pos_offset: float = -0.5
    # How the deformable attention is computed: "sparse" (one sparse matrix product, hand-written backward),
    # "grid_sample" (per-level grid_sample under autograd) or "auto" (sparse for large calls on the CPU, else
    # grid_sample; codetr/models/ms_deform_attn.py).
    # The numbers are the same (float round-off); it is not part of the config hash.
    attention_impl: str = "auto"


@dataclass
class LossConfig:
    """Weights of the one-to-one head's loss terms and of the Hungarian matcher's costs."""

    cls_weight: float = 2.0
    bbox_weight: float = 5.0  # L1 on normalised cxcywh
    giou_weight: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    match_cost_class: float = 2.0
    match_cost_bbox: float = 5.0
    match_cost_giou: float = 2.0
    # The classification loss of every query branch: "focal" (Deformable-DETR, DINO) or "qfl", the quality
    # focal loss whose positive target is the IoU of the predicted box with its ground truth (Co-DINO).
    cls_loss: str = "focal"
    qfl_beta: float = 2.0


@dataclass
class DenoisingConfig:
    """DINO's contrastive denoising (CDN) queries, training only. num_queries=0 turns them off."""

    num_queries: int = 100  # groups = num_queries // (most ground-truth boxes of an image in the batch)
    label_noise: float = 0.5  # a label is replaced by a random class with probability label_noise / 2
    box_noise: float = 1.0  # corners move by up to box_noise * (w, h) / 2: positives within, negatives beyond


# The heads codetr ships (codetr/models/co_detr/heads/AUX_HEADS, which also holds any head registered with
# register_aux_head: model.aux.heads takes every registered kind, see aux_head_kinds()).
AUX_HEAD_KINDS = ("atss", "faster_rcnn", "fcos", "retinanet", "gfl", "paa")


@dataclass
class AuxConfig:
    """Co-DETR's collaborative hybrid assignment. `heads=[]` is exactly the one-to-one baseline.

    Total loss, the paper's Eq. 6 (codetr/models/total_loss.py), with L decoder layers:
        L = sum_{l=1}^{L} ( L~dec_l + lambda1 * sum_i L^dec_{i,l} + lambda2 * L^enc )
    lambda1 weighs the customized positive queries (each head's branch, every decoder layer) and
    lambda2 the auxiliary heads' own losses L^enc = sum_i L^enc_i, which the sum over layers counts L
    times: their effective weight is L * lambda2 (6 x 2.0 = 12, as the released config's loss weights).
    """

    heads: list[str] = field(default_factory=list)  # registered head kinds (AUX_HEAD_KINDS), any order, repeats allowed
    lambda1: float = 1.0  # the positive-query branches' weight
    lambda2: float = 2.0  # the auxiliary heads' weight, counted once per decoder layer
    num_convs: int = 1  # stacked convs in one-stage heads (supplementary Table 1: 0..5)
    rcnn_fc_channels: int = 1024  # width of the Faster-RCNN RoI head's two shared FCs (released: 1024)
    min_queries: int = 9  # positive queries per image: clamp(max positives in the batch, min, max)
    max_queries: int = 300
    content_feature: bool = True  # add the projected feature at the positive location to the content query
    # (the released Co-DINO does not: its with_coord_feat=False)
    head_pos_embed: str = "scalar"  # per-head term on the positional query: "scalar" (released R50), "vector", "none"
    # FCOS: points in the batch padding are no samples (mmdet's FCOSHead counts them as negatives: false)
    fcos_ignore_padding: bool = True
    # The RoI head's level mapping: level 0 for sqrt(w * h) < 2 * finest_scale. 0 = the released value for
    # the finest level: 112 at stride 8 (Co-Deformable-DETR), 56 at stride 4 (Co-DINO).
    rcnn_finest_scale: float = 0.0


ARCHITECTURES = ("deformable_detr", "dino")

# How positives are added to the one-to-one detector in training (inference is always the one-to-one head):
#   deformable_detr  none: the one-to-one baseline alone (of model.architecture: Deformable-DETR or DINO)
#   co_detr          Co-DETR's collaborative auxiliary heads (model.aux, codetr/models/co_detr/)
#   auto             co_detr when model.aux.heads is set, else deformable_detr (every preset before the switch)
# and every query method of codetr/models/methods/ (QUERY_METHODS): h_detr (H-Deformable-DETR's hybrid matching,
# model.hybrid), group_detr (Group-DETR's query groups, model.group). `method_names()` lists them all.
BUILT_IN_METHODS = ("auto", "deformable_detr", "co_detr")


@dataclass
class HybridConfig:
    """H-Deformable-DETR's hybrid matching (Jia et al. 2023), model.method=h_detr: beside the one-to-one queries, a
    one-to-many set matched (Hungarian) against the ground truth repeated `repeats` times, self-attention masked
    between the two sets, trained on every decoder layer with weight `weight`; dropped at inference."""

    num_queries: int = 1500  # one-to-many queries (the paper: 1500 beside 300 one-to-one)
    repeats: int = 6  # k: copies of the ground truth the one-to-many queries are matched against
    weight: float = 1.0  # lambda_one2many on every decoder layer's one-to-many loss


@dataclass
class GroupConfig:
    """Group-DETR (Chen et al. 2023), model.method=group_detr: `num_groups` groups of model.num_queries queries,
    self-attention within a group only, Hungarian matching per group, the loss averaged over groups (the
    original's normaliser x G); inference with the first group."""

    num_groups: int = 3  # G (the Co-DETR paper's comparison: 3)


def resolved_method(model: "ModelConfig") -> str:
    """model.method with "auto" resolved: co_detr when auxiliary heads are set, else deformable_detr."""
    if model.method == "auto":
        return "co_detr" if model.aux.heads else "deformable_detr"
    return model.method


@dataclass
class ModelConfig:
    # "deformable_detr" (plain or ++, the switches below) or "dino" (DINO: denoising queries, query selection
    # by the best class score, the reference-point head; always two-stage with refinement)
    architecture: str = "deformable_detr"
    method: str = "auto"  # method_names(): deformable_detr (one-to-one only), h_detr, group_detr, co_detr, auto
    num_classes: int = 0  # 0: take the number of categories from the training dataset
    num_queries: int = 300
    # Deformable-DETR's own switches, independent of each other. Both off is the paper's "Deformable-DETR"
    # (learned queries and reference points); both on plus the next two is its "Deformable-DETR++".
    two_stage: bool = True  # queries from the encoder's top-scoring proposals
    with_box_refine: bool = True  # each decoder layer refines the previous layer's box (own branches per layer)
    mixed_selection: bool = True  # two-stage only: positional queries from the proposals, learned content queries
    look_forward_twice: bool = True  # box refine only: a layer's loss also reaches the previous layer's box
    num_detections: int = 100  # top-k kept at inference
    # Test-time NMS on the top-k: "none" (DETR) or "soft" (Co-DINO's released soft-NMS, linear, per class)
    test_nms: str = "none"
    test_nms_iou: float = 0.8
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)  # architecture "dino" only
    aux: AuxConfig = field(default_factory=AuxConfig)  # method co_detr
    hybrid: HybridConfig = field(default_factory=HybridConfig)  # method h_detr
    group: GroupConfig = field(default_factory=GroupConfig)  # method group_detr


@dataclass
class DataConfig:
    root: str = ""  # COCO 2017 layout folder; "" = the embedded generated dataset
    train_images: str = ""  # explicit image dir + annotation json, overriding `root`
    train_ann: str = ""
    val_images: str = ""
    val_ann: str = ""
    train_scales: tuple[int, ...] = tuple(range(480, 801, 32))
    max_size: int = 1333
    crop_scales: tuple[int, ...] = (400, 500, 600)
    crop_size: tuple[int, ...] = (384, 600)
    test_size: int = 800
    test_max_size: int = 1333
    augment: bool = True  # the paper's train augmentation; False: train images get the test resize only
    # Large-scale jitter (Co-DINO's LSJ configs): train images resized by a random factor in lsj_scale_range of a
    # lsj_size square, randomly cropped to it and padded to lsj_size x lsj_size; test images resized to fit
    # it and padded. The padding counts as image (mmdet's use_lsj): the masks mark none of it.
    lsj: bool = False
    lsj_size: int = 1024
    lsj_scale_range: tuple[float, ...] = (0.1, 2.0)
    invalid_boxes: str = "error"  # "error" or "drop" (mmdet's behaviour: skip them)
    batch_size: int = 2  # per process
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 1e-4
    lr_backbone_mult: float = 0.1
    lr_linear_proj_mult: float = 0.1  # sampling offsets and reference points
    clip_max_norm: float = 0.1
    epochs: int = 12
    lr_drop_epochs: tuple[int, ...] = (11,)  # lr x lr_drop_factor after these epochs
    lr_drop_factor: float = 0.1


@dataclass
class TrainConfig:
    seed: int = 42
    amp: bool = True  # used on CUDA only
    ema: bool = False
    ema_decay: float = 0.9998
    max_iters_per_epoch: int = 0  # 0: the whole dataset each epoch
    eval_every: int = 1  # evaluate every N epochs (0: only at the end)
    checkpoint_every: int = 0  # also save last.pt every N iterations (0: only at epoch ends)
    keep_epoch_checkpoints: bool = True
    # Recompute the backbone stages' and encoder layers' activations in backward instead of keeping them:
    # less memory, more time, the same numbers; not part of the config hash.
    activation_checkpointing: bool = False
    # On the CPU, glibc's malloc keeps freed memory for reuse instead of unmapping it (no page faults on every
    # step's large tensors: ~20% faster R50 steps, a few % more peak RSS; codetr/engine/memory.py). Not hashed.
    reuse_freed_memory: bool = True
    # Gradient accumulation: micro-batches of data.batch_size per optimizer step (effective batch = batch_size x
    # processes x accumulate_steps). An iteration (log record, max_iters_per_epoch, checkpoint_every) is one
    # optimizer step; epochs and the lr schedule are unchanged. Hashed unless 1 (older runs keep their hash).
    accumulate_steps: int = 1
    # TensorBoard event files of the log.jsonl scalars in RUN/tb/ (codetr/engine/tensorboard_log.py). Not hashed.
    tensorboard: bool = True


@dataclass
class Config:
    preset: str = "deformable_detr_r50_1x"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """A short stable hash of every value that matters (used to name and check runs). The method switch's
        settings count only where they are used (model.method unless "auto", model.hybrid for h_detr, model.group
        for group_detr), so every config from before the switch keeps its hash and its grid folders resume. The
        execution settings that do not change the numbers (model.transformer.attention_impl,
        train.activation_checkpointing, train.reuse_freed_memory, train.tensorboard) are left out, and
        train.accumulate_steps counts only when it is not 1 (so runs from before it keep their hash)."""
        values = self.to_dict()
        model = values["model"]
        method = resolved_method(self.model)
        if model["method"] == "auto":
            del model["method"]
        del model["transformer"]["attention_impl"]  # how the numbers are computed, not what they are
        del values["train"]["activation_checkpointing"]
        del values["train"]["reuse_freed_memory"]
        del values["train"]["tensorboard"]
        if self.train.accumulate_steps == 1:
            del values["train"]["accumulate_steps"]
        for section, user in (("hybrid", "h_detr"), ("group", "group_detr")):
            if method != user:
                del model[section]
        blob = json.dumps(values, sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:12]



def __getattr__(name: str) -> Any:
    """`codetr.config.PRESETS`: the presets live in codetr/presets.py (which imports this module)."""
    if name == "PRESETS":
        from codetr.presets import PRESETS

        return PRESETS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Removed config keys: one line saying what changed (a stored or given value is never reinterpreted).
REMOVED_KEYS: dict[str, str] = {
    "model.aux.weighting": (
        "was removed: lambda1 now weighs the positive queries and lambda2 the auxiliary heads (counted once per "
        "decoder layer), as the paper's Eq. 6 and the released config; weighting=released is that meaning, and the "
        "old weighting=paper values (a, b) are lambda1=b, lambda2=a/num_decoder_layers"
    ),
}


def scaled_lr_drops(preset: str, epochs: int) -> tuple[int, ...]:
    """The preset's lr drops kept at the same fraction of an `epochs`-long schedule (rounded down, at
    least 1): the 1x recipe's 12 epochs dropping after 11 become 36 dropping after 33."""
    recipe = get_preset(preset).optim
    return tuple(sorted({max(1, drop * epochs // recipe.epochs) for drop in recipe.lr_drop_epochs}))


def epochs_overrides(preset: str, epochs: int) -> list[str]:
    """`optim.epochs=N` and the lr drops of `scaled_lr_drops`. An `optim.lr_drop_epochs=...` override given
    after these pins the drops instead."""
    drops = scaled_lr_drops(preset, epochs)
    return [f"optim.epochs={epochs}", "optim.lr_drop_epochs=[" + ",".join(map(str, drops)) + "]"]


def get_preset(name: str) -> Config:
    from codetr.presets import PRESETS

    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# Dotted overrides
# ----------------------------------------------------------------------------------------------


def valid_keys(obj: Any, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a config dataclass, e.g. ['model.num_queries', ...]."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys.extend(valid_keys(value, prefix + f.name + "."))
        else:
            keys.append(prefix + f.name)
    return keys


def _parse_scalar(text: str, kind: type, key: str) -> Any:
    text = text.strip()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={text!r}: expected a boolean (true/false)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}={text!r}: expected a number") from None
    if kind is str:
        return text
    raise ConfigError(f"{key}: fields of type {kind} cannot be set from the command line")


def parse_value(text: str, annotation: Any, key: str) -> Any:
    """Parse `text` into a value of the field type `annotation` (scalars, tuples and lists; for an
    optional type `X | None`, "none" is None)."""
    members = typing.get_args(annotation)
    if type(None) in members:
        (inner,) = [m for m in members if m is not type(None)]
        return None if text.strip().lower() == "none" else parse_value(text, inner, key)
    origin = typing.get_origin(annotation)
    if origin in (tuple, list):
        (item_type, *_) = typing.get_args(annotation)
        body = text.strip()
        if body.startswith("[") and body.endswith("]") or body.startswith("(") and body.endswith(")"):
            body = body[1:-1]
        items = [_parse_scalar(part, item_type, key) for part in body.split(",") if part.strip()]
        return tuple(items) if origin is tuple else items
    return _parse_scalar(text, annotation, key)


def set_value(cfg: Config, key: str, value_text: str) -> None:
    """Set one dotted key on `cfg` in place, parsing the text by the field's type."""
    if key in REMOVED_KEYS:
        raise ConfigError(f"{key} {REMOVED_KEYS[key]}")
    parts = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            section = ".".join(parts[:depth])
            options = valid_keys(node, section + "." if section else "") if dataclasses.is_dataclass(node) else []
            raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(options)}")
        if depth == len(parts) - 1:
            hints = typing.get_type_hints(type(node))
            if dataclasses.is_dataclass(getattr(node, part)):
                raise ConfigError(f"{key!r} is a section; set one of: {', '.join(valid_keys(getattr(node, part), key + '.'))}")
            setattr(node, part, parse_value(value_text, hints[part], key))
        else:
            node = getattr(node, part)


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return a copy of `cfg` with `key=value` overrides applied, e.g. ['model.num_queries=100']."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. model.num_queries=100")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Range checks that a type alone cannot express."""
    t = cfg.model.transformer
    checks = [
        (cfg.model.backbone.kind in BACKBONE_KINDS, "model.backbone.kind", " or ".join(BACKBONE_KINDS)),
        (cfg.model.backbone.kind == "resnet" or cfg.model.backbone.frozen_stages == 0, "model.backbone.frozen_stages",
         "0 with a Swin backbone (Co-DETR trains all of it)"),
        (cfg.model.backbone.kind == "resnet" or not cfg.model.backbone.pretrained, "model.backbone.pretrained",
         "empty with a Swin backbone (ImageNet files are read for ResNets; Swin weights come with a converted "
         "Co-DETR checkpoint)"),
        (cfg.model.backbone.depth in (18, 34, 50, 101, 152), "model.backbone.depth", "one of 18, 34, 50, 101, 152"),
        (0 <= cfg.model.backbone.frozen_stages <= 4, "model.backbone.frozen_stages", "0..4"),
        (t.num_heads > 0, "model.transformer.num_heads", "> 0"),
        (t.num_heads <= 0 or t.d_model % t.num_heads == 0, "model.transformer.d_model",
         f"a multiple of num_heads={t.num_heads}"),
        (t.d_model > 0 and t.ffn_dim > 0 and t.num_points > 0, "model.transformer",
         "d_model, ffn_dim and num_points > 0"),
        (t.num_encoder_layers >= 0 and t.num_decoder_layers > 0, "model.transformer.num_decoder_layers",
         "> 0 (and num_encoder_layers >= 0)"),
        (cfg.model.num_classes >= 0, "model.num_classes", ">= 0 (0: the training set's categories)"),
        (cfg.data.num_workers >= 0, "data.num_workers", ">= 0"),
        (cfg.data.test_size > 0 and cfg.data.test_max_size > 0, "data.test_size", "> 0 (and data.test_max_size > 0)"),
        (t.num_levels in (4, 5), "model.transformer.num_levels", "4 (strides 8..64) or 5 (strides 4..64)"),
        (t.attention_impl in attention_impls(), "model.transformer.attention_impl", " or ".join(attention_impls())),
        (cfg.model.architecture in ARCHITECTURES, "model.architecture", " or ".join(ARCHITECTURES)),
        (cfg.model.architecture != "dino" or (cfg.model.two_stage and cfg.model.with_box_refine),
         "model.architecture", "deformable_detr when two_stage or with_box_refine is off (DINO has both)"),
        (cfg.model.loss.cls_loss in ("focal", "qfl"), "model.loss.cls_loss", "'focal' or 'qfl'"),
        (cfg.model.test_nms in ("none", "soft"), "model.test_nms", "'none' or 'soft'"),
        (0 < cfg.model.test_nms_iou <= 1, "model.test_nms_iou", "in (0, 1]"),
        (cfg.model.denoising.num_queries >= 0, "model.denoising.num_queries", ">= 0"),
        (0 < cfg.model.denoising.label_noise <= 1, "model.denoising.label_noise", "in (0, 1]"),
        (cfg.model.denoising.box_noise > 0, "model.denoising.box_noise", "> 0"),
        (cfg.model.aux.rcnn_finest_scale >= 0, "model.aux.rcnn_finest_scale", ">= 0 (0: the released value)"),
        (cfg.model.num_queries > 0, "model.num_queries", "> 0"),
        (0 < cfg.model.num_detections, "model.num_detections", "> 0"),
        (cfg.data.invalid_boxes in ("error", "drop"), "data.invalid_boxes", "'error' or 'drop'"),
        (len(cfg.data.crop_size) == 2, "data.crop_size", "two integers MIN,MAX"),
        (cfg.data.lsj_size > 0, "data.lsj_size", "> 0"),
        (len(cfg.data.lsj_scale_range) == 2 and 0 < cfg.data.lsj_scale_range[0] <= cfg.data.lsj_scale_range[1],
         "data.lsj_scale_range", "two numbers 0 < MIN <= MAX"),
        (cfg.data.batch_size > 0, "data.batch_size", "> 0"),
        (math.isfinite(cfg.optim.lr) and cfg.optim.lr > 0, "optim.lr", "a finite number > 0"),
        *((not (isinstance(value, float) and math.isnan(value)), key, "a number, not NaN")
          for key, value in _leaves(cfg.to_dict())),
        (cfg.optim.epochs > 0, "optim.epochs", "> 0"),
        (cfg.train.accumulate_steps >= 1, "train.accumulate_steps", ">= 1 (micro-batches per optimizer step)"),
        (all(h in aux_head_kinds() for h in cfg.model.aux.heads), "model.aux.heads",
         f"a list of {', '.join(aux_head_kinds())}"),
        *method_checks(cfg.model),
        (cfg.model.two_stage or not cfg.model.mixed_selection, "model.mixed_selection", "false without two_stage"),
        (cfg.model.with_box_refine or not cfg.model.look_forward_twice, "model.look_forward_twice",
         "false without with_box_refine"),
        (0 <= cfg.model.aux.num_convs <= 5, "model.aux.num_convs", "0..5"),
        (cfg.model.aux.rcnn_fc_channels > 0, "model.aux.rcnn_fc_channels", "> 0"),
        (1 <= cfg.model.aux.min_queries <= cfg.model.aux.max_queries, "model.aux.min_queries", "1 <= min_queries <= max_queries"),
        (cfg.model.aux.head_pos_embed in ("scalar", "vector", "none"), "model.aux.head_pos_embed", "scalar, vector or none"),
        *((_finite_at_least(_lookup(cfg, key), 0), key, "a finite number >= 0") for key in NON_NEGATIVE_KEYS),
        (_finite_at_least(cfg.optim.lr_drop_factor, 0) and cfg.optim.lr_drop_factor > 0, "optim.lr_drop_factor",
         "a finite number > 0 (the lr is multiplied by it at each drop)"),
        (all(epoch > 0 for epoch in cfg.optim.lr_drop_epochs), "optim.lr_drop_epochs", "epochs > 0"),
        (0 <= cfg.model.loss.focal_alpha <= 1, "model.loss.focal_alpha", "in [0, 1]"),
        (0 <= t.dropout < 1, "model.transformer.dropout", "a probability in [0, 1)"),
        (0 <= cfg.train.ema_decay < 1, "train.ema_decay", "in [0, 1)"),
        (0 <= cfg.train.seed < 2**63, "train.seed", "an integer in [0, 2^63)"),
        (math.isfinite(cfg.model.denoising.box_noise), "model.denoising.box_noise", "a finite number > 0"),
        (len(cfg.data.train_scales) > 0 and min(cfg.data.train_scales, default=0) > 0, "data.train_scales",
         "a non-empty list of short sides > 0"),
        (len(cfg.data.crop_scales) > 0 and min(cfg.data.crop_scales, default=0) > 0, "data.crop_scales",
         "a non-empty list of short sides > 0"),
        (cfg.data.max_size > 0, "data.max_size", "> 0"),
        (len(cfg.data.crop_size) != 2 or 0 < cfg.data.crop_size[0] <= cfg.data.crop_size[1], "data.crop_size",
         "two integers 0 < MIN <= MAX"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise ConfigError(f"{key}={_lookup(cfg, key)!r}: expected {expected}")


# Weights, multipliers, counts and periods that make no sense below zero (0 switches most of them off).
NON_NEGATIVE_KEYS = (
    "optim.weight_decay", "optim.lr_backbone_mult", "optim.lr_linear_proj_mult", "optim.clip_max_norm",
    "model.loss.cls_weight", "model.loss.bbox_weight", "model.loss.giou_weight", "model.loss.focal_gamma",
    "model.loss.match_cost_class", "model.loss.match_cost_bbox", "model.loss.match_cost_giou", "model.loss.qfl_beta",
    "model.aux.lambda1", "model.aux.lambda2", "model.hybrid.weight", "train.max_iters_per_epoch",
    "train.eval_every", "train.checkpoint_every",
)


def _finite_at_least(value: Any, lowest: float) -> bool:
    return math.isfinite(value) and value >= lowest


def _leaves(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict."""
    leaves = []
    for key, value in values.items():
        if isinstance(value, dict):
            leaves += _leaves(value, f"{prefix}{key}.")
        else:
            leaves.append((f"{prefix}{key}", value))
    return leaves


def attention_impls() -> tuple[str, ...]:
    """The deformable attention implementations (codetr.models.ms_deform_attn.ATTENTION_IMPLS)."""
    from codetr.models.ms_deform_attn import ATTENTION_IMPLS

    return ATTENTION_IMPLS


def aux_head_kinds() -> tuple[str, ...]:
    """The registered auxiliary head kinds (codetr.models.co_detr.heads.AUX_HEADS)."""
    from codetr.models.co_detr.heads import AUX_HEADS

    return tuple(AUX_HEADS)


def method_names() -> tuple[str, ...]:
    """Every valid model.method: the built-in ones and the query methods (codetr.models.methods.QUERY_METHODS)."""
    from codetr.models.methods import QUERY_METHODS

    auto, baseline, collaborative = BUILT_IN_METHODS  # listed in the paper's comparison order, Co-DETR last
    return (auto, baseline, *QUERY_METHODS, collaborative)


def method_checks(model: ModelConfig) -> list[tuple[bool, str, str]]:
    """The method switch's consistency with the auxiliary heads and the architecture, and its own ranges."""
    from codetr.models.methods import QUERY_METHODS

    method = resolved_method(model)
    query_method = QUERY_METHODS.get(method)
    return [
        (model.method in method_names(), "model.method", " or ".join(method_names())),
        (method != "co_detr" or bool(model.aux.heads), "model.aux.heads",
         "at least one head with model.method=co_detr, e.g. [atss]"),
        (method == "co_detr" or not model.aux.heads, "model.aux.heads",
         f"[] with model.method={method} (auxiliary heads are Co-DETR's: set model.method=co_detr)"),
        (query_method is None or model.architecture in query_method.architectures, "model.method",
         f"deformable_detr or co_detr with model.architecture={model.architecture} ({method} is built on "
         f"{' or '.join(query_method.architectures) if query_method else ''})"),
        (method != "group_detr" or not model.two_stage or model.mixed_selection, "model.mixed_selection",
         "true with model.method=group_detr on a two-stage model (without it the groups start as identical copies)"),
        (model.hybrid.num_queries >= 0, "model.hybrid.num_queries", ">= 0"),
        (model.hybrid.repeats >= 1, "model.hybrid.repeats", ">= 1"),
        (model.hybrid.weight >= 0, "model.hybrid.weight", ">= 0"),
        (model.group.num_groups >= 1, "model.group.num_groups", ">= 1"),
    ]


def _lookup(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. stored in a checkpoint), migrating what an
    older codetr wrote (see `migrate_config_dict`)."""

    def build(cls: type, values: dict[str, Any]) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                value = build(hint, value)
            elif typing.get_origin(hint) is tuple:
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    return build(Config, migrate_config_dict(data))


def migrate_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config of an older codetr in today's terms, with the same meaning (a copy).

    - `model.aux.weighting` (removed): "released" meant what lambda1 / lambda2 mean now (Eq. 6);
      "paper" applied lambda1 to the auxiliary heads and lambda2 to the positive queries, so those
      values become lambda1 = old lambda2 and lambda2 = old lambda1 / num_decoder_layers: the same loss.
    - configs from before `two_stage` / `with_box_refine` existed were two-stage with box refinement.
    """
    data = copy.deepcopy(data)
    model = data.get("model", {})
    aux = model.get("aux", {})
    weighting = aux.pop("weighting", None)
    if weighting == "paper":
        layers = model.get("transformer", {}).get("num_decoder_layers", TransformerConfig.num_decoder_layers)
        old = (aux.get("lambda1", 1.0), aux.get("lambda2", 2.0))
        aux["lambda1"], aux["lambda2"] = old[1], old[0] / layers
        warnings.warn(f"a stored config of an older codetr (model.aux.weighting=paper, lambda1={old[0]:g}, "
                      f"lambda2={old[1]:g}) is read as lambda1={aux['lambda1']:g}, lambda2={aux['lambda2']:g}: the "
                      "same loss under the paper's Eq. 6 names", stacklevel=2)
    elif weighting not in (None, "released"):
        raise ConfigError(f"model.aux.weighting={weighting!r} in a stored config: expected 'paper' or 'released'")
    if model:
        model.setdefault("two_stage", True)
        model.setdefault("with_box_refine", True)
    return data
