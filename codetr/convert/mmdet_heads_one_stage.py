"""mmdetection's one-stage head parameters -> codetr's auxiliary heads (ATSS, FCOS, RetinaNet).

One pure function, `convert_one_stage_head(kind, state_dict)`, keyed by codetr's head kind. The input
is one head's state dict with its prefix stripped (e.g. the keys under `bbox_head.0.` of a Sense-X
Co-DETR checkpoint, or an mmdet 3.x `ATSSHead().state_dict()`); the names are the same in mmdet 2.x
and 3.x:

    mmdet                               codetr
    {cls,reg}_convs.i.conv.weight       {cls,reg}_tower.(3 i).weight     (3x3 conv, no bias)
    {cls,reg}_convs.i.gn.{weight,bias}  {cls,reg}_tower.(3 i + 1).*      (GroupNorm; 3 i + 2 is the ReLU)
    atss_cls / atss_reg / atss_centerness   cls_pred / reg_pred / centerness_pred, scales.l -> level_scales.l
    conv_cls / conv_reg / conv_centerness   cls_logits / bbox_pred / centerness  (FCOS), scales.l -> scales.l
    retina_cls / retina_reg                 cls_pred / reg_pred

Layouts are identical (same conv shapes, same channel order a * K + k of the anchor heads), so every
tensor is carried unchanged. Strict: a key with no rule (e.g. the tower-conv bias of mmdet's FCOS
`conv_bias=True` config, which codetr's towers do not have) or a tower layer missing one of its
parts raises ConversionError listing every such key.
"""
from __future__ import annotations

import re

from torch import Tensor

from codetr.convert.common import ConversionError

# Per kind: (mmdet name pattern, codetr name template); `{i}` is the first group, `{part}` the last.
_PREDICTORS: dict[str, list[tuple[str, str]]] = {
    "atss": [
        (r"atss_cls\.(weight|bias)", "cls_pred.{part}"),
        (r"atss_reg\.(weight|bias)", "reg_pred.{part}"),
        (r"atss_centerness\.(weight|bias)", "centerness_pred.{part}"),
        (r"scales\.(\d+)\.(scale)", "level_scales.{i}.{part}"),
    ],
    "fcos": [
        (r"conv_cls\.(weight|bias)", "cls_logits.{part}"),
        (r"conv_reg\.(weight|bias)", "bbox_pred.{part}"),
        (r"conv_centerness\.(weight|bias)", "centerness.{part}"),
        (r"scales\.(\d+)\.(scale)", "scales.{i}.{part}"),
    ],
    "retinanet": [
        (r"retina_cls\.(weight|bias)", "cls_pred.{part}"),
        (r"retina_reg\.(weight|bias)", "reg_pred.{part}"),
    ],
}
KINDS = tuple(_PREDICTORS)

_TOWER = re.compile(r"(cls|reg)_convs\.(\d+)\.(conv\.weight|gn\.weight|gn\.bias)")
# Offset of each part inside codetr's (conv, GroupNorm, ReLU) triple.
_TOWER_PARTS = {"conv.weight": (0, "weight"), "gn.weight": (1, "weight"), "gn.bias": (1, "bias")}


def _tower_key(match: re.Match) -> str:
    branch, layer, part = match.group(1), int(match.group(2)), match.group(3)
    offset, name = _TOWER_PARTS[part]
    return f"{branch}_tower.{3 * layer + offset}.{name}"


def _predictor_key(kind: str, key: str) -> str | None:
    for pattern, template in _PREDICTORS[kind]:
        match = re.fullmatch(pattern, key)
        if match:
            groups = match.groups()
            return template.format(i=groups[0], part=groups[-1])
    return None


def _missing_tower_parts(state_dict: dict[str, Tensor]) -> list[str]:
    """Tower keys the layers present imply but the state dict lacks (both towers, every part, layers 0..n-1)."""
    layers = [int(m.group(2)) for m in map(_TOWER.fullmatch, state_dict) if m]
    num_layers = max(layers) + 1 if layers else 0
    expected = [f"{branch}_convs.{i}.{part}" for branch in ("cls", "reg") for i in range(num_layers)
                for part in _TOWER_PARTS]
    return [key for key in expected if key not in state_dict]


def convert_one_stage_head(kind: str, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an mmdet head's parameters (prefix stripped) to codetr's head of `kind` ("atss", "fcos",
    "retinanet"). Returns a new dict holding the same tensors; the input is not modified.

    Raises ConversionError for an unknown kind, for keys no rule maps (all of them listed) and for
    tower layers that lack a part. Shapes are checked by `load_state_dict(strict=True)` on the head.
    """
    if kind not in _PREDICTORS:
        raise ConversionError(f"convert_one_stage_head: unknown head kind {kind!r}; expected one of {', '.join(KINDS)}")
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        tower = _TOWER.fullmatch(key)
        target = _tower_key(tower) if tower else _predictor_key(kind, key)
        if target is None:
            unmapped.append(key)
        else:
            converted[target] = tensor
    if unmapped:
        raise ConversionError(
            f"mmdet {kind} head: {len(unmapped)} key(s) with no codetr counterpart: {', '.join(sorted(unmapped))}"
        )
    missing = _missing_tower_parts(state_dict)
    if missing:
        raise ConversionError(f"mmdet {kind} head: tower layer part(s) missing: {', '.join(missing)}")
    return converted
