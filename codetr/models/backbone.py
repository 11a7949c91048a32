"""ResNet backbone with frozen BatchNorm, returning C3..C5 (strides 8, 16, 32) or C2..C5 (4..32)."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from codetr.errors import CheckpointError
from codetr.models.checkpointing import maybe_checkpoint

_RESNETS = {
    18: torchvision.models.resnet18,
    34: torchvision.models.resnet34,
    50: torchvision.models.resnet50,
    101: torchvision.models.resnet101,
    152: torchvision.models.resnet152,
}


class ResNetBackbone(nn.Module):
    """torchvision ResNet, all BatchNorm frozen, the first `frozen_stages` stages frozen.

    frozen_stages=1 freezes the stem and stage 1 (the paper's setting). ImageNet weights come only
    from a local file (`pretrained`): a torchvision state dict, optionally with an `fc.` head.

    forward(images [B, 3, H, W]) -> [C3, C4, C5], strides 8 / 16 / 32; with first_stage=0 (DINO's 5 scales)
    [C2, C3, C4, C5], strides 4 / 8 / 16 / 32.
    """

    def __init__(self, depth: int = 50, frozen_stages: int = 1, pretrained: str = "", first_stage: int = 1) -> None:
        super().__init__()
        self.activation_checkpointing = False  # see codetr/models/checkpointing.py
        resnet = _RESNETS[depth](weights=None, norm_layer=FrozenBatchNorm2d)
        if pretrained:
            load_pretrained_resnet(resnet, pretrained)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.stages = nn.ModuleList([resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4])
        expansion = 4 if depth >= 50 else 1
        self.first_stage = first_stage  # index of the first returned stage: 0 = C2, 1 = C3
        self.out_channels = [64 * 2**stage * expansion for stage in range(first_stage, 4)]
        self.out_strides = [4 * 2**stage for stage in range(first_stage, 4)]
        frozen = [self.stem, *self.stages][: frozen_stages + 1] if frozen_stages > 0 else []
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.stem(images)
        outputs = []
        for index, stage in enumerate(self.stages):
            x = maybe_checkpoint(self.activation_checkpointing, stage, x)
            if index >= self.first_stage:
                outputs.append(x)
        return outputs


def load_pretrained_resnet(resnet: nn.Module, path: str) -> None:
    """Load a local torchvision-format ResNet state dict; a mismatch lists the offending keys."""
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"model.backbone.pretrained: no file at {file}")
    expected_file = "expected a torchvision ResNet state dict saved with torch.save (e.g. resnet50-0676ba61.pth)"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)  # tensors and plain data only: no code runs
    except pickle.UnpicklingError:  # random bytes, or a pickle of objects (refused unread)
        raise CheckpointError(f"model.backbone.pretrained: cannot read {file}: not a torch file of tensors; "
                              f"{expected_file}") from None
    except Exception as error:  # a truncated or non-torch file
        reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise CheckpointError(f"model.backbone.pretrained: cannot read {file}: {reason}; {expected_file}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"model.backbone.pretrained: {file} holds a {type(state).__name__}, not a dict of "
                              f"tensors; {expected_file}")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    expected = {k for k in resnet.state_dict() if not k.startswith("fc.")}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{file} is not a torchvision ResNet of this depth: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    resnet.load_state_dict(state, strict=False)


def build_backbone(cfg, first_stage: int = 1) -> nn.Module:
    """The backbone a `BackboneConfig` names, returning stages first_stage..3 (C2..C5 from 0, C3..C5 from 1);
    either kind has `out_channels` and `out_strides`."""
    if cfg.kind == "resnet":
        return ResNetBackbone(cfg.depth, cfg.frozen_stages, cfg.pretrained, first_stage=first_stage)
    from codetr.models.swin import SWIN_SIZES, SwinBackbone

    return SwinBackbone(**SWIN_SIZES[cfg.kind], out_indices=tuple(range(first_stage, 4)))
