"""Co-DETR's auxiliary heads: one file per head kind, each class listed once in AUX_HEADS.

A head declares the `AuxHead` interface (codetr.models.co_detr.types): its `kind`, its `loss_weights`, a
`from_config` builder and `forward(AuxInputs) -> AuxHeadOutput`. Adding one is one new file plus one line,
`register_aux_head(MyHead)`; its kind is then valid in `model.aux.heads`. Optionally it also detects on its own
(`DetectingAuxHead.detect`, for `codetr eval --branch`; shared post-processing in heads/detect.py).
"""
from __future__ import annotations

from codetr.models.co_detr.heads.atss import ATSSHead
from codetr.models.co_detr.heads.faster_rcnn import FasterRCNNHead
from codetr.models.co_detr.heads.fcos import FCOSHead
from codetr.models.co_detr.heads.gfl import GFLHead
from codetr.models.co_detr.heads.paa import PAAHead
from codetr.models.co_detr.heads.retinanet import RetinaNetHead
from codetr.models.co_detr.types import AuxHead

AUX_HEADS: dict[str, type[AuxHead]] = {}


def register_aux_head(head_class: type[AuxHead]) -> type[AuxHead]:
    """Make `head_class` buildable by its `kind` (usable as a decorator). Checks the declared interface."""
    missing = [name for name in ("kind", "from_config", "forward") if not hasattr(head_class, name)]
    if missing:
        raise TypeError(f"{head_class.__name__} is not an auxiliary head: it lacks {', '.join(missing)} (see AuxHead)")
    if head_class.kind in AUX_HEADS and AUX_HEADS[head_class.kind] is not head_class:
        raise ValueError(f"auxiliary head kind {head_class.kind!r} is already registered by "
                         f"{AUX_HEADS[head_class.kind].__name__}")
    AUX_HEADS[head_class.kind] = head_class
    return head_class


for _head in (ATSSHead, FasterRCNNHead, FCOSHead, RetinaNetHead, GFLHead, PAAHead):
    register_aux_head(_head)
