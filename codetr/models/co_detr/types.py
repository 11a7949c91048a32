"""What every auxiliary head takes and returns (Co-DETR's collaborative hybrid assignment).

Boxes here are xyxy in absolute pixels of the network input (the resized image, before padding);
`image_sizes` gives each image's valid (unpadded) height and width.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from codetr.config import AuxConfig


@dataclass
class AuxInputs:
    """The encoder output as feature maps, plus the ground truth, for one batch."""

    maps: list[Tensor]  # 5 x [B, C, H_l, W_l], strides 8, 16, 32, 64, 128
    masks: list[Tensor]  # 5 x [B, H_l, W_l] bool, True = padding
    strides: list[int]  # [8, 16, 32, 64, 128]
    image_sizes: Tensor  # [B, 2] (h, w) valid size of each image, pixels
    gt_boxes: list[Tensor]  # per image [N_i, 4] xyxy absolute pixels
    gt_labels: list[Tensor]  # per image [N_i] int64, contiguous labels


@dataclass
class Candidates:
    """One image's candidates of a head's one-to-many assignment (anchors, points or sampled RoIs).

    Positives are the rows with labels < num_classes; the rest are negatives (label num_classes).
    Co-DETR turns the positives into decoder queries and pads with negatives.
    """

    boxes: Tensor  # [M, 4] xyxy abs: the candidate's own box (anchor, point box, RoI)
    labels: Tensor  # [M] int64, num_classes = background
    target_boxes: Tensor  # [M, 4] xyxy abs: the assigned ground-truth box (undefined for negatives)
    features: Tensor | None  # [M, C] content feature per candidate, or a bank [S, C] (see feature_index), or None
    num_gt: int  # ground-truth boxes in the image
    num_classes: int  # the background label
    # With several anchors per location, `features` may be the per-location bank [S, C] and this [M] the
    # location of each candidate: only the selected queries' rows are then gathered (RetinaNet has 9x
    # more anchors than locations).
    feature_index: Tensor | None = None

    def features_of(self, index: Tensor) -> Tensor | None:
        """[len(index), C] content features of the candidates `index`."""
        if self.features is None:
            return None
        rows = self.feature_index[index] if self.feature_index is not None else index
        return self.features[rows]

    @property
    def positive(self) -> Tensor:
        """[M] bool mask of the positives."""
        return self.labels < self.num_classes

    @property
    def num_positives(self) -> int:
        return int(self.positive.sum())


@dataclass
class AuxHeadOutput:
    """Raw (unweighted) loss terms, e.g. {"loss_cls": ..., "loss_bbox": ...}, and per-image candidates."""

    losses: dict[str, Tensor]
    candidates: list[Candidates] = field(default_factory=list)


class AuxHead(Protocol):
    """The interface every auxiliary head declares (register one with codetr.models.co_detr.heads.register_aux_head).

    kind: its name in `model.aux.heads` and in the log (`aux.<kind>.<term>`; a repeat is `<kind>_2`).
    loss_weights: each raw loss term it returns -> its weight inside the head's loss, before Eq. 6's
        num_decoder_layers x lambda2 (e.g. ATSS {"loss_cls": 1, "loss_bbox": 2, "loss_centerness": 1}).
    from_config: the head for `num_classes` on maps of `in_channels` channels at `strides` (input pixels),
        sized by the Co-DETR config (`cfg.num_convs`, ...).
    forward: raw, unweighted loss terms (exactly the keys of loss_weights) and, per image, the candidates
        of its one-to-many assignment, from which Co-DETR makes the customized positive queries.
    """

    kind: ClassVar[str]
    loss_weights: dict[str, float]

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> AuxHead: ...

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput: ...


@runtime_checkable
class DetectingAuxHead(Protocol):
    """The optional part of the interface: a head that also detects on its own (Co-DETR's Table 11, the released
    `eval_module`), with its usual post-processing and NMS. Every registered kind has it (ATSS, Faster-RCNN,
    FCOS, RetinaNet, GFL, PAA); `isinstance(head, DetectingAuxHead)` tells whether a head does.

    test settings: each head keeps its post-processing as attributes (`test_cfg`, a
        codetr.models.co_detr.heads.detect.PostprocessConfig; Faster-RCNN `rpn_test_cfg` and `rcnn_test_cfg`).
    detect: maps L x [B, C, H_l, W_l] at the head's strides (the auxiliary maps: the encoder output plus the
        downsampled level), image_sizes [B, 2] (h, w) each image's valid network-input size -> per image
        {"scores" [k] float, "labels" [k] int64 contiguous classes, "boxes" [k, 4] xyxy in network-input pixels,
        clipped to the valid size}, at most the head's max_per_img, without gradients.
    """

    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[dict[str, Tensor]]: ...
