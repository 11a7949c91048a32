"""mmdetection 3.x Deformable-DETR checkpoints -> codetr's detector.

`convert(state_dict)` takes the flat `state_dict` of an mmdet 3.x `DeformableDETR` (the model zoo's
`.pth` files hold it under "state_dict", next to "meta"; the caller extracts it) in any of its three
variants: plain, box refine, box refine + two-stage. The architecture is read off the keys and shapes:

    what                        read from
    backbone depth              blocks per `backbone.layer{1..4}` and whether blocks have a `conv3`
    d_model, feature levels     `level_embed` [L, C]
    encoder / decoder layers    `encoder.layers.{i}` / `decoder.layers.{i}`; FFN width from `ffn.layers.0.0`
    points per head and level   `attention_weights` rows / (num_heads * L)
    classes                     `bbox_head.cls_branches.0` rows
    two-stage                   `memory_trans_fc` / `pos_trans_fc` present (plain: `query_embedding` and
                                `reference_points_fc`)
    box refine                  the prediction branches differ; without refine mmdet lists ONE shared
                                module once per layer, so every copy in the state dict is equal
    queries                     plain: `query_embedding` rows

Two things the weights do not record are keyword arguments with mmdet's config values: `num_heads`
(8 in every config) and, for two-stage, `num_queries` (300). mmdet's two-stage model has neither mixed
query selection nor look-forward-twice, so both are off in the returned config; the FFN dropout of
mmdet's training config (0.1) is a training choice and stays codetr's default (0).

Names (mmdet -> codetr); every tensor keeps its layout:

    backbone.conv1 / bn1 / layer{s}.*                 backbone.stem.0 / stem.1 / stages.{s-1}.*
    neck.convs.{i}.conv / gn                          neck.lateral.{i}.0 / .1
    neck.extra_convs.0.conv / gn                      neck.extra.0 / .1
    level_embed                                       transformer.level_embed
    encoder.layers.{i}.self_attn.*                    transformer.encoder_layers.{i}.self_attn.*
    {en,de}coder.layers.{i}.ffn.layers.0.0 / .1       ....ffn.0 / ffn.2
    encoder.layers.{i}.norms.{0,1}                    transformer.encoder_layers.{i}.norm{1,2}
    decoder.layers.{i}.self_attn.attn.*               transformer.decoder.layers.{i}.self_attn.*
    decoder.layers.{i}.cross_attn.*                   transformer.decoder.layers.{i}.cross_attn.*
    decoder.layers.{i}.norms.{0,1,2}                  transformer.decoder.layers.{i}.norm{1,2,3}
    memory_trans_fc / memory_trans_norm               transformer.enc_output / enc_output_norm
    pos_trans_fc / pos_trans_norm                     transformer.pos_trans / pos_trans_norm
    query_embedding / reference_points_fc             transformer.query_embed / reference_points
    bbox_head.cls_branches.{l} (l < L decoder layers) transformer.decoder.class_branches.{l}
    bbox_head.reg_branches.{l}.{0,2,4} (l < L)        transformer.decoder.box_branches.{l}.{0,2,4}
    bbox_head.{cls,reg}_branches.{L} (two-stage)      transformer.enc_class_branch / enc_box_branch

BatchNorm's `num_batches_tracked` counters have no counterpart (codetr's BatchNorm is frozen) and are
reported in `skipped`.
"""
from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor

from codetr.config import BackboneConfig, ModelConfig, TransformerConfig
from codetr.convert.common import Conversion, ConversionError

MMDET_NUM_HEADS = 8  # every mmdet Deformable-DETR config; not recorded in the weights
MMDET_TWO_STAGE_QUERIES = 300  # two-stage configs' num_queries; the weights hold no per-query tensor

# Blocks per stage -> depth, for basic blocks (no conv3) and bottlenecks.
_RESNET_DEPTHS = {(False, (2, 2, 2, 2)): 18, (False, (3, 4, 6, 3)): 34, (True, (3, 4, 6, 3)): 50,
                  (True, (3, 4, 23, 3)): 101, (True, (3, 8, 36, 3)): 152}


