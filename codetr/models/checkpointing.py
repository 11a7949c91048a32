"""Activation checkpointing (train.activation_checkpointing): the backbone's stages and the encoder's layers
recompute their activations in backward instead of keeping them. The numbers are unchanged (dropout and drop-path
replay the same random draws); it trades time for memory."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, function: Callable[..., Any], *args: Any) -> Any:
    """function(*args), keeping only its inputs for backward when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def use_activation_checkpointing(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch checkpointing of `model.backbone`'s stages and `model.transformer`'s encoder layers."""
    for part in (model.backbone, model.transformer):
        part.activation_checkpointing = enabled
    return model
