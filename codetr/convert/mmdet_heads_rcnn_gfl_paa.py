"""mmdetection auxiliary-head state dicts -> codetr's, for the Faster-RCNN, GFL and PAA heads.

`convert_head(kind, state_dict)` takes ONE head's mmdet tensors, with the head's own key names:
  - "faster_rcnn": the RPN's keys under "rpn_head." and the RoI head's under "roi_head." (as a
    detector checkpoint names them; a Sense-X checkpoint's "roi_head.0." list index removed by the caller):
        rpn_head.rpn_conv.{weight,bias}            (num_convs == 1: a plain conv)
        rpn_head.rpn_conv.{i}.conv.{weight,bias}   (num_convs > 1: ConvModules)
        rpn_head.rpn_cls / rpn_head.rpn_reg        roi_head.bbox_head.{shared_fcs.0, shared_fcs.1, fc_cls, fc_reg}
  - "gfl": GFLHead's {cls_convs,reg_convs}.{i}.{conv.weight, gn.weight, gn.bias}, gfl_cls, gfl_reg,
    scales.{l}.scale, and the fixed buffer integral.project (checked, then skipped: codetr computes it);
  - "paa": PAAHead's (ATSS layout) {cls_convs,reg_convs}.{i}.*, atss_cls, atss_reg, atss_centerness (the
    IoU branch), scales.{l}.scale.
and returns codetr's names for FasterRCNNHead / GFLHead / PAAHead. Layouts need no change: mmdet and
codetr order anchors (ratios outer, scales inner), deltas (anchor-major, 4 per anchor), class-specific
RoI deltas (class-major) and GFL's distributions (side-major) alike. Strict: every key that has no place,
and every codetr key left without a value, is listed in one ConversionError.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from codetr.convert.common import ConversionError

HEAD_KINDS = ("faster_rcnn", "gfl", "paa")


@dataclass
class HeadConversion:
    state_dict: dict[str, Tensor]  # codetr's names
    skipped: list[str] = field(default_factory=list)  # mmdet keys deliberately not carried (fixed buffers)


def _tower(prefix: str, codetr_prefix: str) -> list[tuple[re.Pattern, Callable[[re.Match], str]]]:
    """mmdet ConvModule towers ({prefix}.{i}.conv / .gn) -> codetr conv_tower ([conv, GN, ReLU] x n)."""
    return [
        (re.compile(rf"{prefix}\.(\d+)\.conv\.weight"), lambda m: f"{codetr_prefix}.{3 * int(m[1])}.weight"),
        (re.compile(rf"{prefix}\.(\d+)\.gn\.(weight|bias)"), lambda m: f"{codetr_prefix}.{3 * int(m[1]) + 1}.{m[2]}"),
    ]


def _fixed(new: str) -> Callable[[re.Match], str]:
    return lambda m: f"{new}.{m[1]}"


_RULES: dict[str, list[tuple[re.Pattern, Callable[[re.Match], str]]]] = {
    "faster_rcnn": [
        (re.compile(r"rpn_head\.rpn_conv\.(weight|bias)"), _fixed("rpn.tower.0")),
        (re.compile(r"rpn_head\.rpn_conv\.(\d+)\.conv\.(weight|bias)"), lambda m: f"rpn.tower.{2 * int(m[1])}.{m[2]}"),
        (re.compile(r"rpn_head\.rpn_cls\.(weight|bias)"), _fixed("rpn.objectness")),
        (re.compile(r"rpn_head\.rpn_reg\.(weight|bias)"), _fixed("rpn.deltas")),
        (re.compile(r"roi_head\.bbox_head\.shared_fcs\.0\.(weight|bias)"), _fixed("roi_head.bbox_head.fc1")),
        (re.compile(r"roi_head\.bbox_head\.shared_fcs\.1\.(weight|bias)"), _fixed("roi_head.bbox_head.fc2")),
        (re.compile(r"roi_head\.bbox_head\.fc_cls\.(weight|bias)"), _fixed("roi_head.bbox_head.cls")),
        (re.compile(r"roi_head\.bbox_head\.fc_reg\.(weight|bias)"), _fixed("roi_head.bbox_head.reg")),
    ],
    "gfl": [
        *_tower("cls_convs", "cls_tower"),
        *_tower("reg_convs", "reg_tower"),
        (re.compile(r"gfl_cls\.(weight|bias)"), _fixed("cls_pred")),
        (re.compile(r"gfl_reg\.(weight|bias)"), _fixed("reg_pred")),
        (re.compile(r"scales\.(\d+)\.scale"), lambda m: f"level_scales.{m[1]}.scale"),
    ],
    "paa": [
        *_tower("cls_convs", "cls_tower"),
        *_tower("reg_convs", "reg_tower"),
        (re.compile(r"atss_cls\.(weight|bias)"), _fixed("cls_pred")),
        (re.compile(r"atss_reg\.(weight|bias)"), _fixed("reg_pred")),
        (re.compile(r"atss_centerness\.(weight|bias)"), _fixed("centerness_pred")),
        (re.compile(r"scales\.(\d+)\.scale"), lambda m: f"level_scales.{m[1]}.scale"),
    ],
}


def _check_integral(value: Tensor) -> None:
    """GFL's integral.project must be the bins 0, 1, ..., reg_max that codetr's integral uses."""
    expected = torch.arange(value.numel(), dtype=value.dtype)
    if value.dim() != 1 or not torch.equal(value.cpu(), expected):
        raise ConversionError(f"gfl: integral.project is {value.tolist()}, expected the bins 0..{value.numel() - 1}")


def convert_head(kind: str, state_dict: Mapping[str, Tensor], target: Mapping[str, Tensor] | None = None) -> HeadConversion:
    """Rename one mmdet head's state dict to codetr's (see the module docstring for the keys of each kind).

    target: the codetr head's own state dict (`head.state_dict()`); when given, a codetr key the mmdet
    state dict does not provide, and a shape that differs, are errors too. Raises ConversionError naming
    every offending key.
    """
    if kind not in _RULES:
        raise ConversionError(f"convert_head: unknown head kind {kind!r}, expected one of {', '.join(HEAD_KINDS)}")
    converted: dict[str, Tensor] = {}
    skipped: list[str] = []
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if kind == "gfl" and key == "integral.project":
            _check_integral(value)
            skipped.append(key)
            continue
        for pattern, rename in _RULES[kind]:
            match = pattern.fullmatch(key)
            if match:
                new_key = rename(match)
                if new_key in converted:
                    raise ConversionError(f"{kind}: {key} maps to {new_key}, which another key already filled")
                converted[new_key] = value
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ConversionError(f"{kind}: {len(unmapped)} mmdet keys have no codetr counterpart: {', '.join(sorted(unmapped))}")
    if target is not None:
        missing = sorted(set(target) - set(converted))
        extra = sorted(set(converted) - set(target))
        if missing or extra:
            raise ConversionError(f"{kind}: codetr keys without an mmdet value: {', '.join(missing) or '-'}; "
                                  f"converted keys codetr does not have: {', '.join(extra) or '-'}")
        shapes = [f"{k} {tuple(v.shape)} (codetr {tuple(target[k].shape)})" for k, v in sorted(converted.items())
                  if tuple(v.shape) != tuple(target[k].shape)]
        if shapes:
            raise ConversionError(f"{kind}: shapes differ: {'; '.join(shapes)}")
    return HeadConversion(converted, skipped)


__all__ = ["HEAD_KINDS", "HeadConversion", "convert_head"]