def convert(state_dict: dict[str, Tensor], *, num_heads: int = MMDET_NUM_HEADS,
            num_queries: int | None = None) -> Conversion:
    """An mmdet 3.x DeformableDETR state dict -> codetr's config and state dict.

    num_queries: two-stage only (default 300, mmdet's); a plain model's count comes from its
    `query_embedding` and an explicit different value is an error. Raises ConversionError when the
    dict is not such a checkpoint, when a key has no codetr counterpart, when a codetr parameter has no
    source, or when a shape differs (both shapes named).
    """
    _check_tensors(state_dict)
    model_cfg, num_classes = read_architecture(state_dict, num_heads=num_heads, num_queries=num_queries)
    num_decoder_layers = model_cfg.transformer.num_decoder_layers
    renamed: dict[str, Tensor] = {}
    skipped: list[str] = []
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        if key.startswith("backbone.") and key.endswith(".num_batches_tracked"):
            skipped.append(key)
            continue
        target = codetr_name(key, num_decoder_layers)
        if target is None:
            unmapped.append(key)
        else:
            renamed[target] = tensor
    _check_against_model(renamed, unmapped, model_cfg, num_classes)
    return Conversion(model=model_cfg, state_dict=renamed, num_classes=num_classes, skipped=skipped)


# ----------------------------------------------------------------------------------------------
# Architecture
# ----------------------------------------------------------------------------------------------


def read_architecture(state_dict: dict[str, Tensor], *, num_heads: int = MMDET_NUM_HEADS,
                      num_queries: int | None = None) -> tuple[ModelConfig, int]:
    """(codetr ModelConfig, number of classes) read off an mmdet 3.x DeformableDETR state dict."""
    _require(state_dict, "level_embed")
    num_levels, d_model = state_dict["level_embed"].shape
    if num_levels != 4:
        raise ConversionError(f"level_embed has {num_levels} feature levels; codetr's detector uses 4 (strides 8..64)")
    num_encoder_layers = _count(state_dict, r"encoder\.layers\.(\d+)\.")
    num_decoder_layers = _count(state_dict, r"decoder\.layers\.(\d+)\.")
    if num_encoder_layers == 0 or num_decoder_layers == 0:
        raise ConversionError(f"found {num_encoder_layers} encoder.layers.* and {num_decoder_layers} "
                              "decoder.layers.* entries; expected at least one of each")
    key = "encoder.layers.0.ffn.layers.0.0.weight"
    _require(state_dict, key)
    ffn_dim = state_dict[key].shape[0]
    num_points = _points_per_head_and_level(state_dict, num_heads, num_levels)

    two_stage = "memory_trans_fc.weight" in state_dict
    num_branches = num_decoder_layers + (1 if two_stage else 0)
    for branches in ("bbox_head.cls_branches", "bbox_head.reg_branches"):
        found = _count(state_dict, re.escape(branches) + r"\.(\d+)\.")
        if found != num_branches:
            variant = "two-stage" if two_stage else "single-stage"
            raise ConversionError(f"{branches}: found {found} entries; a {variant} model with {num_decoder_layers} "
                                  f"decoder layers has {num_branches}")
    with_box_refine = _branches_differ(state_dict, num_branches)
    _require(state_dict, "bbox_head.cls_branches.0.weight")
    num_classes = state_dict["bbox_head.cls_branches.0.weight"].shape[0]

    if two_stage:
        queries = MMDET_TWO_STAGE_QUERIES if num_queries is None else num_queries
    else:
        _require(state_dict, "query_embedding.weight")
        queries = state_dict["query_embedding.weight"].shape[0]
        if num_queries is not None and num_queries != queries:
            raise ConversionError(f"num_queries={num_queries}, but query_embedding.weight holds {queries} queries")

    model_cfg = ModelConfig(
        num_classes=num_classes,
        num_queries=queries,
        two_stage=two_stage,
        with_box_refine=with_box_refine,
        mixed_selection=False,  # mmdet's two-stage: content queries come from the proposals too
        look_forward_twice=False,
        backbone=BackboneConfig(depth=_resnet_depth(state_dict)),
        transformer=TransformerConfig(
            d_model=d_model, num_heads=num_heads, num_encoder_layers=num_encoder_layers,
            num_decoder_layers=num_decoder_layers, ffn_dim=ffn_dim, dropout=0.0, num_levels=num_levels,
            num_points=num_points,
        ),
    )
    return model_cfg, num_classes


