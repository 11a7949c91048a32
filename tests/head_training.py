"""Shared by the auxiliary-head tests: a few SGD steps of one head on fixed inputs."""
from __future__ import annotations

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
