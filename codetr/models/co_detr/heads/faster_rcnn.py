"""Faster-RCNN auxiliary head of Co-DETR: RPN on strides 8..128 + RoI head on strides 8..64.

Settings are the released Co-Deformable-DETR R50 ones (Sense-X/Co-DETR, mmdet 2.x), see `rpn.py` and
`roi_head.py`. The head's one-to-many assignment is the RoI sampling: its candidates are the sampled
RoIs of every image (<= 512, <= 25 % positive, the GT boxes among the proposals), which Co-DETR turns
into positive queries with the RoI feature averaged over the 7x7 grid as content feature.

Loss terms (raw; the caller applies `loss_weights` and num_decoder_layers * lambda_2, Eq. 6):
  loss_rpn_cls   sigmoid BCE on 256 sampled anchors per image          weight 1.0
  loss_rpn_bbox  L1 on the positive anchors' deltas                    weight 1.0
  loss_cls       softmax CE on the sampled RoIs (background last)      weight 1.0
  loss_bbox      GIoU on the positive RoIs' decoded boxes              weight 10.0
(The released config multiplies all four by num_decoder_layers * lambda_2 = 12; see codetr/models/total_loss.py.)

Differences from the released code, on purpose: candidates are kept per image with their own count
(Co-DETR truncates every image to the batch's smallest RoI count so that it can stack them; with the
usual 1000 proposals every image has exactly 512 and nothing changes).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.config import AuxConfig
from codetr.models.co_detr.heads.detect import RCNN_TEST, RPN_TEST, Detections, PostprocessConfig
from codetr.models.co_detr.heads.roi_head import RoIHead
from codetr.models.co_detr.heads.rpn import RPNHead
from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs


class FasterRCNNHead(nn.Module):
    """RPN + RoI head; forward(AuxInputs) -> AuxHeadOutput (raw losses, sampled RoIs as candidates).

    num_convs: 3x3 conv + ReLU layers of the RPN tower (mmdet's RPNHead has 1; 0 puts the predictors
    directly on the maps). finest_scale: RoI level mapping, level 0 for sqrt(w * h) < 2 * finest_scale;
    the released config sets 112 (mmdet's own default is 56).
    """

    kind = "faster_rcnn"

    @classmethod
    def from_config(cls, num_classes: int, in_channels: int, cfg: AuxConfig, strides: tuple[int, ...]) -> "FasterRCNNHead":
        """The head as Co-DETR builds it: the RPN on every map, the RoI head pooling from the encoder's levels
        (all but the downsampled one), with the released finest_scale: 112 on strides 8..64
        (Co-Deformable-DETR), 56 on strides 4..64 (Co-DINO), unless `cfg.rcnn_finest_scale` sets one."""
        finest_scale = cfg.rcnn_finest_scale or 14.0 * strides[0]
        return cls(num_classes, in_channels, rpn_strides=strides, roi_strides=strides[:-1], finest_scale=finest_scale,
                   fc_channels=cfg.rcnn_fc_channels)

    def __init__(
        self, num_classes: int, in_channels: int = 256, num_convs: int = 1,
        rpn_strides: tuple[int, ...] = (8, 16, 32, 64, 128), roi_strides: tuple[int, ...] = (8, 16, 32, 64),
        finest_scale: float = 112.0, fc_channels: int = 1024, num_proposals: int = 1000, nms_pre: int = 4000,
        rpn_test_cfg: PostprocessConfig = RPN_TEST, rcnn_test_cfg: PostprocessConfig = RCNN_TEST,
    ) -> None:
        super().__init__()
        # `detect`'s post-processing: Co-DETR's released test_cfg (rpn: 1000 per level, NMS 0.7, 1000 proposals;
        # rcnn: score_thr 0, NMS 0.5, 100 detections)
        self.rpn_test_cfg, self.rcnn_test_cfg = rpn_test_cfg, rcnn_test_cfg
        if tuple(roi_strides) != tuple(rpn_strides[: len(roi_strides)]):
            raise ValueError(
                f"FasterRCNNHead: roi_strides {tuple(roi_strides)} must be the first levels of rpn_strides "
                f"{tuple(rpn_strides)}"
            )
        self.num_classes = num_classes
        self.loss_weights = {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0, "loss_cls": 1.0, "loss_bbox": 10.0}
        self.rpn = RPNHead(in_channels, in_channels, num_convs, strides=tuple(rpn_strides),
                           nms_pre=nms_pre, max_proposals=num_proposals)
        self.roi_head = RoIHead(num_classes, in_channels, strides=tuple(roi_strides), finest_scale=finest_scale,
                                fc_channels=fc_channels)

    @torch.no_grad()
    def detect(self, maps: list[Tensor], image_sizes: Tensor) -> list[Detections]:
        """The branch's own detections (the released eval_module 'two-stage'): test-time RPN proposals, then the
        RoI head's per-class NMS. maps: 5 x [B, C, H_l, W_l] at strides 8..128; image_sizes [B, 2] (h, w).
        Returns per image {"scores" [k], "labels" [k], "boxes" [k, 4] xyxy network-input pixels}."""
        proposals = self.rpn.propose(maps, image_sizes, self.rpn_test_cfg)
        roi_maps = maps[: len(self.roi_head.strides)]
        return self.roi_head.detect(roi_maps, proposals, image_sizes, self.rcnn_test_cfg)

    def forward(self, inputs: AuxInputs) -> AuxHeadOutput:
        """See `AuxInputs`: 5 maps [B, C, H_l, W_l] at strides 8..128, GT boxes xyxy abs per image."""
        if tuple(inputs.strides) != self.rpn.strides:
            raise ValueError(
                f"FasterRCNNHead: expected maps at strides {self.rpn.strides}, got {tuple(inputs.strides)}"
            )
        rpn_out = self.rpn(inputs.maps, inputs.image_sizes, inputs.gt_boxes)
        roi_maps = inputs.maps[: len(self.roi_head.strides)]
        roi_out = self.roi_head(roi_maps, rpn_out.proposals, inputs.gt_boxes, inputs.gt_labels)
        return AuxHeadOutput(losses={**rpn_out.losses, **roi_out.losses}, candidates=roi_out.candidates)