def _resnet_depth(state_dict: dict[str, Tensor]) -> int:
    blocks = tuple(_count(state_dict, rf"backbone\.layer{stage}\.(\d+)\.") for stage in (1, 2, 3, 4))
    bottleneck = "backbone.layer1.0.conv3.weight" in state_dict
    depth = _RESNET_DEPTHS.get((bottleneck, blocks))
    if depth is None:
        kind = "bottleneck" if bottleneck else "basic"
        raise ConversionError(f"backbone.layer1..4 hold {list(blocks)} {kind} blocks: not a ResNet-18/34/50/101/152")
    return depth


def _points_per_head_and_level(state_dict: dict[str, Tensor], num_heads: int, num_levels: int) -> int:
    key = "encoder.layers.0.self_attn.attention_weights.weight"
    _require(state_dict, key)
    rows = state_dict[key].shape[0]  # num_heads * num_levels * num_points
    if rows % (num_heads * num_levels):
        raise ConversionError(f"{key} has {rows} rows, not a multiple of num_heads * levels = "
                              f"{num_heads} * {num_levels}; pass the model's num_heads")
    return rows // (num_heads * num_levels)


def _branches_differ(state_dict: dict[str, Tensor], num_branches: int) -> bool:
    """True when the prediction branches are independent (box refine), False when every copy equals the
    first (mmdet lists one shared module once per layer). One branch: no refinement to tell."""

    def all_equal(prefix: str) -> bool:
        first = {k[len(prefix) + 3:]: v for k, v in state_dict.items() if k.startswith(f"{prefix}.0.")}
        copies = ((v, state_dict.get(f"{prefix}.{i}.{name}"))
                  for i in range(1, num_branches) for name, v in first.items())
        return all(other is None or torch.equal(v, other) for v, other in copies)  # a missing copy is reported later

    cls_shared, reg_shared = all_equal("bbox_head.cls_branches"), all_equal("bbox_head.reg_branches")
    if cls_shared != reg_shared:
        raise ConversionError(
            f"bbox_head.cls_branches are {'equal' if cls_shared else 'distinct'} but bbox_head.reg_branches "
            f"are {'equal' if reg_shared else 'distinct'}: mmdet shares both (plain) or neither (box refine)"
        )
    return not cls_shared


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------


