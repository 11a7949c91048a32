"""Shared by the auxiliary-head tests: a few SGD steps of one head on fixed inputs."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from codetr.models.co_detr.types import AuxHeadOutput, AuxInputs


def weighted_head_loss(head: nn.Module, out: AuxHeadOutput) -> Tensor:
    return sum(head.loss_weights[name] * value for name, value in out.losses.items())


def train_head(head: nn.Module, inputs: AuxInputs, steps: int = 30, lr: float = 0.01) -> tuple[list[float], AuxHeadOutput]:
    """SGD (momentum 0.9) on the head's weighted loss. Returns the loss of every step and the last
    output; afterwards each input map's `.grad` holds its gradient summed over all steps (sampling
    heads may not touch every level in every step)."""
    for m in inputs.maps:
        m.requires_grad_(True)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9)
    history = []
    for _ in range(steps):
        out = head(inputs)
        loss = weighted_head_loss(head, out)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history, out


STRIDES = [8, 16, 32, 64, 128]


def make_inputs(channels=32, size=128, batch=2, seed=0, image_sizes=None, boxes=None, labels=None) -> AuxInputs:
    """Random maps at strides 8..128 of a size x size image and two images' ground truth (3 boxes)."""
    generator = torch.Generator().manual_seed(seed)
    maps = [torch.randn(batch, channels, math.ceil(size / s), math.ceil(size / s), generator=generator)
            for s in STRIDES]
    masks = [torch.zeros(batch, m.shape[2], m.shape[3], dtype=torch.bool) for m in maps]
    if boxes is None:
        boxes = [torch.tensor([[10.0, 12.0, 60.0, 50.0], [40.0, 30.0, 120.0, 126.0]]),
                 torch.tensor([[70.0, 5.0, 100.0, 40.0]])]
        labels = [torch.tensor([1, 3]), torch.tensor([0])]
    if image_sizes is None:
        image_sizes = torch.full((batch, 2), size)
    return AuxInputs(maps=maps, masks=masks, strides=list(STRIDES), image_sizes=image_sizes,
                     gt_boxes=boxes, gt_labels=labels)