def _layer_rules(prefix: str, target: str, norms: int) -> list[tuple[str, Callable[[re.Match], str]]]:
    """Rules shared by encoder and decoder layers: FFN and LayerNorms (`norms` of them)."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (rf"{prefix}\.layers\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", lambda m: f"{target}.{m[1]}.ffn.0.{m[2]}"),
        (rf"{prefix}\.layers\.(\d+)\.ffn\.layers\.1\.(weight|bias)", lambda m: f"{target}.{m[1]}.ffn.2.{m[2]}"),
    ]
    norm_index = "|".join(str(i) for i in range(norms))
    rules.append((rf"{prefix}\.layers\.(\d+)\.norms\.({norm_index})\.(weight|bias)",
                  lambda m: f"{target}.{m[1]}.norm{int(m[2]) + 1}.{m[3]}"))
    return rules


_MSDA = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_RULES: list[tuple[str, Callable[[re.Match], str]]] = [
    (r"backbone\.conv1\.weight", lambda m: "backbone.stem.0.weight"),
    (r"backbone\.bn1\.(weight|bias|running_mean|running_var)", lambda m: f"backbone.stem.1.{m[1]}"),
    (r"backbone\.layer([1-4])\.(.+)", lambda m: f"backbone.stages.{int(m[1]) - 1}.{m[2]}"),
    (r"neck\.convs\.(\d+)\.conv\.weight", lambda m: f"neck.lateral.{m[1]}.0.weight"),
    (r"neck\.convs\.(\d+)\.gn\.(weight|bias)", lambda m: f"neck.lateral.{m[1]}.1.{m[2]}"),
    (r"neck\.extra_convs\.0\.conv\.weight", lambda m: "neck.extra.0.weight"),
    (r"neck\.extra_convs\.0\.gn\.(weight|bias)", lambda m: f"neck.extra.1.{m[1]}"),
    (r"level_embed", lambda m: "transformer.level_embed"),
    (rf"encoder\.layers\.(\d+)\.self_attn\.{_MSDA}",
     lambda m: f"transformer.encoder_layers.{m[1]}.self_attn.{m[2]}.{m[3]}"),
    *_layer_rules("encoder", "transformer.encoder_layers", norms=2),
    (r"decoder\.layers\.(\d+)\.self_attn\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     lambda m: f"transformer.decoder.layers.{m[1]}.self_attn.{m[2]}"),
    (rf"decoder\.layers\.(\d+)\.cross_attn\.{_MSDA}",
     lambda m: f"transformer.decoder.layers.{m[1]}.cross_attn.{m[2]}.{m[3]}"),
    *_layer_rules("decoder", "transformer.decoder.layers", norms=3),
    (r"memory_trans_fc\.(weight|bias)", lambda m: f"transformer.enc_output.{m[1]}"),
    (r"memory_trans_norm\.(weight|bias)", lambda m: f"transformer.enc_output_norm.{m[1]}"),
    (r"pos_trans_fc\.(weight|bias)", lambda m: f"transformer.pos_trans.{m[1]}"),
    (r"pos_trans_norm\.(weight|bias)", lambda m: f"transformer.pos_trans_norm.{m[1]}"),
    (r"query_embedding\.weight", lambda m: "transformer.query_embed.weight"),
    (r"reference_points_fc\.(weight|bias)", lambda m: f"transformer.reference_points.{m[1]}"),
]


def codetr_name(key: str, num_decoder_layers: int) -> str | None:
    """codetr's name for an mmdet 3.x DeformableDETR key, or None when no rule covers it."""
    match = re.fullmatch(r"bbox_head\.cls_branches\.(\d+)\.(weight|bias)", key)
    if match:
        layer = int(match[1])
        if layer == num_decoder_layers:  # the extra, last branch scores the encoder proposals (two-stage)
            return f"transformer.enc_class_branch.{match[2]}"
        return f"transformer.decoder.class_branches.{layer}.{match[2]}"
    match = re.fullmatch(r"bbox_head\.reg_branches\.(\d+)\.([024])\.(weight|bias)", key)
    if match:
        layer = int(match[1])
        if layer == num_decoder_layers:
            return f"transformer.enc_box_branch.{match[2]}.{match[3]}"
        return f"transformer.decoder.box_branches.{layer}.{match[2]}.{match[3]}"
    for pattern, target in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return target(match)
    return None


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_against_model(renamed: dict[str, Tensor], unmapped: list[str], model_cfg: ModelConfig,
                         num_classes: int) -> None:
    """Every codetr parameter and buffer has a source of the right shape, and no source key is left over."""
    from codetr.models.detector import build_detector  # the models import the config, not the converter

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {k: tuple(v.shape) for k, v in build_detector(model_cfg, num_classes).state_dict().items()}
    missing = sorted(set(expected) - set(renamed))
    extra = sorted(set(renamed) - set(expected))
    mismatched = [f"{k}: mmdet {tuple(renamed[k].shape)} vs codetr {expected[k]}"
                  for k in sorted(set(expected) & set(renamed)) if tuple(renamed[k].shape) != expected[k]]
    problems = []
    if unmapped:
        problems.append(f"{len(unmapped)} keys with no codetr counterpart: {_preview(sorted(unmapped))}")
    if extra:
        problems.append(f"{len(extra)} renamed keys the detector does not have: {_preview(extra)}")
    if missing:
        problems.append(f"{len(missing)} codetr keys with no source: {_preview(missing)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_preview(mismatched)}")
    if problems:
        raise ConversionError("mmdet3 Deformable-DETR checkpoint does not fit the architecture read off it: "
                              + "; ".join(problems))


def _preview(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _check_tensors(state_dict: dict[str, Tensor]) -> None:
    if "state_dict" in state_dict or "meta" in state_dict:
        raise ConversionError("got a whole mmdet checkpoint (keys 'state_dict'/'meta'); pass checkpoint['state_dict']")
    bad = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(f"state dict values must be tensors; not a tensor: {_preview(bad)}")
    if any(k.startswith("bbox_head.transformer.") for k in state_dict):
        raise ConversionError("keys 'bbox_head.transformer.*' are mmdet 2.x naming; this converter reads mmdet 3.x")


def _require(state_dict: dict[str, Tensor], key: str) -> None:
    if key not in state_dict:
        raise ConversionError(f"no key {key!r}: not an mmdetection 3.x Deformable-DETR state dict")


def _count(state_dict: dict[str, Tensor], pattern: str) -> int:
    """1 + the largest index captured by `pattern` at the start of a key (0 when none matches)."""
    regex = re.compile(pattern)
    indices = [int(m[1]) for m in map(regex.match, state_dict) if m]
    return max(indices) + 1 if indices else 0
